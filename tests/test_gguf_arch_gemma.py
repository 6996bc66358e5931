"""GGUF export of the Gemma family beyond Gemma 3 text (issue 14), proven in llama.cpp with
``_gguf_check``: Gemma 2 (both softcaps, sliding window every other layer, pre/post FFN norms,
RMSNorm ``+1``) and the language model of a multimodal ``Gemma3ForConditionalGeneration``
(vision tower and projector left out, as llama.cpp's converter does).

Each case: a tiny model built from a config that keeps the real model's structural relations
(Gemma 2 2B: ``heads * head_dim != hidden``, ``query_pre_attn_scalar == head_dim``; Gemma 3: 5
sliding layers then a global one; a one-layer vision tower), pretrained a few steps, a LoRA trained
on it, the float32 merge run in transformers against llama.cpp on the exported GGUF.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from peft import LoraConfig

from _gguf_check import GgufCase, build_case, check_logits
from _llama import need_llama_cpp
from _models import build_spm_tokenizer
from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch import gguf_arch_for


def _fields(path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@contextmanager
def _one_thread() -> Iterator[None]:
    """Train on one torch thread: two OpenMP threads on a loaded 2-core machine spin 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _gemma_norms(model: torch.nn.Module) -> None:
    """Non-trivial RMSNorm weights (stored as ``w`` for ``x * (1 + w)``): the ``+1`` must show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.1)


# --------------------------------------------------------------------------- Gemma 2


def gemma2_config(vocab: int, **changes: Any) -> Any:
    """Gemma 2 2B's relations, tiny: 4 layers alternating sliding / global, ``heads * head_dim < hidden``,
    softcaps low enough to bite in a tiny model (attention 10, logits 8)."""
    from transformers import Gemma2Config

    cfg: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        attn_logit_softcapping=10.0,
        final_logit_softcapping=8.0,
        max_position_embeddings=256,
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return Gemma2Config(**{**cfg, **changes})


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory: pytest.TempPathFactory) -> GgufCase:
    from transformers import Gemma2ForCausalLM

    root = tmp_path_factory.mktemp("gemma2")
    tok = build_spm_tokenizer(root / "base", "GemmaTokenizer")  # tokenizer.model: the converter's only source
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(gemma2_config(len(tok))).eval()
    _gemma_norms(model)
    with _one_thread():
        return build_case(root, "gemma2", model, tok, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), pretrain_steps=30)


def test_gemma2_logits(gemma2: GgufCase) -> None:
    need_llama_cpp()
    check_logits(gemma2, "f32")
    check_logits(gemma2, "q8_0")


def test_gemma2_metadata_and_tensors(gemma2: GgufCase) -> None:
    """The keys of ``Gemma2Model.set_gguf_parameters`` (softcaps, window, no RoPE base), norms ``+1``,
    the pre/post FFN norms under their own names, no ``output.weight`` (tied)."""
    from safetensors.torch import load_file

    path = gemma2.export("f32").gguf_file
    f = _fields(path)
    assert f["general.architecture"] == "gemma2"
    assert f["gemma2.attn_logit_softcapping"] == pytest.approx(10.0) and f["gemma2.final_logit_softcapping"] == pytest.approx(8.0)
    assert f["gemma2.attention.sliding_window"] == 8 and f["gemma2.attention.key_length"] == 16
    assert "gemma2.rope.freq_base" not in f and f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.add_space_prefix"] is False
    data = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    merged = load_file(gemma2.merged / "model.safetensors")
    assert "output.weight" not in data
    pairs = (("pre_feedforward_layernorm", "ffn_norm"), ("post_feedforward_layernorm", "post_ffw_norm"))
    for hf, name in ((f"model.layers.1.{a}.weight", f"blk.1.{b}.weight") for a, b in pairs):
        np.testing.assert_allclose(data[name], merged[hf].numpy() + 1, rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"query_pre_attn_scalar": 32}, "query_pre_attn_scalar"),
        ({"layer_types": ["full_attention", "sliding_attention"] * 2}, "layer_types"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}, "rope_theta"),
        ({"attn_logit_softcapping": None}, "attn_logit_softcapping"),
        ({"final_logit_softcapping": None}, "final_logit_softcapping"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings"),
    ],
)
def test_gemma2_refusals(change: dict[str, Any], match: str) -> None:
    """What llama.cpp v0.5.0 would run differently from transformers is refused with one line naming it."""
    gguf_arch_for(gemma2_config(64).to_dict())  # the tested config: accepted
    with pytest.raises(UnsupportedModelError, match=match):
        gguf_arch_for({**gemma2_config(64).to_dict(), **change})


# --------------------------------------------------------------------------- Gemma 3 multimodal: its language model


def gemma3_mm_model(vocab: int) -> Any:
    """``Gemma3ForConditionalGeneration``: Gemma 3 text relations (6 layers, 5 sliding then 1 global,
    ``query_pre_attn_scalar == head_dim``) and a one-layer 28-pixel SigLIP tower (4 patches, 4 image tokens)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        max_position_embeddings=256,
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    cfg = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=vocab - 1, boi_token_index=vocab - 2, eoi_token_index=vocab - 3
    )
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    _gemma_norms(model)
    return model


@pytest.fixture(scope="module")
def gemma3_mm(tmp_path_factory: pytest.TempPathFactory) -> GgufCase:
    root = tmp_path_factory.mktemp("gemma3-mm")
    tok = build_spm_tokenizer(root / "base", "GemmaTokenizer")
    model = gemma3_mm_model(len(tok))
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    with _one_thread():
        return build_case(root, "gemma3 (Gemma3ForConditionalGeneration)", model, tok, lora, pretrain_steps=30)


def test_gemma3_multimodal_logits(gemma3_mm: GgufCase) -> None:
    need_llama_cpp()
    check_logits(gemma3_mm, "f32")
    check_logits(gemma3_mm, "q8_0")


def test_gemma3_multimodal_language_model_only(gemma3_mm: GgufCase) -> None:
    """The GGUF holds exactly the language model (the tensors of a ``gemma3_text`` export: no vision
    tower, no projector), says so, and ``lorasave verify`` maps every tensor back to the checkpoint."""
    from lorasave.verify.run import verify

    result = gemma3_mm.export("q8_0")
    names = [t.name for t in gguf.GGUFReader(result.gguf_file).tensors]
    assert len(names) == 2 + 6 * 13 and not [n for n in names if not n.startswith(("blk.", "token_embd", "output_norm"))]
    assert any("vision/audio/projector tensors left out" in n for n in result.notes)
    f = _fields(result.gguf_file)
    assert f["general.architecture"] == "gemma3" and f["gemma3.block_count"] == 6 and f["gemma3.attention.sliding_window"] == 8
    report = verify(result.output)
    assert report.ok, report.summary()


def test_gemma3_vision_only_adapter_noted(gemma3_mm: GgufCase) -> None:
    """A LoRA on the vision tower alone: the language model's GGUF is the base's, and the note says so."""
    from peft import get_peft_model
    from transformers import Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration.from_pretrained(gemma3_mm.base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=r".*vision_tower.*\.(q_proj|v_proj|fc1)"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    peft_model.save_pretrained(gemma3_mm.root / "vision-lora")
    from lorasave.formats.gguf.export import export_gguf

    result = export_gguf(gemma3_mm.base, gemma3_mm.root / "vision-lora", gemma3_mm.root / "out-vision", type="f32", modelfile=False)
    assert any("the adapter changes only vision/audio/projector tensors (4)" in n for n in result.notes), result.notes
    base = export_gguf(gemma3_mm.base, [], gemma3_mm.root / "out-base", type="f32", modelfile=False)
    got = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(result.gguf_file).tensors}
    want = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(base.gguf_file).tensors}
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)


# --------------------------------------------------------------------------- Gemma 4


def gemma4_text_config(vocab: int, **changes: Any) -> Any:
    """Gemma 4 E2B's relations, tiny: per-layer embeddings (their vocabulary = the token vocabulary, the
    runtime's rows), KV shared by the last half of the layers, double-wide MLP there, sliding/global
    alternating with a global head twice the sliding one, proportional RoPE (0.25) on global layers,
    final softcap low enough to bite."""
    from transformers import Gemma4TextConfig

    cfg: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        sliding_window=8,
        max_position_embeddings=256,
        vocab_size_per_layer_input=vocab,
        hidden_size_per_layer_input=8,
        num_kv_shared_layers=2,
        use_double_wide_mlp=True,
        final_logit_softcapping=8.0,
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return Gemma4TextConfig(**{**cfg, **changes})


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory: pytest.TempPathFactory) -> GgufCase:
    from transformers import Gemma4ForCausalLM

    root = tmp_path_factory.mktemp("gemma4")
    tok = build_spm_tokenizer(root / "base", "GemmaTokenizer", keep_model=False)
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(gemma4_text_config(len(tok))).eval()
    with torch.no_grad():  # Gemma 4's RMSNorm multiplies by the weight itself (no +1)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    with _one_thread():
        return build_case(root, "gemma4_text", model, tok, lora, pretrain_steps=30)


def test_gemma4_logits(gemma4: GgufCase) -> None:
    need_llama_cpp()
    check_logits(gemma4, "f32")
    check_logits(gemma4, "q8_0")


def test_gemma4_metadata_and_tokenizer(gemma4: GgufCase) -> None:
    """``Gemma4Model``'s keys (per-layer arrays, head sizes, KV sharing), its tensors (per-layer
    embeddings, ``layer_output_scale``, no K/V in shared layers, ``rope_freqs``) and its ``gemma4``
    tokenizer: llama.cpp tokenizes the text as transformers does."""
    from transformers import AutoTokenizer

    from lorasave.runtimes.llama_cpp.lib import LlamaCppModel

    need_llama_cpp()
    path = gemma4.export("f32").gguf_file
    f = _fields(path)
    assert f["general.architecture"] == "gemma4" and f["tokenizer.ggml.model"] == "gemma4" and f["tokenizer.ggml.add_bos_token"] is True
    assert f["gemma4.attention.sliding_window_pattern"] == [True, False, True, False] and f["gemma4.attention.shared_kv_layers"] == 2
    assert f["gemma4.attention.key_length"] == 32 and f["gemma4.attention.key_length_swa"] == 16 and f["gemma4.embedding_length_per_layer_input"] == 8
    assert f["gemma4.feed_forward_length"] == [128, 128, 256, 256] and f["gemma4.rope.dimension_count"] == 32 and f["gemma4.rope.dimension_count_swa"] == 16
    merges = json.loads((gemma4.base / "tokenizer.json").read_text())["model"]["merges"]
    assert f["gemma4.final_logit_softcapping"] == pytest.approx(8.0) and len(f["tokenizer.ggml.merges"]) == len(merges) > 0
    data = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    np.testing.assert_array_equal(data["rope_freqs.weight"], np.array([1.0] * 4 + [1e30] * 12, dtype=np.float32))  # 32 * 0.25 / 2 rotated pairs
    assert data["per_layer_token_embd.weight"].shape == (len(gemma4.ref[0]), 4 * 8) and "blk.0.layer_output_scale.weight" in data
    assert "blk.1.attn_k.weight" in data and "blk.2.attn_k.weight" not in data and "output.weight" not in data
    tok = AutoTokenizer.from_pretrained(gemma4.base)
    text = "LoRA adapts a frozen model, 12345 times: naïve café, 日本語."
    with LlamaCppModel(path, n_ctx=128) as m:
        assert m.tokenize(text, add_special=False) == tok(text, add_special_tokens=False).input_ids
        assert m.tokenize(text, add_special=True)[0] == tok.bos_token_id  # the converter always sets add_bos_token


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"vocab_size_per_layer_input": 32}, "vocab_size_per_layer_input"),
        ({"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 32}, "enable_moe_block"),
        ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention"),
    ],
)
def test_gemma4_refusals(change: dict[str, Any], match: str) -> None:
    gguf_arch_for(gemma4_text_config(64).to_dict())
    with pytest.raises(UnsupportedModelError, match=match):
        gguf_arch_for(gemma4_text_config(64, **change).to_dict())


@pytest.fixture(scope="module")
def gemma4_mm(tmp_path_factory: pytest.TempPathFactory) -> GgufCase:
    """``Gemma4ForConditionalGeneration``: the text relations above and a one-layer vision tower (no audio)."""
    from transformers import AutoModelForImageTextToText, Gemma4Config, Gemma4ForConditionalGeneration

    root = tmp_path_factory.mktemp("gemma4-mm")
    tok = build_spm_tokenizer(root / "base", "GemmaTokenizer", keep_model=False)
    n = len(tok)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=16)
    ids = dict(
        boi_token_id=n - 1, eoi_token_id=n - 2, image_token_id=n - 3, video_token_id=n - 4, boa_token_id=n - 5, eoa_token_index=n - 6, audio_token_id=n - 7
    )
    cfg = Gemma4Config(text_config=gemma4_text_config(n).to_dict(), vision_config=vision, audio_config=None, **ids)
    torch.manual_seed(0)
    model = Gemma4ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and "language_model" in name:
                p.normal_(1.0, 0.1)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    with _one_thread():
        return build_case(root, "gemma4 (Gemma4ForConditionalGeneration)", model, tok, lora, pretrain_steps=30, auto=AutoModelForImageTextToText)


def test_gemma4_multimodal_logits(gemma4_mm: GgufCase) -> None:
    need_llama_cpp()
    check_logits(gemma4_mm, "f32")
    result = gemma4_mm.export("q8_0")
    check_logits(gemma4_mm, "q8_0")
    assert any("vision/audio/projector tensors left out" in n for n in result.notes)
    names = [t.name for t in gguf.GGUFReader(result.gguf_file).tensors]
    assert not [n for n in names if not n.startswith(("blk.", "token_embd", "output_norm", "per_layer_", "rope_freqs"))]
