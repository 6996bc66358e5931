"""GLM-4 GGUF (issue 14): llama.cpp's ``glm4`` architecture, extra post-norms, partial interleaved RoPE."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import AddedToken
from transformers import Glm4Config, Glm4ForCausalLM

from _gguf_check import GgufCase, build_case, check_logits
from _gguf_dense import COMMON, LORA, fields, perturb_norms, tensors
from _llama import need_llama_cpp
from _models import build_bpe_tokenizer
from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch import gguf_arch_for


def _config(**changes: Any) -> Glm4Config:
    # GLM-4-9B-0414: head_dim 128 = 4096 / 32, 2 KV heads, partial_rotary_factor 0.5, Q/K/V biases, untied
    rope = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}
    return Glm4Config(**{**COMMON, "head_dim": 16, "attention_bias": True, "rope_parameters": rope, **changes})


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> GgufCase:
    need_llama_cpp()
    tok = build_bpe_tokenizer("llama3", vocab=319)
    tok.add_tokens([AddedToken("<|user|>", special=True)], special_tokens=True)  # GLM-4's EOT, the converter's lookup
    assert len(tok) == COMMON["vocab_size"]
    torch.manual_seed(0)
    root: Path = tmp_path_factory.mktemp("glm4")
    return build_case(root, "glm4", perturb_norms(Glm4ForCausalLM(_config())), tok, LORA, pretrain_steps=30)


@pytest.mark.parametrize("type", ["f32", "q8_0"])
def test_logits(case: GgufCase, type: str) -> None:
    check_logits(case, type)


def test_metadata(case: GgufCase) -> None:
    """Half of each head rotated; the fused gate/up kept; EOT and UNK from the added tokens as ``Glm4Model.set_vocab``."""
    path = case.export("q8_0").gguf_file
    f = fields(path)
    assert f["general.architecture"] == "glm4" and f["glm4.rope.dimension_count"] == 8 and f["glm4.attention.key_length"] == 16
    tok_ids = {t: i for i, t in enumerate(f["tokenizer.ggml.tokens"])}
    assert f["tokenizer.ggml.eot_token_id"] == tok_ids["<|user|>"] and f["tokenizer.ggml.unknown_token_id"] == tok_ids["<|endoftext|>"]
    t = tensors(case.export("f32").gguf_file)
    assert t["blk.0.ffn_up.weight"].shape == (2 * 128, 64) and "blk.0.ffn_gate.weight" not in t
    assert {"blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight", "blk.0.ffn_norm.weight", "blk.0.attn_q.bias"} <= set(t)


def test_refusals() -> None:
    ok = _config().to_dict()
    gguf_arch_for(ok)
    with pytest.raises(UnsupportedModelError, match="mrope"):
        gguf_arch_for({**ok, "rope_parameters": {**ok["rope_parameters"], "mrope_section": [2, 3, 3]}})
    with pytest.raises(UnsupportedModelError, match="even"):
        gguf_arch_for({**ok, "rope_parameters": {**ok["rope_parameters"], "partial_rotary_factor": 0.3125}})
