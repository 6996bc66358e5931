"""Sanity checks on the fixtures themselves (no lorasave involved).

They guard the other tests against passing vacuously: adapters must really change the
model, pattern adapters must really have per-module scalings, and so on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import _models as M

ADAPTERS = {
    "llama_plain": "llama_base",
    "llama_rslora": "llama_base",
    "llama_pattern": "llama_base",
    "llama_alllinear": "llama_base",
    "llama_bf16_adapter": "llama_base_bf16",
    "qwen2_adapter": "qwen2_base",
    "gpt2_adapter": "gpt2_base",
    "llama_deep_adapter": "llama_deep_base",
}


@pytest.mark.parametrize("adapter_name", sorted(ADAPTERS))
def test_adapter_changes_the_model(request: pytest.FixtureRequest, adapter_name: str) -> None:
    adapter: Path = request.getfixturevalue(adapter_name)
    base: Path = request.getfixturevalue(ADAPTERS[adapter_name])
    weights = M.adapter_weights(adapter)
    for module, (a, b) in weights.items():
        assert a.dtype == torch.float32, module  # PEFT saves LoRA weights in fp32 here
        assert b.abs().max() > 1e-3, f"lora_B of {module} is (almost) zero"
    base_logits = M.logits_of(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
    ref = M.reference_logits(base, [adapter])
    # The adapter's effect must dwarf the loosest tolerance used by the logits tests.
    assert (ref - base_logits).abs().max() > 0.1 * ref.abs().max()


@pytest.mark.parametrize("adapter_name", ["llama_plain", "llama_rslora", "llama_pattern", "gpt2_adapter"])
def test_peft_scaling_matches_config(request: pytest.FixtureRequest, adapter_name: str) -> None:
    adapter: Path = request.getfixturevalue(adapter_name)
    base: Path = request.getfixturevalue(ADAPTERS[adapter_name])
    cfg = M.read_json(adapter / "adapter_config.json")
    scalings = M.peft_scalings(base, adapter)
    for module, s in scalings.items():
        assert s == pytest.approx(M.resolve_scaling(cfg, module)), module
    assert set(scalings) == set(M.adapter_weights(adapter))


def test_pattern_adapter_has_distinct_scalings(llama_base: Path, llama_pattern: Path) -> None:
    scalings = M.peft_scalings(llama_base, llama_pattern)
    assert scalings["model.layers.0.self_attn.q_proj"] == pytest.approx(16 / 4)
    assert scalings["model.layers.0.self_attn.v_proj"] == pytest.approx(24 / 8)
    assert scalings["model.layers.0.self_attn.o_proj"] == pytest.approx(16 / 8)
    assert scalings["model.layers.1.self_attn.o_proj"] == pytest.approx(12 / 2)
    assert scalings["model.layers.0.self_attn.k_proj"] == pytest.approx(2.0)
    a, _ = M.adapter_weights(llama_pattern)["model.layers.1.self_attn.o_proj"]
    assert a.shape[0] == 2


def test_rslora_scaling(llama_base: Path, llama_rslora: Path) -> None:
    scalings = M.peft_scalings(llama_base, llama_rslora).values()
    assert all(s == pytest.approx(16 / 8**0.5) for s in scalings)


def test_sharded_base_equals_single_file_base(llama_base: Path, llama_base_sharded: Path) -> None:
    a, b = M.read_tensors(llama_base), M.read_tensors(llama_base_sharded)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizers_differ(llama_base: Path, adapter_with_tokenizer: Path) -> None:
    assert (llama_base / "tokenizer.json").read_bytes() != (adapter_with_tokenizer / "tokenizer.json").read_bytes()


@pytest.mark.parametrize(("adapter_name", "base_name"), [("llama_rslora", "llama_base"), ("llama_pattern", "llama_base"), ("gpt2_adapter", "gpt2_base")])
def test_formula_is_peft_merge_in_fp32(request: pytest.FixtureRequest, adapter_name: str, base_name: str) -> None:
    """The reference formula of the bit-identity tests is exactly PEFT's own fp32 merge."""
    from peft import PeftModel

    adapter: Path = request.getfixturevalue(adapter_name)
    base: Path = request.getfixturevalue(base_name)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, adapter)
    scalings = M.lora_modules(peft_model)
    merged = peft_model.merge_and_unload().state_dict()
    w0 = M.read_tensors(base)
    fan_in_fan_out = bool(M.read_json(adapter / "adapter_config.json").get("fan_in_fan_out"))
    for mod, (a, b) in M.adapter_weights(adapter).items():
        want = M.expected_merge(w0[f"{mod}.weight"], a, b, scalings[mod], torch.float32, fan_in_fan_out=fan_in_fan_out)
        assert torch.equal(merged[f"{mod}.weight"], want), mod


def test_transformers_resave_is_stable(llama_deep_base: Path, tmp_path: Path) -> None:
    """load -> save_pretrained is a fixed point, so it is a well-defined layout reference."""
    a, b = tmp_path / "a", tmp_path / "b"
    AutoModelForCausalLM.from_pretrained(llama_deep_base, dtype="auto").save_pretrained(a, max_shard_size="20KB")
    AutoModelForCausalLM.from_pretrained(a, dtype="auto").save_pretrained(b, max_shard_size="20KB")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
