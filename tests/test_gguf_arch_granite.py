"""Granite GGUF (issue 14): llama.cpp's ``granite`` architecture with the four multipliers as GGUF keys."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import GraniteConfig, GraniteForCausalLM

from _gguf_check import GgufCase, check_logits
from _gguf_dense import COMMON, case_of, fields
from _llama import need_llama_cpp
from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch import gguf_arch_for

#: granite-3.3-2b's multipliers, the attention one as its 1/head_dim (1/64 there, 1/16 here), not 1/sqrt(head_dim).
MULTIPLIERS = {"embedding_multiplier": 12.0, "logits_scaling": 8.0, "residual_multiplier": 0.22, "attention_multiplier": 0.0625}


def _config(**changes: Any) -> GraniteConfig:
    return GraniteConfig(**{**COMMON, "tie_word_embeddings": True, "rope_parameters": {"rope_type": "default", "rope_theta": 1e7}, **MULTIPLIERS, **changes})


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> GgufCase:
    need_llama_cpp()
    torch.manual_seed(0)
    return case_of(tmp_path_factory.mktemp("granite"), "granite", GraniteForCausalLM(_config()))


@pytest.mark.parametrize("type", ["f32", "q8_0"])
def test_logits(case: GgufCase, type: str) -> None:
    check_logits(case, type)


def test_metadata(case: GgufCase) -> None:
    """The multipliers as the converter names them; no head_dim keys (it pops ``head_dim``)."""
    f = fields(case.export("q8_0").gguf_file)
    assert f["general.architecture"] == "granite" and f["granite.rope.dimension_count"] == 16
    assert f["granite.attention.scale"] == pytest.approx(0.0625) and f["granite.embedding_scale"] == pytest.approx(12.0)
    assert f["granite.residual_scale"] == pytest.approx(0.22) and f["granite.logit_scale"] == pytest.approx(8.0)
    assert "granite.attention.key_length" not in f


def test_refusals() -> None:
    ok = _config().to_dict()
    gguf_arch_for({**ok, "head_dim": 16})
    with pytest.raises(UnsupportedModelError, match="head_dim"):
        gguf_arch_for({**ok, "head_dim": 32})
    with pytest.raises(UnsupportedModelError, match="residual_multiplier=0"):
        gguf_arch_for({**ok, "residual_multiplier": 0.0})
    with pytest.raises(UnsupportedModelError, match="logits_scaling"):
        gguf_arch_for({k: v for k, v in ok.items() if k != "logits_scaling"})
