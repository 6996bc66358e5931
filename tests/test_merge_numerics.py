"""Numerical correctness of lorasave.merge, checked against PEFT / transformers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import _models as M
import lorasave

ALL_CASES = sorted(M.CASES)


@pytest.mark.parametrize("name", ALL_CASES)
def test_merged_weights_bit_identical(get_merged: Callable[[str], M.Merged], name: str) -> None:
    """Every LoRA-targeted weight == (W0.f32 + s * B.f32 @ A.f32).to(dtype), bit for bit."""
    m = get_merged(name)
    assert len(m.adapters) == 1
    adapter = m.adapters[0]
    out = M.read_tensors(m.out)
    base = M.read_tensors(m.base)
    cfg = M.read_json(adapter / "adapter_config.json")
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
    scalings = M.peft_scalings(m.base, adapter)  # PEFT's own per-module truth
    weights = M.adapter_weights(adapter)
    assert set(scalings) == set(weights)

    assert set(out) == set(base), "merged checkpoint must have exactly the base's tensor names"
    targeted = {f"{mod}.weight" for mod in weights}
    assert targeted <= set(base)
    for mod, (a, b) in weights.items():
        key = f"{mod}.weight"
        want = M.expected_merge(base[key], a, b, scalings[mod], m.case.out_dtype, fan_in_fan_out=fan_in_fan_out)
        got = out[key]
        assert got.dtype == m.case.out_dtype, key
        assert got.shape == base[key].shape, key
        assert torch.equal(got, want), f"{key}: max abs diff {(got.float() - want.float()).abs().max().item():.3g}"
        # And the merge really changed the weight (guards against a no-op passing).
        assert not torch.equal(got, base[key].to(m.case.out_dtype)), key
    for key in sorted(set(base) - targeted):
        assert out[key].dtype == m.case.out_dtype, key
        assert torch.equal(out[key], base[key].to(m.case.out_dtype)), key


# bf16 keeps 8 significant bits, fp16 11: the merged weights are rounded once to the
# output dtype, which perturbs each weight by up to ~2^-9 (bf16) relatively; through two
# tiny layers that gives logit errors of a few 1e-3 of the logit scale. 2e-2 leaves room
# while staying far below the adapter's own effect (checked in test_fixtures.py, >0.1).
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


@pytest.mark.parametrize("name", ALL_CASES)
def test_logits_match_unmerged_peft(get_merged: Callable[[str], M.Merged], name: str) -> None:
    m = get_merged(name)
    ref = M.reference_logits(m.base, m.adapters)
    model = AutoModelForCausalLM.from_pretrained(m.out, dtype=torch.float32)
    got = M.logits_of(model)
    tol = TOL[m.case.out_dtype] * ref.abs().max().item()
    diff = (got - ref).abs().max().item()
    assert diff <= tol, f"max |logit diff| {diff:.3g} > {tol:.3g}"


def test_peft_merge_and_unload_agrees_with_formula_tolerance(llama_base: Path, llama_plain: Path) -> None:
    """Calibration of the fp32 logits bound: PEFT's own merge meets it too."""
    from peft import PeftModel

    ref = M.reference_logits(llama_base, [llama_plain])
    model = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, llama_plain).merge_and_unload()
    got = M.logits_of(merged)
    assert (got - ref).abs().max() <= TOL[torch.float32] * ref.abs().max()


def test_sharded_and_single_file_base_give_same_tensors(get_merged: Callable[[str], M.Merged]) -> None:
    a = M.read_tensors(get_merged("llama_fp32").out)
    b = M.read_tensors(get_merged("llama_sharded_base").out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", ["llama_fp32", "llama_pattern", "llama_bf16", "gpt2", "llama_to_fp16"])
def test_merge_result_fields(get_merged: Callable[[str], M.Merged], name: str) -> None:
    m = get_merged(name)
    res = m.result
    assert Path(res.output).resolve() == m.out.resolve()
    on_disk = {p.name for p in m.out.iterdir() if p.is_file()}
    assert set(res.files) <= on_disk
    shards = {p.name for p in m.out.glob("*.safetensors")}
    assert shards and shards <= set(res.files)
    if (m.out / "model.safetensors.index.json").exists():
        assert "model.safetensors.index.json" in res.files
    assert "config.json" in res.files
    tensors = M.read_tensors(m.out)
    assert res.n_tensors == len(tensors)
    assert res.n_merged == len(M.adapter_weights(m.adapters[0]))
    assert res.dtype == str(m.case.out_dtype).removeprefix("torch.")
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    shard_bytes = sum((m.out / f).stat().st_size for f in shards)
    # The contract does not pin down whether total_bytes counts tensor payload or the
    # shard files on disk; accept either, but nothing else.
    assert res.total_bytes in (tensor_bytes, shard_bytes)


def test_stacked_adapters_match_sequential_peft_merge(llama_base: Path, llama_plain: Path, llama_rslora: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = lorasave.merge(llama_base, [llama_plain, llama_rslora], out)
    ref = M.reference_logits(llama_base, [llama_plain, llama_rslora])
    got = M.logits_of(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))
    assert (got - ref).abs().max() <= TOL[torch.float32] * ref.abs().max()
    # q_proj / v_proj are hit by both adapters, k_proj / o_proj only by the second.
    assert res.n_merged >= len(M.adapter_weights(llama_rslora))
    single = M.reference_logits(llama_base, [llama_rslora])
    assert (got - single).abs().max() > 1e-2 * ref.abs().max()  # the first one counted


def test_torch_dtype_object_accepted(llama_base: Path, llama_plain: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    lorasave.merge(llama_base, llama_plain, out, dtype=torch.float16)
    tensors = M.read_tensors(out)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert M.read_json(out / "config.json")["dtype"] == "float16"
    ref = M.read_tensors(lorasave.merge(llama_base, llama_plain, tmp_path / "o2", dtype="float16").output)
    assert all(torch.equal(tensors[k], ref[k]) for k in ref)
