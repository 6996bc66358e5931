"""lorasave.save_adapter: re-saving a PEFT adapter as safetensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import _models as M
import lorasave
from lorasave.errors import LorasaveError


def _peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return M.logits_of(PeftModel.from_pretrained(model, adapter))


def _config_essentials(adapter: Path) -> dict[str, object]:
    cfg = M.read_json(adapter / "adapter_config.json")
    keys = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "peft_type")
    tm = cfg["target_modules"]
    return {**{k: cfg.get(k) for k in keys}, "target_modules": sorted(tm) if isinstance(tm, list) else tm}


@pytest.mark.parametrize(("adapter_name", "base_name"), [("llama_pattern", "llama_base"), ("gpt2_adapter", "gpt2_base")])
def test_resaved_adapter_is_equivalent(request: pytest.FixtureRequest, adapter_name: str, base_name: str, tmp_path: Path) -> None:
    adapter: Path = request.getfixturevalue(adapter_name)
    base: Path = request.getfixturevalue(base_name)
    out = tmp_path / "out"
    lorasave.save_adapter(adapter, out)
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    assert _config_essentials(out) == _config_essentials(adapter)
    want = M.read_file_tensors(adapter / "adapter_model.safetensors")
    got = M.read_file_tensors(out / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert M.peft_scalings(base, out) == M.peft_scalings(base, adapter)
    assert torch.equal(_peft_logits(base, out), _peft_logits(base, adapter))


def test_resaved_adapter_bf16(llama_base: Path, llama_plain: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    lorasave.save_adapter(llama_plain, out, dtype="bfloat16")
    want = M.read_file_tensors(llama_plain / "adapter_model.safetensors")
    got = M.read_file_tensors(out / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == torch.bfloat16, k
        assert torch.equal(got[k], want[k].to(torch.bfloat16)), k
    ref = _peft_logits(llama_base, llama_plain)
    # LoRA factors rounded to bf16 (8 significant bits): same loose bound as bf16 merges.
    assert (_peft_logits(llama_base, out) - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_save_adapter_refuses_existing_output(llama_plain: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "lorasave.json").write_text("{}")  # an earlier lorasave output: --overwrite may replace it
    (out / "sentinel.txt").write_text("x")
    with pytest.raises(LorasaveError) as info:
        lorasave.save_adapter(llama_plain, out)
    assert isinstance(info.value, FileExistsError)
    assert (out / "sentinel.txt").exists()
    lorasave.save_adapter(llama_plain, out, overwrite=True)
    assert not (out / "sentinel.txt").exists()
    assert (out / "adapter_model.safetensors").is_file()


def test_pickle_adapter_needs_allow_pickle(llama_base: Path, adapter_pickle: Path, tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    parent.mkdir()
    out = parent / "out"
    with pytest.raises(LorasaveError):
        lorasave.save_adapter(adapter_pickle, out)
    assert list(parent.iterdir()) == []

    lorasave.save_adapter(adapter_pickle, out, allow_pickle=True)
    assert (out / "adapter_model.safetensors").is_file()
    assert not (out / "adapter_model.bin").exists()
    want = torch.load(adapter_pickle / "adapter_model.bin", map_location="cpu", weights_only=True)
    got = M.read_file_tensors(out / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert torch.equal(_peft_logits(llama_base, out), _peft_logits(llama_base, adapter_pickle))


def test_save_adapter_leaves_source_unchanged(llama_rslora: Path, tmp_path: Path) -> None:
    before = M.tree_hashes(llama_rslora)
    lorasave.save_adapter(llama_rslora, tmp_path / "out", dtype="float16")
    assert M.tree_hashes(llama_rslora) == before


def test_save_adapter_missing_source(tmp_path: Path) -> None:
    with pytest.raises(LorasaveError) as info:
        lorasave.save_adapter(tmp_path / "nope", tmp_path / "out")
    assert isinstance(info.value, FileNotFoundError)
    assert not (tmp_path / "out").exists()
