"""GGUF export of Mistral 3 / Ministral 3 (issue 14), proven in llama.cpp with ``_gguf_check``: the
language model of a ``Mistral3ForConditionalGeneration`` whose text model is Ministral 3 (YaRN, Llama 4
attention temperature past ``original_max_position_embeddings``, untied output), written as llama.cpp's
converter writes it (``mistral3`` architecture, Pixtral tower and projector left out).

The tiny config keeps Ministral 3 8B's relations (``heads * head_dim == hidden``, GQA 2:1, YaRN with
``mscale == mscale_all_dim == 1``), with ``original_max_position_embeddings`` = 32 so that the 96
compared positions cross the temperature's steps (``floor(pos / 32)`` = 0, 1, 2).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
from peft import LoraConfig

from _gguf_check import GgufCase, build_case, check_logits
from _llama import need_llama_cpp
from _models import build_bpe_tokenizer
from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch import gguf_arch_for

ROPE = {
    "rope_type": "yarn",
    "rope_theta": 1000000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "llama_4_scaling_beta": 0.1,
}


@contextmanager
def _one_thread() -> Iterator[None]:
    """Train on one torch thread: two OpenMP threads on a loaded 2-core machine spin 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def mistral3_config(vocab: int, **text_changes: Any) -> Any:
    """``Mistral3Config``: a tiny Ministral 3 text model and a one-layer 28-pixel Pixtral tower."""
    from transformers import Mistral3Config

    text = dict(
        model_type="ministral3",
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        rope_parameters=dict(ROPE),
        tie_word_embeddings=False,
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, head_dim=16, image_size=28, patch_size=14)
    return Mistral3Config(text_config={**text, **text_changes}, vision_config=vision, image_token_index=1, spatial_merge_size=2, tie_word_embeddings=False)


def _fields(path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.fixture(scope="module")
def mistral3(tmp_path_factory: pytest.TempPathFactory) -> GgufCase:
    from transformers import AutoModelForImageTextToText, Mistral3ForConditionalGeneration

    root = tmp_path_factory.mktemp("mistral3")
    tok = build_bpe_tokenizer("llama3")
    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(mistral3_config(len(tok))).eval()
    with torch.no_grad():  # non-trivial RMSNorm weights
        for name, p in model.named_parameters():
            if "norm" in name and "language_model" in name:
                p.normal_(1.0, 0.1)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    with _one_thread():
        return build_case(
            root, "mistral3 (Mistral3ForConditionalGeneration, ministral3 text)", model, tok, lora, pretrain_steps=30, auto=AutoModelForImageTextToText
        )


def test_mistral3_logits(mistral3: GgufCase) -> None:
    need_llama_cpp()
    check_logits(mistral3, "f32")
    check_logits(mistral3, "q8_0")


def test_mistral3_metadata_and_tensors(mistral3: GgufCase) -> None:
    """The converter's keys (YaRN, log multiplier, temperature), the language model's tensors only."""
    result = mistral3.export("f32")
    f = _fields(result.gguf_file)
    assert f["general.architecture"] == "mistral3" and f["mistral3.block_count"] == 2 and f["mistral3.vocab_size"] == f["mistral3.vocab_size"]
    assert f["mistral3.rope.scaling.type"] == "yarn" and f["mistral3.rope.scaling.factor"] == pytest.approx(4.0)
    assert f["mistral3.rope.scaling.original_context_length"] == 32 and f["mistral3.rope.scaling.yarn_log_multiplier"] == pytest.approx(1.0)
    assert f["mistral3.attention.temperature_scale"] == pytest.approx(0.1) and f["mistral3.rope.dimension_count"] == 16
    names = [t.name for t in gguf.GGUFReader(result.gguf_file).tensors]
    assert "output.weight" in names and len(names) == 3 + 2 * 9 and all(n.startswith(("blk.", "token_embd", "output")) for n in names)
    assert any("vision/audio/projector tensors left out" in n for n in result.notes)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, "YaRN"),
        ({"rope_parameters": {**ROPE, "mscale": 2.0}}, "mscale"),
        ({"rope_parameters": {**ROPE, "attention_factor": 1.2}}, "attention_factor"),
        ({"sliding_window": 16}, "sliding_window"),
    ],
)
def test_mistral3_refusals(change: dict[str, Any], match: str) -> None:
    """What llama.cpp v0.5.0 (or its converter) would not run as transformers does is refused with one line."""
    gguf_arch_for(mistral3_config(64).to_dict())
    with pytest.raises(UnsupportedModelError, match=match):
        gguf_arch_for(mistral3_config(64, **change).to_dict())
