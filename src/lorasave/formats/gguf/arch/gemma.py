"""Gemma 2 and Gemma 3 (``conversion/gemma.py`` ``Gemma2Model`` / ``Gemma3Model`` of llama.cpp v0.5.0;
``src/models/gemma2.cpp`` / ``gemma3.cpp`` for the attention scale and the sliding-window pattern):
every RMSNorm weight + 1, tied output. ``gemma3`` is the multimodal ``Gemma3ForConditionalGeneration``:
its language model only (``MULTIMODAL``)."""

from __future__ import annotations

from dataclasses import replace

import gguf

from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch.base import MULTIMODAL, GgufArch, Hparams, K, MetaItem, V, VocabKind, set_item, text_params


def gemma2_params(hp: Hparams) -> list[MetaItem]:
    """``Gemma2Model.set_gguf_parameters``: its own key list (no RoPE keys), softcaps and sliding window."""
    h = hp.h
    return [
        (K.LLM.CONTEXT_LENGTH, int(h["max_position_embeddings"]), V.UINT32),
        (K.LLM.EMBEDDING_LENGTH, int(h["hidden_size"]), V.UINT32),
        (K.LLM.BLOCK_COUNT, hp.n_layer, V.UINT32),
        (K.LLM.FEED_FORWARD_LENGTH, int(h["intermediate_size"]), V.UINT32),
        (K.Attention.HEAD_COUNT, hp.heads[0], V.UINT32),
        (K.Attention.HEAD_COUNT_KV, hp.heads[1], V.UINT32),
        (K.Attention.LAYERNORM_RMS_EPS, float(h["rms_norm_eps"]), V.FLOAT32),
        (K.Attention.KEY_LENGTH, int(h["head_dim"]), V.UINT32),
        (K.Attention.VALUE_LENGTH, int(h["head_dim"]), V.UINT32),
        (K.LLM.ATTN_LOGIT_SOFTCAPPING, float(h["attn_logit_softcapping"]), V.FLOAT32),
        (K.LLM.FINAL_LOGIT_SOFTCAPPING, float(h["final_logit_softcapping"]), V.FLOAT32),
        (K.Attention.SLIDING_WINDOW, int(h["sliding_window"]), V.UINT32),
    ]


def check_attention_scale(name: str, hp: Hparams, big_layers: int) -> None:
    """Refuse a ``query_pre_attn_scalar`` other than the one llama.cpp derives.

    llama.cpp scales queries by ``1/sqrt(head_dim)``, or ``1/sqrt(n_embd / n_head)`` for the model
    with ``big_layers`` layers (the 27B: 46 layers for Gemma 2, 62 for Gemma 3), ignoring the config.

    Raises:
        UnsupportedModelError: the config's scalar differs.
    """
    n_head, _ = hp.heads
    expected = int(hp.h["hidden_size"]) / n_head if hp.n_layer == big_layers else hp.head_dim
    scalar = hp.h.get("query_pre_attn_scalar")
    if scalar is not None and float(scalar) != float(expected):
        raise UnsupportedModelError(
            f"{name} query_pre_attn_scalar={scalar} but llama.cpp scales attention by 1/sqrt({expected:g}); this model would not run the same in llama.cpp"
        )


def check_layer_types(name: str, hp: Hparams, period: int) -> None:
    """Refuse ``layer_types`` other than llama.cpp's fixed pattern (``load_swa_pattern``: layer ``il``
    slides when ``il % period < period - 1``).

    Raises:
        UnsupportedModelError: the config's ``layer_types`` differ.
    """
    types = hp.h.get("layer_types")
    want = ["sliding_attention" if i % period < period - 1 else "full_attention" for i in range(hp.n_layer)]
    if types is not None and list(types) != want:
        raise UnsupportedModelError(f"{name} layer_types differ from llama.cpp's fixed pattern ({period - 1} sliding, then 1 global); not supported")


def gemma2_check(hp: Hparams) -> None:
    """Refuse Gemma 2 configs llama.cpp v0.5.0 would run differently (``src/models/gemma2.cpp``).

    Beyond the attention scale (46 layers: the 27B) and the alternating sliding pattern: the
    converter writes no RoPE keys, so llama.cpp uses base 10000 for every layer; it always applies
    both softcaps (defaults 50 / 30 when absent, while transformers skips a ``None`` one), always
    ties the output to ``token_embd`` and always uses tanh-approximated GELU.

    Raises:
        UnsupportedModelError: one of these disagrees with the config.
    """
    h = hp.h
    check_attention_scale("gemma2", hp, 46)
    check_layer_types("gemma2", hp, 2)
    theta = hp.full_rope.get("rope_theta", 10000.0)
    if float(theta) != 10000.0:
        raise UnsupportedModelError(f"gemma2 rope_theta={theta}: llama.cpp's converter writes no RoPE base for gemma2, which then runs with 10000")
    for key, default in (("attn_logit_softcapping", 50), ("final_logit_softcapping", 30)):
        if h.get(key) is None:
            raise UnsupportedModelError(f"gemma2 without {key}: llama.cpp always applies it (default {default})")
    if h.get("tie_word_embeddings") is False:
        raise UnsupportedModelError("gemma2 with tie_word_embeddings=false: llama.cpp always uses token_embd as the output matrix")
    if h.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise UnsupportedModelError(f"gemma2 hidden_activation={h['hidden_activation']!r}: llama.cpp runs gelu_pytorch_tanh")


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
    check_attention_scale("gemma3", hp, 62)
    if hp.h.get("attn_logit_softcapping") is not None:
        raise UnsupportedModelError("gemma3 with attn_logit_softcapping is not supported by llama.cpp's converter")
    if hp.h.get("sliding_window_pattern") != 1:
        check_layer_types("gemma3", hp, 6)


GEMMA3 = GgufArch(
    gguf.MODEL_ARCH.GEMMA3,
    gemma3_params,
    norm_shift=1.0,
    vocabs=(VocabKind.SPM, VocabKind.SPM_JSON, VocabKind.BPE),
    add_space_prefix=False,
    drop=frozenset({"lm_head.weight"}),
    check=gemma3_check,
)

#: HF ``model_type`` -> rules.
ARCHITECTURES: dict[str, GgufArch] = {
    "gemma2": GgufArch(
        gguf.MODEL_ARCH.GEMMA2,
        gemma2_params,
        norm_shift=1.0,
        vocabs=(VocabKind.SPM, VocabKind.SPM_JSON),
        add_space_prefix=False,
        drop=frozenset({"lm_head.weight"}),
        check=gemma2_check,
        rope_types=frozenset({"default"}),
    ),
    "gemma3_text": GEMMA3,
    "gemma3": replace(GEMMA3, text_of=MULTIMODAL),
}
