"""Tiny dense models for the per-architecture GGUF proofs (smollm3, granite, olmo2, glm4, qwen3_5, Qwen VL text).

Each keeps the real model's structural relations (head_dim against hidden size and heads, GQA,
tying) at hidden 64 and a 320-token byte-level BPE (``_models.build_bpe_tokenizer``), with
``pad_token_id`` inside the vocabulary (the real configs' ids, e.g. SmolLM3's 128004, are not).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from peft import LoraConfig
from transformers import PreTrainedModel

from _gguf_check import GgufCase, build_case
from _models import build_bpe_tokenizer

#: Shared sizes: 4 heads of 16 over hidden 64, 2 KV heads (GQA), 320-token vocabulary.
COMMON: dict[str, Any] = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)

#: Every linear layer of the decoder gets LoRA.
LORA = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")


def perturb_norms(model: PreTrainedModel, mean: float = 1.0) -> PreTrainedModel:
    """Non-trivial RMSNorm weights (``mean`` +- 0.1), so a norm written to the wrong place shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(mean, 0.1)
    return model.eval()


def case_of(root: Path, kind: str, model: PreTrainedModel, style: str = "llama3", pretrain_steps: int = 30) -> GgufCase:
    """``build_case`` with a ``style`` byte-level BPE and :data:`LORA`."""
    return build_case(root, kind, perturb_norms(model), build_bpe_tokenizer(style), LORA, pretrain_steps=pretrain_steps)


def fields(path: Path) -> dict[str, Any]:
    """The GGUF file's metadata, ``general.*`` and ``{arch}.*`` included."""
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def tensors(path: Path) -> dict[str, np.ndarray]:
    """The GGUF file's tensors by name (numpy, ggml's reversed shape)."""
    return {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
