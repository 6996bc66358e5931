"""Gemma 4 (``conversion/gemma.py`` ``Gemma4Model`` of llama.cpp v0.5.0, a ``Gemma3Model``;
``src/models/gemma4.cpp``): ``gemma4_text`` and the language model of ``Gemma4ForConditionalGeneration``
(``gemma4``: vision / audio towers and their embedders left out, ``base.MULTIMODAL``).

No RMSNorm shift; per-layer embeddings (``per_layer_token_embd`` and the per-layer gates and
projections), KV sharing from ``num_kv_shared_layers`` on, the sliding pattern as a per-layer
array, separate head sizes for global and sliding layers, ``layer_scalar`` as
``layer_output_scale.weight``, proportional RoPE on global layers through ``rope_freqs.weight``,
and the ``gemma4`` tokenizer model (``VocabKind.GEMMA4``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import gguf
import numpy as np

from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch.base import MULTIMODAL, GgufArch, Hparams, K, MetaItem, V, VocabKind, set_item
from lorasave.formats.gguf.arch.gemma import gemma3_params


def _full_layer_value(hp: Hparams, key: str, global_key: str) -> Any:
    """``global_key``, else ``key`` of the first full-attention layer's ``per_layer_config`` (``Gemma4Model``)."""
    if (value := hp.h.get(global_key)) is not None:
        return value
    types = hp.h.get("layer_types") or []
    for idx, layer in (hp.h.get("per_layer_config") or {}).items():
        if int(idx) < len(types) and types[int(idx)] == "full_attention" and key in layer:
            return layer[key]
    return None


def gemma4_params(hp: Hparams) -> list[MetaItem]:
    """``Gemma4Model.set_gguf_parameters``: Gemma 3's keys, then KV sharing, per-layer input size, the
    sliding pattern, global / sliding head sizes and RoPE dimensions, per-layer FFN and KV-head arrays."""
    h = hp.h
    out = gemma3_params(hp)
    n_shared = int(h["num_kv_shared_layers"])
    set_item(out, K.Attention.SHARED_KV_LAYERS, n_shared, V.UINT32)
    set_item(out, K.LLM.EMBD_LENGTH_PER_LAYER_INP, int(h.get("hidden_size_per_layer_input") or 0), V.UINT32)
    swa = [t == "sliding_attention" for t in h["layer_types"]]
    set_item(out, K.Attention.SLIDING_WINDOW_PATTERN, swa, V.ARRAY)
    full, head_swa = int(_full_layer_value(hp, "head_dim", "global_head_dim")), int(h["head_dim"])
    set_item(out, K.Attention.KEY_LENGTH, full, V.UINT32)
    set_item(out, K.Attention.VALUE_LENGTH, full, V.UINT32)
    set_item(out, K.Attention.KEY_LENGTH_SWA, head_swa, V.UINT32)
    set_item(out, K.Attention.VALUE_LENGTH_SWA, head_swa, V.UINT32)
    if (expert_ff := hp.find(("expert_intermediate_size", "moe_intermediate_size"))) is not None:
        set_item(out, K.LLM.EXPERT_FEED_FORWARD_LENGTH, int(expert_ff), V.UINT32)
    if h.get("use_double_wide_mlp", False):
        n_ff, first_shared = int(h["intermediate_size"]), hp.n_layer - n_shared
        set_item(out, K.LLM.FEED_FORWARD_LENGTH, [n_ff if i < first_shared else 2 * n_ff for i in range(hp.n_layer)], V.ARRAY)
    kv_full, kv_swa = _full_layer_value(hp, "num_key_value_heads", "num_global_key_value_heads"), h.get("num_key_value_heads")
    if kv_full is not None and kv_swa is not None:
        set_item(out, K.Attention.HEAD_COUNT_KV, [int(kv_swa) if s else int(kv_full) for s in swa], V.ARRAY)
    set_item(out, K.Rope.DIMENSION_COUNT, full, V.UINT32)  # proportional RoPE: rope_freqs cuts the rotated part
    set_item(out, K.Rope.DIMENSION_COUNT_SWA, int(head_swa * float(hp.rope.get("partial_rotary_factor", 1.0))), V.UINT32)
    return out


def gemma4_rope_freqs(hp: Hparams) -> list[tuple[str, np.ndarray]]:
    """``rope_freqs.weight`` for the global layers' proportional RoPE (``Gemma4Model.generate_extra_tensors``):
    1 for the ``head_dim_full * partial_rotary_factor / 2`` rotated pairs, 1e30 (no rotation) for the rest.

    Returns:
        ``[("rope_freqs.weight", float32 array of shape (head_dim_full // 2,))]``.
    """
    full = int(_full_layer_value(hp, "head_dim", "global_head_dim"))
    n_rot = int(full * float(hp.rope["full_attention"]["partial_rotary_factor"]) / 2)
    values = np.array([1.0] * n_rot + [1e30] * (int(full / 2) - n_rot), dtype=np.float32)
    return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", values)]


def gemma4_check(hp: Hparams) -> None:
    """Refuse Gemma 4 configs llama.cpp v0.5.0 (or its converter) would not run as transformers does.

    The converter asserts ``proportional`` RoPE with ``partial_rotary_factor`` on global layers, a
    global head size and no ``attn_logit_softcapping``; it writes the sliding layers' RoPE over the
    whole head (a ``partial_rotary_factor`` there is not written); the runtime loads
    ``per_layer_token_embd`` with the token vocabulary's rows, so ``vocab_size_per_layer_input``
    must equal ``vocab_size``; it runs every text layer causally. Mixture-of-experts Gemma 4
    (``enable_moe_block``) is not written.

    Raises:
        UnsupportedModelError: one of these disagrees with the config.
    """
    h = hp.h
    full = hp.rope.get("full_attention") or {}
    if full.get("rope_type") != "proportional" or "partial_rotary_factor" not in full:
        raise UnsupportedModelError("gemma4 needs proportional RoPE with partial_rotary_factor on full_attention layers (llama.cpp's converter asserts it)")
    if (hp.rope.get("sliding_attention") or {}).get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("gemma4 with partial_rotary_factor on sliding layers: llama.cpp's converter writes full rotation for them")
    if _full_layer_value(hp, "head_dim", "global_head_dim") is None:
        raise UnsupportedModelError("gemma4 without a global head_dim (global_head_dim or per_layer_config): llama.cpp's converter needs it")
    if h.get("attn_logit_softcapping") is not None:
        raise UnsupportedModelError("gemma4 with attn_logit_softcapping is not supported by llama.cpp's converter")
    if h.get("hidden_size_per_layer_input") and int(h.get("vocab_size_per_layer_input", h["vocab_size"])) != int(h["vocab_size"]):
        raise UnsupportedModelError(
            f"gemma4 vocab_size_per_layer_input={h['vocab_size_per_layer_input']} differs from vocab_size={h['vocab_size']}: "
            "llama.cpp loads per_layer_token_embd with the token vocabulary's rows"
        )
    if h.get("use_bidirectional_attention") == "all":
        raise UnsupportedModelError("gemma4 with use_bidirectional_attention='all': llama.cpp runs the text layers causally")
    if h.get("enable_moe_block"):
        raise UnsupportedModelError("gemma4 mixture-of-experts (enable_moe_block) is not written by lorasave's GGUF export yet")


GEMMA4 = GgufArch(
    gguf.MODEL_ARCH.GEMMA4,
    gemma4_params,
    vocabs=(VocabKind.GEMMA4,),
    add_space_prefix=False,
    extra_tensors=gemma4_rope_freqs,
    check=gemma4_check,
    rope_types=frozenset({"proportional"}),
    weight_suffix=("layer_scalar", "per_dim_scale"),
)

#: HF ``model_type`` -> rules.
ARCHITECTURES: dict[str, GgufArch] = {
    "gemma4_text": GEMMA4,
    "gemma4": replace(GEMMA4, text_of=MULTIMODAL),
}
