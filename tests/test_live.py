"""Saving a live PeftModel: ``lorasave.save_pretrained_merged`` and ``lorasave.attach``.

The live model must come out unchanged (same tensors, same requires_grad, still trainable), and
what is written must be exactly what ``lorasave.merge`` writes from the same base and the adapter
saved on disk by PEFT.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

import _models as M
import _parity as P
import lorasave


@pytest.fixture
def live(llama_base: Path) -> PeftModel:
    """A LoRA fine-tune still in memory: fp32 tiny Llama, trained a few Adam steps."""
    model = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.float32)
    torch.manual_seed(60)
    peft_model = get_peft_model(model, P.lora(target_modules=["q_proj", "v_proj", "o_proj", "gate_proj"], task_type="CAUSAL_LM"))
    P.train(peft_model, "llama", P.VOCAB, seed=60, steps=6, lr=2e-2)
    return peft_model.train()  # saved mid-training, as Unsloth scripts do


@torch.no_grad()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    """Eval-mode logits on the fixed batch, leaving the model's train/eval mode as it was."""
    was = model.training
    try:
        return P.logits(model, P.eval_inputs("llama"))
    finally:
        model.train(was)


@pytest.fixture(scope="session")
def tok(llama_base: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(llama_base)


Snapshot = tuple[dict[str, tuple[torch.Tensor, bool]], dict[str, bool]]


def _snapshot(model: torch.nn.Module) -> Snapshot:
    """Every tensor with its requires_grad, and every module's training flag."""
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    tensors = {n: (t.detach().clone(), grads.get(n, False)) for n, t in model.state_dict().items()}
    return tensors, {n: m.training for n, m in model.named_modules()}


def _assert_unchanged(model: PeftModel, before: Snapshot, logits_before: torch.Tensor) -> None:
    after, modes = _snapshot(model)
    assert after.keys() == before[0].keys(), "the live model's modules changed"
    for n, (t, g) in before[0].items():
        assert torch.equal(after[n][0], t), f"{n} changed"
        assert after[n][1] == g, f"{n}.requires_grad changed"
    assert modes == before[1], "train/eval mode changed"
    assert isinstance(model, PeftModel)
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and not any(m.merged for m in layers), "LoRA layers left merged"
    assert torch.equal(_logits(model), logits_before)


def _assert_same_files(a: Path, b: Path) -> None:
    assert P.weight_files(a) == P.weight_files(b)
    for f in P.weight_files(a):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f"{f} differs"
    assert P.read_json(a / "config.json") == P.read_json(b / "config.json")


def _reference_merge(live: PeftModel, base: Path, tmp: Path, **kw: object) -> Path:
    adir = tmp / "adapter"
    live.save_pretrained(adir)
    out = tmp / "via_merge"
    lorasave.merge(base, adir, out, **kw)  # type: ignore[arg-type]
    return out


def test_save_pretrained_merged_equals_merge(live: PeftModel, llama_base: Path, tok: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    before = _snapshot(live)
    logits_before = _logits(live)
    d1 = tmp_path / "live"
    lorasave.save_pretrained_merged(live, d1, tokenizer=tok, max_shard_size=M.SHARD)
    _assert_unchanged(live, before, logits_before)
    d2 = _reference_merge(live, llama_base, tmp_path, max_shard_size=M.SHARD)
    assert (d1 / "model.safetensors.index.json").is_file(), "fixture: expected a sharded output"
    _assert_same_files(d1, d2)
    # and it is the fine-tune: the merged checkpoint gives the live model's logits
    P.assert_logits_match(P.logits(P.load_merged(d1, AutoModelForCausalLM), P.eval_inputs("llama")), logits_before)
    got = AutoTokenizer.from_pretrained(d1)
    assert got.get_vocab() == tok.get_vocab() and got.eos_token == tok.eos_token


def test_save_pretrained_merged_dtype(live: PeftModel, llama_base: Path, tmp_path: Path) -> None:
    d1 = tmp_path / "live"
    lorasave.save_pretrained_merged(live, d1, dtype="bfloat16")
    d2 = _reference_merge(live, llama_base, tmp_path, dtype="bfloat16")
    _assert_same_files(d1, d2)
    assert {t.dtype for t in P.read_tensors(d1).values()} == {torch.bfloat16}


def test_live_model_still_trains_after_saving(live: PeftModel, tok: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    lorasave.save_pretrained_merged(live, tmp_path / "out", tokenizer=tok)
    trainable = {n: p.detach().clone() for n, p in live.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in live.named_parameters() if not p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.Adam([p for p in live.parameters() if p.requires_grad], lr=1e-2)
    live.train()
    ids = P.token_batch(P.VOCAB, torch.Generator().manual_seed(7))
    loss = live(input_ids=ids, labels=ids).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    params = dict(live.named_parameters())
    for n, t in trainable.items():
        assert params[n].grad is not None, f"{n} got no gradient"
        assert not torch.equal(params[n].detach(), t), f"{n} did not train"
    for n, t in frozen.items():
        assert torch.equal(params[n].detach(), t), f"frozen {n} changed"


def test_attach_binds_unsloth_style_method(live: PeftModel, llama_base: Path, tok: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    lorasave.attach(live)
    before = _snapshot(live)
    logits_before = _logits(live)

    # save_method="lora": a PEFT adapter with the live model's logits
    d3 = tmp_path / "lora"
    live.save_pretrained_merged(d3, tok, save_method="lora")  # type: ignore[operator]
    _assert_unchanged(live, before, logits_before)
    assert (d3 / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, d3).eval()
    P.assert_logits_match(P.logits(reloaded, P.eval_inputs("llama")), logits_before)

    # default save_method: the merged checkpoint, as lorasave.merge writes it
    d4 = tmp_path / "merged"
    live.save_pretrained_merged(d4, tok)  # type: ignore[operator]
    _assert_unchanged(live, before, logits_before)
    _assert_same_files(d4, _reference_merge(live, llama_base, tmp_path))
    assert AutoTokenizer.from_pretrained(d4).get_vocab() == tok.get_vocab()
