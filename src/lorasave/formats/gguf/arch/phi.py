"""Phi-3 (``conversion/phi.py`` ``Phi3MiniModel`` of llama.cpp v0.5.0): fused ``qkv_proj`` /
``gate_up_proj`` kept fused, its own keys (no common text keys)."""

from __future__ import annotations

import gguf

from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch.base import GgufArch, Hparams, K, MetaItem, V, VocabKind


def phi3_params(hp: Hparams) -> list[MetaItem]:
    """``Phi3MiniModel.set_gguf_parameters`` (``conversion/phi.py``; it does not call the text keys)."""
    n_embd = int(hp.find(("hidden_size", "n_embd")))
    n_head, n_kv = hp.heads
    rope_dims = int(hp.rope.get("partial_rotary_factor", 1.0) * n_embd) // n_head
    return [
        (K.LLM.CONTEXT_LENGTH, int(hp.find(("n_positions", "max_position_embeddings"))), V.UINT32),
        (K.Rope.SCALING_ORIG_CTX_LEN, int(hp.rope["original_max_position_embeddings"]), V.UINT32),
        (K.LLM.EMBEDDING_LENGTH, n_embd, V.UINT32),
        (K.LLM.FEED_FORWARD_LENGTH, int(hp.h["intermediate_size"]), V.UINT32),
        (K.LLM.BLOCK_COUNT, hp.n_layer, V.UINT32),
        (K.Attention.HEAD_COUNT, n_head, V.UINT32),
        (K.Attention.HEAD_COUNT_KV, n_kv, V.UINT32),
        (K.Attention.LAYERNORM_RMS_EPS, float(hp.h["rms_norm_eps"]), V.FLOAT32),
        (K.Rope.DIMENSION_COUNT, rope_dims, V.UINT32),
        (K.Rope.FREQ_BASE, float(hp.full_rope["rope_theta"]), V.FLOAT32),
        (K.Attention.SLIDING_WINDOW, int(hp.h.get("sliding_window") or 0), V.UINT32),
    ]


def phi3_check(hp: Hparams) -> None:
    """Refuse Phi-3 LongRoPE (``rope_factors_long/short`` tensors are not written) and a missing original context.

    Raises:
        UnsupportedModelError: ``long_factor`` present, or no ``original_max_position_embeddings``.
    """
    if hp.rope.get("long_factor"):
        raise UnsupportedModelError(
            "phi3 with LongRoPE (rope long_factor/short_factor, 128k models) is not supported by GGUF export yet; use a 4k-context Phi-3"
        )
    if "original_max_position_embeddings" not in hp.rope:
        raise UnsupportedModelError("phi3 config has no original_max_position_embeddings, which llama.cpp's converter requires")


#: HF ``model_type`` -> rules.
ARCHITECTURES: dict[str, GgufArch] = {
    "phi3": GgufArch(
        gguf.MODEL_ARCH.PHI3,
        phi3_params,
        vocabs=(VocabKind.SPM, VocabKind.SPM_JSON, VocabKind.BPE),
        check=phi3_check,
        rope_types=frozenset({"default"}),
    ),
}
