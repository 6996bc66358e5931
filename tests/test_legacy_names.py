"""Adapters named by transformers 4 modules on a transformers 5 architecture.

transformers 5 fuses Mixtral's experts into 3-D parameters at load time but saves checkpoints in
the original per-expert layout (``block_sparse_moe.experts.E.w1``). An adapter trained with
transformers 4 targets those per-expert Linear modules; lorasave works on checkpoint tensor names,
so it merges them directly. The reference is the merge formula on the base's own tensors (no
transformers 5 PeftModel can hold such an adapter); a module that exists in neither naming is
refused with a message naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MixtralConfig, MixtralForCausalLM

import lorasave
from lorasave.errors import AdapterMismatchError

R, ALPHA = 4, 8


def _base(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4
    )
    MixtralForCausalLM(cfg).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _legacy_adapter(tmp_path: Path, modules: dict[str, tuple[int, int]]) -> Path:
    """A PEFT-layout adapter written as PEFT 0.x on transformers 4 would: per-expert LoRA pairs."""
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for module, (out_f, in_f) in modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(R, in_f, generator=g)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, R, generator=g)
    d = tmp_path / "legacy-lora"
    d.mkdir()
    save_file(tensors, d / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": R, "lora_alpha": ALPHA, "target_modules": ["w1", "w2", "w3"], "task_type": "CAUSAL_LM"}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


def test_per_expert_legacy_lora_merged(tmp_path: Path) -> None:
    base = _base(tmp_path)
    mods = {f"model.layers.0.block_sparse_moe.experts.{e}.w1": (16, 32) for e in range(4)}
    mods["model.layers.0.block_sparse_moe.experts.2.w2"] = (32, 16)
    adapter = _legacy_adapter(tmp_path, mods)
    res = lorasave.merge(base, adapter, tmp_path / "out", dtype="float32")
    out = load_file(res.output / "model.safetensors")
    w0 = load_file(base / "model.safetensors")
    lora = load_file(adapter / "adapter_model.safetensors")
    for module in mods:
        name = f"{module}.weight"
        a, b = lora[f"base_model.model.{module}.lora_A.weight"], lora[f"base_model.model.{module}.lora_B.weight"]
        assert torch.equal(out[name], w0[name].float() + (ALPHA / R) * (b @ a))
    untouched = "model.layers.0.block_sparse_moe.experts.3.w2.weight"
    assert torch.equal(out[untouched], w0[untouched])
    # and transformers 5 loads the merged per-expert checkpoint into its fused layout
    MixtralForCausalLM.from_pretrained(res.output)


def test_unknown_module_names_refused(tmp_path: Path) -> None:
    base = _base(tmp_path)
    adapter = _legacy_adapter(tmp_path, {"model.layers.0.mlp.experts.0.gate_proj": (16, 32)})
    with pytest.raises(AdapterMismatchError, match=r"model\.layers\.0\.mlp\.experts\.0\.gate_proj"):
        lorasave.merge(base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
