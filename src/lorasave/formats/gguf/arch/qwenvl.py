"""The language models of Qwen2.5-VL and Qwen3-VL checkpoints (``conversion/qwenvl.py`` ``Qwen2VLModel``,
``conversion/qwen3vl.py`` ``Qwen3VLTextModel`` of llama.cpp v0.5.0; ``src/models/qwen2vl.cpp``,
``qwen3vl.cpp``), the vision tower left out (llama.cpp's converter writes it to a separate mmproj file).

Tensor names: the converter's ``filter_tensors`` skips multimodal tensors (``visual.`` ...) and drops
the ``language_model.`` of ``model.language_model.layers.N...`` (``base.MULTIMODAL``; transformers 5
saves Qwen2.5-VL as ``model.layers.N...`` + ``visual...``, Qwen3-VL as ``model.language_model...``).
M-RoPE: ``rope_parameters.mrope_section`` becomes ``rope.dimension_sections`` (padded to 4,
``base.text_params``); llama.cpp rotates Qwen2.5-VL's sections as NeoX halves (``qwen2vl``: M-RoPE)
and Qwen3-VL's interleaved (``qwen3vl``: IMRoPE), fixed by the architecture, as transformers does.
For text, whose three position ids are equal, both reduce to plain RoPE. Qwen3-VL also gets
``n_deepstack_layers`` (``len(vision_config.deepstack_visual_indexes)``): the runtime widens the
input embedding by that many zero slots for text tokens.

llama.cpp v0.5.0's ``qwen2vl`` loader does not read ``attention.layer_norm_rms_epsilon`` (written
all the same, as the converter does): its RMSNorms run without transformers' epsilon, a difference
of about 7e-5 x max|logit| at Qwen2.5-VL's 1e-6 in the tiny test (7e-4 at 1e-5).
"""

from __future__ import annotations

import gguf

from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch.base import MULTIMODAL, GgufArch, Hparams, K, MetaItem, V, text_params


def mrope_check(hp: Hparams) -> None:
    """Refuse a VL config without ``mrope_section`` (llama.cpp's qwen2vl/qwen3vl require ``rope.dimension_sections``).

    Raises:
        UnsupportedModelError: no ``mrope_section`` in the text config's RoPE parameters.
    """
    if "mrope_section" not in hp.rope:
        raise UnsupportedModelError("Qwen VL config without rope mrope_section, which llama.cpp's qwen2vl/qwen3vl architectures require")


def qwen3vl_params(hp: Hparams) -> list[MetaItem]:
    """Text keys + ``n_deepstack_layers`` (``Qwen3VLTextModel.set_gguf_parameters``)."""
    vision = hp.h.get("vision_config") or {}
    return [*text_params(hp), (K.LLM.NUM_DEEPSTACK_LAYERS, len(vision.get("deepstack_visual_indexes") or []), V.UINT32)]


#: HF ``model_type`` -> rules.
ARCHITECTURES: dict[str, GgufArch] = {
    "qwen2_5_vl": GgufArch(
        gguf.MODEL_ARCH.QWEN2VL,
        text_params,
        bpe_pre="qwen2",
        check=mrope_check,
        rope_types=frozenset({"default", "mrope"}),
        text_of=MULTIMODAL,
    ),
    "qwen3_vl": GgufArch(gguf.MODEL_ARCH.QWEN3VL, qwen3vl_params, bpe_pre="qwen2", check=mrope_check, text_of=MULTIMODAL),
}
