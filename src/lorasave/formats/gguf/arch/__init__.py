"""Per-architecture facts for GGUF export, kept as data (one :class:`GgufArch` per HF ``model_type``).

One module per model family (``llama``, ``qwen``, ``gemma``, ``phi``), each with its ``ARCHITECTURES``
entries; this package joins them into :data:`ARCHITECTURES`. :mod:`.base` holds what they share.

Each entry says what llama.cpp v0.5.0's ``convert_hf_to_gguf.py`` does for that architecture:
the gguf-py architecture (tensor names come from ``gguf.get_tensor_name_map``), the per-tensor
transforms (Llama Q/K permutation, Gemma's RMSNorm ``+1``), tensors dropped or generated
(``rope_freqs`` for Llama 3.1 RoPE), the ``{arch}.*`` hyper-parameters, the order in which
tokenizer kinds are tried, and configs llama.cpp would run differently than transformers (refused).

Sources (``/work/ref/llama.cpp-v0.5.0``): ``conversion/base.py`` ``TextModel.__init__`` (RoPE
parameter normalisation) and ``TextModel.set_gguf_parameters`` (the common keys);
``conversion/llama.py`` ``LlamaModel`` (permute, ``vocab_size``, ``rope.dimension_count``,
``generate_extra_tensors``); ``conversion/qwen.py`` ``Qwen2Model`` / ``Qwen3Model``;
``conversion/gemma.py`` ``Gemma3Model``; ``conversion/phi.py`` ``Phi3MiniModel``;
``conversion/qwen.py`` ``Qwen3_5TextModel`` / ``Qwen3_5MoeTextModel`` (``qwen35``);
``src/models/gemma3.cpp`` (attention scale, SWA pattern 6).
"""

from __future__ import annotations

from typing import Any

from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch import deepseek, gemma, gemma4, glm, gptoss, granite, llama, llama4, mistral, olmo, phi, qwen, qwen35, qwenvl, smollm
from lorasave.formats.gguf.arch.base import MULTIMODAL, GgufArch, Hparams, MetaItem, TextOf, VocabKind, head_counts, no_check, no_extra, rope_theta, text_params

__all__ = [
    "ARCHITECTURES",
    "MULTIMODAL",
    "REFUSED",
    "GgufArch",
    "Hparams",
    "MetaItem",
    "TextOf",
    "VocabKind",
    "gguf_arch_for",
    "head_counts",
    "no_check",
    "no_extra",
    "rope_theta",
    "text_params",
]

#: Supported HF ``model_type`` -> GGUF rules (llama.cpp ``conversion/__init__.py`` TEXT_MODEL_MAP), every family's.
ARCHITECTURES: dict[str, GgufArch] = {
    **llama.ARCHITECTURES,
    **llama4.ARCHITECTURES,
    **qwen.ARCHITECTURES,
    **gemma.ARCHITECTURES,
    **gemma4.ARCHITECTURES,
    **mistral.ARCHITECTURES,
    **phi.ARCHITECTURES,
    **smollm.ARCHITECTURES,
    **granite.ARCHITECTURES,
    **olmo.ARCHITECTURES,
    **glm.ARCHITECTURES,
    **gptoss.ARCHITECTURES,
    **qwenvl.ARCHITECTURES,
    **qwen35.ARCHITECTURES,
    **deepseek.ARCHITECTURES,
}

#: ``model_type`` -> one-line reason: known architectures the export refuses (the runtime may load them).
REFUSED: dict[str, str] = {}


def gguf_arch_for(config: dict[str, Any]) -> GgufArch:
    """The GGUF rules for a base's config.json.

    Raises:
        UnsupportedModelError: ``model_type`` is not in :data:`ARCHITECTURES` (with the reason
            of :data:`REFUSED` for a known one), the RoPE scaling
            type is not supported for it, or the architecture's ``check`` refuses the config.
    """
    model_type = config.get("model_type")
    rules = ARCHITECTURES.get(str(model_type))
    if rules is None and str(model_type) in REFUSED:
        raise UnsupportedModelError(REFUSED[str(model_type)].format(model_type=model_type))
    if rules is None:
        raise UnsupportedModelError(f"GGUF export does not support model_type {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    hp = Hparams.of(config)
    rules.check(hp)
    if hp.rope_type not in rules.rope_types:
        raise UnsupportedModelError(
            f"GGUF export of {model_type} with rope_type {hp.rope_type!r} is not supported; supported: {', '.join(sorted(rules.rope_types))}"
        )
    return rules
