"""Modules transformers keeps in float32 stay float32 in a float16 output, as transformers itself saves them.

T5 declares ``_keep_in_fp32_modules = ["wo"]`` and ties ``shared`` / encoder and decoder
``embed_tokens`` / ``lm_head``, so this also checks that tied aliases are dropped as
``save_pretrained`` drops them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import T5Config, T5ForConditionalGeneration

import lorasave


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def test_t5_wo_kept_fp32_like_transformers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
    base = tmp_path / "t5"
    T5ForConditionalGeneration(cfg).save_pretrained(base)
    model = T5ForConditionalGeneration.from_pretrained(base)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "wo"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "lora")

    res = lorasave.merge(base, tmp_path / "lora", tmp_path / "out", dtype="float16")
    ours = _tensors(res.output)
    assert ours["encoder.block.0.layer.1.DenseReluDense.wo.weight"].dtype == torch.float32
    assert ours["encoder.block.0.layer.0.SelfAttention.q.weight"].dtype == torch.float16

    # transformers: load our output in float16 and save it; dtypes and names must agree
    ref = tmp_path / "ref"
    T5ForConditionalGeneration.from_pretrained(res.output, dtype=torch.float16).save_pretrained(ref)
    theirs = _tensors(ref)
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype, k
        assert torch.equal(ours[k], theirs[k]), k
