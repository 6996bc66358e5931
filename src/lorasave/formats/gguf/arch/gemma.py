"""Gemma 3 text (``conversion/gemma.py`` ``Gemma3Model`` of llama.cpp v0.5.0; ``src/models/gemma3.cpp``
for the attention scale and the sliding-window pattern): every RMSNorm weight + 1, tied output."""

from __future__ import annotations

import gguf

from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch.base import GgufArch, Hparams, K, MetaItem, V, VocabKind, set_item, text_params


def gemma3_params(hp: Hparams) -> list[MetaItem]:
    """Text keys overwritten / extended as ``Gemma3Model.set_gguf_parameters`` does (its defaults included)."""
    h = hp.h
    out = text_params(hp)
    set_item(out, K.LLM.CONTEXT_LENGTH, int(h.get("max_position_embeddings", 131072)), V.UINT32)
    set_item(out, K.Attention.HEAD_COUNT, int(h.get("num_attention_heads", 8)), V.UINT32)
    set_item(out, K.Attention.LAYERNORM_RMS_EPS, float(h.get("rms_norm_eps", 1e-6)), V.FLOAT32)
    set_item(out, K.Attention.KEY_LENGTH, int(h.get("head_dim", 256)), V.UINT32)
    set_item(out, K.Attention.VALUE_LENGTH, int(h.get("head_dim", 256)), V.UINT32)
    set_item(out, K.Rope.FREQ_BASE, float(hp.full_rope.get("rope_theta", 1_000_000.0)), V.FLOAT32)
    if cap := h.get("final_logit_softcapping"):
        set_item(out, K.LLM.FINAL_LOGIT_SOFTCAPPING, float(cap), V.FLOAT32)
    if h.get("sliding_window_pattern") != 1:
        set_item(out, K.Attention.SLIDING_WINDOW, int(h["sliding_window"]), V.UINT32)
    set_item(out, K.Attention.HEAD_COUNT_KV, int(h.get("num_key_value_heads", 4)), V.UINT32)
    return out


def gemma3_check(hp: Hparams) -> None:
    """Refuse Gemma 3 configs that llama.cpp v0.5.0 would run differently (``src/models/gemma3.cpp``).

    llama.cpp scales queries by ``1/sqrt(head_dim)`` (``1/sqrt(n_embd/n_head)`` for the 62-layer
    27B), ignoring ``query_pre_attn_scalar``; it marks layer ``il`` sliding when ``il % 6 < 5``; the
    converter asserts there is no ``attn_logit_softcapping``.

    Raises:
        UnsupportedModelError: one of these disagrees with the config.
    """
    h = hp.h
    n_head, _ = hp.heads
    expected = int(h["hidden_size"]) / n_head if hp.n_layer == 62 else hp.head_dim
    scalar = h.get("query_pre_attn_scalar")
    if scalar is not None and float(scalar) != float(expected):
        raise UnsupportedModelError(
            f"gemma3 query_pre_attn_scalar={scalar} but llama.cpp scales attention by 1/sqrt({expected:g}); this model would not run the same in llama.cpp"
        )
    if h.get("attn_logit_softcapping") is not None:
        raise UnsupportedModelError("gemma3 with attn_logit_softcapping is not supported by llama.cpp's converter")
    types = h.get("layer_types")
    if types is not None and h.get("sliding_window_pattern") != 1:
        want = ["sliding_attention" if i % 6 < 5 else "full_attention" for i in range(hp.n_layer)]
        if list(types) != want:
            raise UnsupportedModelError("gemma3 layer_types differ from llama.cpp's fixed pattern (5 sliding layers, then 1 global); not supported")


#: HF ``model_type`` -> rules.
ARCHITECTURES: dict[str, GgufArch] = {
    "gemma3_text": GgufArch(
        gguf.MODEL_ARCH.GEMMA3,
        gemma3_params,
        norm_shift=1.0,
        vocabs=(VocabKind.SPM, VocabKind.SPM_JSON, VocabKind.BPE),
        add_space_prefix=False,
        drop=frozenset({"lm_head.weight"}),
        check=gemma3_check,
    ),
}
