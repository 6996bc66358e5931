"""Llama, Mistral and Mixtral (``conversion/llama.py`` ``LlamaModel`` of llama.cpp v0.5.0): Q/K rows
permuted to interleaved RoPE, ``vocab_size`` and ``rope.dimension_count``, Llama 3.1 RoPE as
``rope_freqs.weight``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import gguf
import numpy as np

from lorasave.formats.gguf.arch.base import GgufArch, Hparams, K, MetaItem, V, VocabKind, text_params


def llama_params(hp: Hparams) -> list[MetaItem]:
    """Text keys + ``vocab_size`` and ``rope.dimension_count`` (``LlamaModel.set_gguf_parameters``)."""
    return [*text_params(hp), (K.LLM.VOCAB_SIZE, int(hp.h["vocab_size"]), V.UINT32), (K.Rope.DIMENSION_COUNT, hp.head_dim, V.UINT32)]


def llama3_rope_freqs(hp: Hparams) -> list[tuple[str, np.ndarray]]:
    """``rope_freqs.weight``: per-dimension RoPE factors for ``rope_type == "llama3"``.

    ``LlamaModel.generate_extra_tensors`` (``conversion/llama.py``), computed the same way
    (float32 inverse frequencies, Python float arithmetic per entry).

    Returns:
        ``[("rope_freqs.weight", float32 array of shape (head_dim // 2,))]`` or ``[]``.
    """
    rp = hp.full_rope
    if str(rp.get("rope_type", "")).lower() != "llama3":
        return []
    import torch

    base = rp.get("rope_theta", 10000.0)
    dim = hp.head_dim
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rp.get("factor", 8.0)
    low, high = rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old_ctx = rp.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    return [(name, torch.tensor(factors, dtype=torch.float32).numpy())]


def llama_like(arch: gguf.MODEL_ARCH, params: Callable[[Hparams], list[MetaItem]], **rules: Any) -> GgufArch:
    """The rules every Llama-derived ``LlamaModel`` subclass of the converter shares: Q/K rows permuted
    to interleaved RoPE pairs (``LlamaModel.modify_tensors``), the vocab tried as SentencePiece, then
    SentencePiece-style tokenizer.json, then byte-level BPE (``LlamaModel.set_vocab``), ``llama-bpe`` as
    the BPE pre-tokenizer; ``rules``: the architecture's other :class:`GgufArch` fields."""
    return GgufArch(arch, params, permute_qk=True, vocabs=(VocabKind.SPM, VocabKind.SPM_JSON, VocabKind.BPE), bpe_pre="llama-bpe", **rules)


LLAMA = llama_like(gguf.MODEL_ARCH.LLAMA, llama_params, extra_tensors=llama3_rope_freqs, rope_types=frozenset({"default", "linear", "llama3"}))


#: HF ``model_type`` -> rules. Mixtral is ``llama`` with experts (``LlamaModel`` stacks
#: ``block_sparse_moe.experts.N.w1/w2/w3`` into ``ffn_gate/down/up_exps``; ``src/models/llama.cpp``).
ARCHITECTURES: dict[str, GgufArch] = {"llama": LLAMA, "mistral": LLAMA, "mixtral": LLAMA}
