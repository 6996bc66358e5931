"""SmolLM3 GGUF (issue 14): llama.cpp's ``smollm3`` architecture, NoPE every 4th layer fixed by the runtime."""

from __future__ import annotations

from typing import Any

import pytest
from transformers import SmolLM3Config, SmolLM3ForCausalLM

from _gguf_check import GgufCase, check_logits
from _gguf_dense import COMMON, case_of, fields
from _llama import need_llama_cpp
from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch import gguf_arch_for


def _config(**changes: Any) -> SmolLM3Config:
    # SmolLM3-3B: 36 layers (NoPE at 3, 7, ...), head_dim 128 = 2048 / 16, 4 KV heads, tied embeddings
    rope = {"rope_type": "default", "rope_theta": 5e6}
    return SmolLM3Config(**{**COMMON, "num_hidden_layers": 4, "tie_word_embeddings": True, "rope_parameters": rope, **changes})


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> GgufCase:
    need_llama_cpp()
    import torch

    torch.manual_seed(0)
    return case_of(tmp_path_factory.mktemp("smollm3"), "smollm3", SmolLM3ForCausalLM(_config()))


@pytest.mark.parametrize("type", ["f32", "q8_0"])
def test_logits(case: GgufCase, type: str) -> None:
    """Layer 3 has no RoPE in transformers (``no_rope_layers``) and in llama.cpp's smollm3: the logits agree."""
    assert SmolLM3Config.from_pretrained(case.base).no_rope_layers == [1, 1, 1, 0]
    check_logits(case, type)


def test_metadata(case: GgufCase) -> None:
    f = fields(case.export("q8_0").gguf_file)
    assert f["general.architecture"] == "smollm3"
    assert f["smollm3.block_count"] == 4 and f["smollm3.rope.dimension_count"] == 16 and f["smollm3.vocab_size"] == 320
    assert f["smollm3.rope.freq_base"] == pytest.approx(5e6)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.padding_token_id"] == 0


def test_refusals() -> None:
    """What llama.cpp's smollm3 cannot run as transformers does is refused with one line."""
    ok = _config().to_dict()
    gguf_arch_for(ok)
    with pytest.raises(UnsupportedModelError, match="no_rope_layers"):
        gguf_arch_for({**ok, "no_rope_layers": [1, 1, 0, 1]})
    with pytest.raises(UnsupportedModelError, match="sliding"):
        gguf_arch_for(_config(use_sliding_window=True, sliding_window=8).to_dict())
    with pytest.raises(UnsupportedModelError, match="attention_bias"):
        gguf_arch_for({**ok, "attention_bias": True})
