"""Qwen2.5-VL and Qwen3-VL GGUF (issue 14): the language model of the multimodal checkpoint, M-RoPE sections as
the converter writes them, the vision tower left out (llama.cpp's ``qwen2vl`` / ``qwen3vl``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from peft import LoraConfig
from transformers import (
    AutoModelForImageTextToText,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from _gguf_check import GgufCase, build_case, check_logits
from _gguf_dense import COMMON, fields, perturb_norms, tensors
from _llama import need_llama_cpp
from _models import build_bpe_tokenizer
from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch import gguf_arch_for

#: LoRA on the language model only (as vision fine-tunes that freeze the tower; the tower would get no gradient from text).
LORA = LoraConfig(r=8, lora_alpha=16, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)", task_type="CAUSAL_LM")
#: Placeholder ids on the tokenizer's specials (never in the text).
MM_IDS = {"image_token_id": 1, "video_token_id": 2, "vision_start_token_id": 1, "vision_end_token_id": 2}


def _qwen25(**text: Any) -> Qwen2_5_VLConfig:
    # Qwen2.5-VL-3B: head_dim 128 = 2048 / 16, 2 KV heads, mrope_section [16, 24, 24] (sum head_dim / 2), tied,
    # rms_norm_eps 1e-6 (llama.cpp v0.5.0's qwen2vl does not read the epsilon key: transformers' default 1e-5 shows)
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[0], window_size=28)
    return Qwen2_5_VLConfig(
        text_config={**COMMON, "rms_norm_eps": 1e-6, "rope_parameters": rope, **text}, vision_config=vision, tie_word_embeddings=True, **MM_IDS
    )


def _qwen3(**text: Any) -> Qwen3VLConfig:
    # Qwen3-VL-4B: head_dim 128, 8 KV heads, interleaved mrope_section [24, 20, 20], deepstack after 3 vision blocks, tied
    rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2], "mrope_interleaved": True}
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, deepstack_visual_indexes=[0, 1], num_position_embeddings=16)
    return Qwen3VLConfig(text_config={**COMMON, "head_dim": 16, "rope_parameters": rope, **text}, vision_config=vision, tie_word_embeddings=True, **MM_IDS)


def _case(root: Any, kind: str, model: PreTrainedModel) -> GgufCase:
    need_llama_cpp()
    return build_case(root, kind, perturb_norms(model), build_bpe_tokenizer("qwen2"), LORA, pretrain_steps=30, auto=AutoModelForImageTextToText)


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory: pytest.TempPathFactory) -> GgufCase:
    torch.manual_seed(0)
    return _case(tmp_path_factory.mktemp("qwen25vl"), "qwen2_5_vl", Qwen2_5_VLForConditionalGeneration(_qwen25()))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> GgufCase:
    torch.manual_seed(0)
    return _case(tmp_path_factory.mktemp("qwen3vl"), "qwen3_vl", Qwen3VLForConditionalGeneration(_qwen3()))


@pytest.mark.parametrize("type", ["f32", "q8_0"])
def test_qwen2_5_vl_logits(qwen25: GgufCase, type: str) -> None:
    check_logits(qwen25, type)


@pytest.mark.parametrize("type", ["f32", "q8_0"])
def test_qwen3_vl_logits(qwen3: GgufCase, type: str) -> None:
    check_logits(qwen3, type)


def test_language_model_only(qwen25: GgufCase, qwen3: GgufCase) -> None:
    """M-RoPE sections padded to 4 as the converter writes them; deepstack count; no vision tensor; the merged LoRA is in."""
    f25, f3 = fields(qwen25.export("f32").gguf_file), fields(qwen3.export("f32").gguf_file)
    assert f25["general.architecture"] == "qwen2vl" and f25["qwen2vl.rope.dimension_sections"] == [2, 3, 3, 0]
    assert f3["general.architecture"] == "qwen3vl" and f3["qwen3vl.rope.dimension_sections"] == [4, 2, 2, 0]
    assert f3["qwen3vl.n_deepstack_layers"] == 2
    for case in (qwen25, qwen3):
        t = tensors(case.export("f32").gguf_file)
        assert all(n.startswith(("blk.", "token_embd", "output_norm")) for n in t), sorted(t)
        assert len([n for n in t if n.startswith("blk.0.")]) == (12 if case is qwen25 else 11)  # Q/K/V biases vs Q/K norms
        from safetensors.torch import load_file

        merged = load_file(case.merged / "model.safetensors")  # Qwen2.5-VL: model.layers..., visual...; Qwen3-VL: model.language_model...
        assert any("visual." in n for n in merged)
        down = next(v for n, v in merged.items() if n.endswith("layers.1.mlp.down_proj.weight"))
        assert (t["blk.1.ffn_down.weight"] == down.numpy()).all()


def test_refusals() -> None:
    cfg = _qwen25().to_dict()
    gguf_arch_for(cfg)
    cfg["text_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    with pytest.raises(UnsupportedModelError, match="mrope_section"):
        gguf_arch_for(cfg)
