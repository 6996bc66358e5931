"""OLMo 2 GGUF (issue 14): llama.cpp's ``olmo2`` architecture, post-norms and whole-projection Q/K norms."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from transformers import Olmo2Config, Olmo2ForCausalLM

from _gguf_check import GgufCase, check_logits
from _gguf_dense import COMMON, case_of, fields, tensors
from _llama import need_llama_cpp
from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch import gguf_arch_for


def _config(**changes: Any) -> Olmo2Config:
    # OLMo-2-1124: head_dim = hidden / heads, untied output; GQA as in the 32B
    return Olmo2Config(**{**COMMON, "tie_word_embeddings": False, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, **changes})


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> GgufCase:
    need_llama_cpp()
    torch.manual_seed(0)
    return case_of(tmp_path_factory.mktemp("olmo2"), "olmo2", Olmo2ForCausalLM(_config()))


@pytest.mark.parametrize("type", ["f32", "q8_0"])
def test_logits(case: GgufCase, type: str) -> None:
    check_logits(case, type)


def test_norms(case: GgufCase) -> None:
    """Post-norms and the Q/K norms (K over the KV heads only) land under llama.cpp's names, unshifted."""
    f = fields(case.export("f32").gguf_file)
    assert f["general.architecture"] == "olmo2" and "olmo2.rope.dimension_count" not in f
    got = tensors(case.export("f32").gguf_file)
    from safetensors.torch import load_file

    hf = load_file(case.merged / "model.safetensors")
    pairs = {
        "blk.1.post_attention_norm.weight": "model.layers.1.post_attention_layernorm.weight",
        "blk.1.post_ffw_norm.weight": "model.layers.1.post_feedforward_layernorm.weight",
        "blk.1.attn_q_norm.weight": "model.layers.1.self_attn.q_norm.weight",
        "blk.1.attn_k_norm.weight": "model.layers.1.self_attn.k_norm.weight",
    }
    for name, hf_name in pairs.items():
        np.testing.assert_array_equal(got[name], hf[hf_name].numpy())
    assert got["blk.1.attn_k_norm.weight"].shape == (2 * 16,)


def test_refusals() -> None:
    ok = _config().to_dict()
    gguf_arch_for(ok)
    for change, word in (
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"attention_bias": True}, "attention_bias"),
        ({"sliding_window": 8}, "sliding_window"),
    ):
        with pytest.raises(UnsupportedModelError, match=word):
            gguf_arch_for({**ok, **change})
