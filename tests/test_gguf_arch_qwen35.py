"""Qwen3.5 dense GGUF (issue 14): refused with one line naming what the export lacks."""

from __future__ import annotations

import pytest
from transformers import Qwen3_5Config, Qwen3_5TextConfig

from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch import gguf_arch_for


@pytest.mark.parametrize("config", [Qwen3_5TextConfig, Qwen3_5Config])
def test_qwen3_5_refused(config: type) -> None:
    """transformers builds it and llama.cpp loads ``qwen35``, but its linear-attention layers need transforms not written."""
    cfg = config().to_dict()
    assert "linear_attention" in (cfg.get("text_config") or cfg)["layer_types"]
    with pytest.raises(UnsupportedModelError, match="Gated DeltaNet") as err:
        gguf_arch_for(cfg)
    assert cfg["model_type"] in str(err.value) and "\n" not in str(err.value)
