"""Qwen2 and Qwen3 (``conversion/qwen.py`` ``Qwen2Model`` / ``Qwen3Model`` of llama.cpp v0.5.0):
the common text keys; Q/K/V biases (Qwen2) and ``attn_q_norm`` / ``attn_k_norm`` (Qwen3) by name."""

from __future__ import annotations

import gguf

from lorasave.formats.gguf.arch.base import GgufArch, text_params

#: HF ``model_type`` -> rules.
ARCHITECTURES: dict[str, GgufArch] = {
    "qwen2": GgufArch(gguf.MODEL_ARCH.QWEN2, text_params, bpe_pre="qwen2"),
    "qwen3": GgufArch(gguf.MODEL_ARCH.QWEN3, text_params, bpe_pre="qwen2"),
}
