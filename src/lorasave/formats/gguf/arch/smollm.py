"""SmolLM3 (``conversion/llama.py`` ``SmolLM3Model`` of llama.cpp v0.5.0: ``LlamaModel`` with the
``smollm3`` architecture): Llama's keys, Q/K permutation and tokenizer order.

The converter writes no key for SmolLM3's NoPE layers: the runtime fixes them
(``src/models/smollm3.cpp``: ``n_no_rope_layer_step = 4``, layer ``il`` uses RoPE iff
``(il + 1) % 4 != 0``), which is transformers' default ``no_rope_layers`` for
``no_rope_layer_interval = 4``. Other patterns, sliding-window layers and biases the runtime does
not load (``o_proj`` / MLP biases) are refused.
"""

from __future__ import annotations

import gguf

from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch.base import GgufArch, Hparams
from lorasave.formats.gguf.arch.llama import llama_like, llama_params

#: ``llama_model_smollm3::load_arch_hparams``: every 4th layer has no RoPE.
NO_ROPE_STEP = 4


def smollm3_check(hp: Hparams) -> None:
    """Refuse SmolLM3 configs llama.cpp v0.5.0 would run differently than transformers.

    Raises:
        UnsupportedModelError: ``no_rope_layers`` (1 = RoPE) is not llama.cpp's fixed pattern,
            a layer is ``sliding_attention`` (the runtime has no SWA for smollm3), or
            ``attention_bias`` / ``mlp_bias`` (no ``attn_output.bias`` / ``ffn_*.bias`` loaded).
    """
    h = hp.h
    want = [int((i + 1) % NO_ROPE_STEP != 0) for i in range(hp.n_layer)]
    got = h.get("no_rope_layers")
    if got is not None and [int(x) for x in got] != want:
        raise UnsupportedModelError(
            f"smollm3 no_rope_layers {list(got)} differ from llama.cpp's fixed pattern {want} (no RoPE every {NO_ROPE_STEP}th layer); not supported"
        )
    if "sliding_attention" in (h.get("layer_types") or []):
        raise UnsupportedModelError("smollm3 with sliding-window layers (use_sliding_window) is not supported by llama.cpp's smollm3 architecture")
    for key in ("attention_bias", "mlp_bias"):
        if h.get(key):
            raise UnsupportedModelError(f"smollm3 with {key}=true is not supported: llama.cpp's smollm3 architecture loads no such bias")


#: HF ``model_type`` -> rules.
ARCHITECTURES: dict[str, GgufArch] = {
    "smollm3": llama_like(gguf.MODEL_ARCH.SMOLLM3, llama_params, check=smollm3_check),
}
