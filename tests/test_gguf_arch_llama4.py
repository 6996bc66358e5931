"""GGUF export of Llama 4 (issue 14): a tiny ``Llama4ForCausalLM`` (``llama4_text``) and the language model
of a tiny ``Llama4ForConditionalGeneration`` (``llama4``, vision tower and projector left out), each with a
LoRA on attention, on the dense and shared-expert MLPs and on the fused routed experts (PEFT
``target_parameters``), run in llama.cpp against transformers on the float32 merge (``_gguf_check``).

The config keeps Llama 4 Scout's relations at a tiny size: ``heads * head_dim == hidden`` (40 x 128 =
5120 there), GQA 2:1 (40:8 there), RoPE skipped on every 4th layer (layers 3, 7, ...), chunked attention
on the others, the L2 Q/K norm on the RoPE layers, Scout's ``llama3`` RoPE (factor 16, low = high
frequency factor 1, so ``rope_freqs`` holds both 1 and 16 here), 16 experts with top-1 sigmoid routing,
a shared expert of the routed size, the dense MLP twice the expert's (16384 / 8192 there). MoE on every
second layer as Maverick interleaves it (``interleave_moe_layer_step`` 2) rather than on every layer
as Scout: with 4 layers this puts the dense and the MoE feed-forward on both a RoPE and a no-RoPE
layer, and only a dense layer reads ``feed_forward_length`` (= ``intermediate_size_mlp``, the size the
converter swaps with ``intermediate_size``), so a swapped key fails the load here. The Q/K norm stays
(llama.cpp ties it to the expert count: on for every count but Maverick's 128).

Chunked attention (8192) and the attention temperature (``floor_scale`` 8192) are llama.cpp constants
the 96 compared positions do not reach; configs with other values are refused (``test_refused``), and
``test_long_context`` (opt-in, about a minute: ``LORASAVE_LLAMA4_LONG=1``) compares 8320 positions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

from _gguf_check import GgufCase, build_case, check_logits
from _llama import need_llama_cpp
from _models import build_bpe_tokenizer
from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch import gguf_arch_for

Q = gguf.GGMLQuantizationType
N_EXPERT = 16
ROPE = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXPERTS = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]


def text_config(vocab: int = 320, **changes: Any) -> dict[str, Any]:
    """``Llama4TextConfig`` keyword arguments: Scout's relations, Maverick's MoE interleave (module docstring)."""
    base = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=N_EXPERT, num_experts_per_tok=1, interleave_moe_layer_step=2,
        rope_parameters=dict(ROPE), max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return {**base, **changes}


def mm_config(vocab: int) -> Any:
    """``Llama4Config``: the text model above and a one-layer 28-pixel vision tower."""
    from transformers import Llama4Config

    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14, vision_output_dim=32,
        projector_input_dim=32, projector_output_dim=32,
    )  # fmt: skip
    return Llama4Config(text_config=text_config(vocab), vision_config=vision, tie_word_embeddings=False)


def _one_thread(build: Any) -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two OpenMP threads on a loaded 2-core machine spin far slower
    try:
        return build()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama4_text(tmp_path_factory: pytest.TempPathFactory) -> GgufCase:
    need_llama_cpp()
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    def build() -> GgufCase:
        torch.manual_seed(0)
        tok = build_bpe_tokenizer("llama3")
        model = Llama4ForCausalLM(Llama4TextConfig(**text_config(len(tok)))).eval()
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, target_parameters=EXPERTS)
        return build_case(tmp_path_factory.mktemp("llama4_text"), "llama4 (Llama4ForCausalLM)", model, tok, lora, pretrain_steps=30)

    return _one_thread(build)


@pytest.fixture(scope="module")
def llama4_mm(tmp_path_factory: pytest.TempPathFactory) -> GgufCase:
    need_llama_cpp()
    from transformers import AutoModelForImageTextToText, Llama4ForConditionalGeneration

    def build() -> GgufCase:
        torch.manual_seed(1)
        tok = build_bpe_tokenizer("llama3")
        model = Llama4ForConditionalGeneration(mm_config(len(tok))).eval()
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(" + "|".join(TARGETS) + ")", target_parameters=EXPERTS)
        kind = "llama4 (Llama4ForConditionalGeneration, language model)"
        return build_case(tmp_path_factory.mktemp("llama4_mm"), kind, model, tok, lora, pretrain_steps=30, auto=AutoModelForImageTextToText)

    return _one_thread(build)


def _tensors(path: Path) -> dict[str, Any]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_logits_text(llama4_text: GgufCase) -> None:
    """f32 and q8_0 of the text checkpoint in llama.cpp against transformers on the float32 merge."""
    check_logits(llama4_text, "f32")
    check_logits(llama4_text, "q8_0")


def test_logits_multimodal(llama4_mm: GgufCase) -> None:
    """The same for the language model of the multimodal checkpoint."""
    check_logits(llama4_mm, "f32")
    check_logits(llama4_mm, "q8_0")


def _check_file(case: GgufCase, prefix: str) -> None:
    """``Llama4Model.set_gguf_parameters``'s keys; dense layers 0, 2 and MoE layers 1, 3; the experts =
    the merged fused tensors split and transposed (gate the first half of ``gate_up_proj``'s columns)."""
    path = case.export("f32").gguf_file
    r = gguf.GGUFReader(path)
    keys = ("block_count", "feed_forward_length", "expert_feed_forward_length", "interleave_moe_layer_step", "expert_count", "expert_used_count",
            "rope.dimension_count", "vocab_size")  # fmt: skip
    assert {k: r.fields[f"llama4.{k}"].contents() for k in keys} == {
        "block_count": 4, "feed_forward_length": 128, "expert_feed_forward_length": 64, "interleave_moe_layer_step": 2, "expert_count": N_EXPERT,
        "expert_used_count": 1, "rope.dimension_count": 16, "vocab_size": 320,
    }  # fmt: skip
    assert "llama4.attention.sliding_window" not in r.fields and "llama4.expert_gating_func" not in r.fields
    got = _tensors(path)
    merged = load_file(case.merged / "model.safetensors")
    rope = np.asarray(got["rope_freqs.weight"].data)
    assert sorted(set(rope.tolist())) == [1.0, 16.0]
    for layer in (0, 2):
        assert f"blk.{layer}.ffn_gate.weight" in got and f"blk.{layer}.ffn_gate_exps.weight" not in got
    for layer in (1, 3):
        pre = f"{prefix}model.layers.{layer}.feed_forward"
        gate_up, down = merged[f"{pre}.experts.gate_up_proj"], merged[f"{pre}.experts.down_proj"]  # (E, n_embd, 2 n_ff), (E, n_ff, n_embd)
        want = {"gate": gate_up[..., :64].transpose(1, 2), "up": gate_up[..., 64:].transpose(1, 2), "down": down.transpose(1, 2)}
        for proj, w in want.items():
            np.testing.assert_array_equal(np.asarray(got[f"blk.{layer}.ffn_{proj}_exps.weight"].data), w.numpy())
        np.testing.assert_array_equal(np.asarray(got[f"blk.{layer}.ffn_gate_inp.weight"].data), merged[f"{pre}.router.weight"].numpy())
        np.testing.assert_array_equal(np.asarray(got[f"blk.{layer}.ffn_down_shexp.weight"].data), merged[f"{pre}.shared_expert.down_proj.weight"].numpy())
    q = merged[f"{prefix}model.layers.0.self_attn.q_proj.weight"]  # Q/K as they are: no Llama permute
    np.testing.assert_array_equal(np.asarray(got["blk.0.attn_q.weight"].data), q.numpy())
    assert all(n.startswith(("blk.", "token_embd", "output", "rope_freqs")) for n in got)
    q8 = _tensors(case.export("q8_0").gguf_file)
    assert Q(q8["blk.1.ffn_gate_exps.weight"].tensor_type) is Q.Q8_0 and Q(q8["blk.1.ffn_gate_inp.weight"].tensor_type) is Q.F32


def test_keys_and_tensors_text(llama4_text: GgufCase) -> None:
    _check_file(llama4_text, "")


def test_keys_and_tensors_multimodal(llama4_mm: GgufCase) -> None:
    """The language model only: the vision tower and the projector left out, with a note."""
    _check_file(llama4_mm, "language_model.")
    assert any("vision/audio/projector tensors left out" in n for n in llama4_mm.export("f32").notes)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"attention_chunk_size": 4096}, "hard-codes chunks of 8192"),
        ({"attention_chunk_size": None}, "without chunked attention"),
        ({"no_rope_layers": [1, 1, 0, 1]}, "no_rope_layers differ"),
        ({"layer_types": ["chunked_attention", "full_attention"] * 2}, "layer_types differ"),
        ({"attn_temperature_tuning": False}, "temperature tuning"),
        ({"floor_scale": 4096}, "temperature tuning"),
        ({"use_qk_norm": False}, "use_qk_norm=False with 16 experts"),
        ({"moe_layers": [0, 1]}, "moe_layers=\\[0, 1\\]"),
        ({"hidden_act": "gelu"}, "SiLU"),
        ({"attention_bias": True}, "attention_bias"),
        ({"num_local_experts": 0}, "without experts"),
    ],
)
def test_refused(changes: dict[str, Any], match: str) -> None:
    """What ``llama4.cpp`` hard-codes and a config may vary: one line each, for the text and the multimodal config."""
    from transformers import Llama4TextConfig

    ok = Llama4TextConfig(**text_config()).to_dict()
    gguf_arch_for(ok)
    gguf_arch_for({"model_type": "llama4", "text_config": ok})
    bad = Llama4TextConfig(**text_config(**changes)).to_dict()
    for config in (bad, {"model_type": "llama4", "text_config": bad}):
        with pytest.raises(UnsupportedModelError, match=match) as e:
            gguf_arch_for(config)
        assert "\n" not in str(e.value)


@pytest.mark.skipif(not os.environ.get("LORASAVE_LLAMA4_LONG"), reason="8320 positions in llama.cpp (about a minute): set LORASAVE_LLAMA4_LONG=1")
def test_long_context(tmp_path: Path) -> None:
    """Past position 8191 the temperature of the NoPE layer steps up and the chunked layers see only their
    chunk: llama.cpp's constants against transformers' config values, on the base (no adapter) with
    sharpened queries; the temperature alone moves transformers' logits there by far more than the tolerance."""
    need_llama_cpp()
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    from lorasave.formats.gguf.model import write_gguf_file
    from lorasave.formats.gguf.quant import GgufType
    from lorasave.runtimes.llama_cpp.lib import LlamaCppModel

    n = 8320
    torch.manual_seed(0)
    tok = build_bpe_tokenizer("llama3")
    model = Llama4ForCausalLM(Llama4TextConfig(**text_config(len(tok), max_position_embeddings=16384))).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(3.0)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    ids = torch.randint(3, len(tok), (n,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        for layer in model.model.layers:
            layer.self_attn.attn_temperature_tuning = False
        untuned = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    with LlamaCppModel(write_gguf_file(tmp_path / "base", tmp_path / "out", GgufType.parse("f32")), n_ctx=n) as m:
        got = m.logits(ids)
    tol = 1e-3 * float(np.abs(ref).max())
    diff = float(np.abs(got[8191:] - ref[8191:]).max())
    print(f"llama4 f32 positions 8191..{n - 1}: max|diff| {diff:.3g} = {diff / tol * 1e-3:.2g} x max|logit|")
    assert diff <= tol and (got[8191:].argmax(-1) == ref[8191:].argmax(-1)).all()
    assert float(np.abs(untuned[8191:] - ref[8191:]).max()) > 100 * tol
