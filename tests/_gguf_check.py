"""Shared proof for a GGUF architecture (issue 14): a tiny model with a trained adapter, exported by
``lorasave gguf``, run in llama.cpp (f32 KV cache) against transformers on the float32 merged checkpoint.

Use from a per-family test file::

    case = build_case(root, model, tok, LoraConfig(...))   # pretrains, trains the LoRA, merges, exports
    line = check_logits(case, "f32")                       # asserts f32; returns the printed line
    check_logits(case, "q8_0")                             # reported (top-1 printed), asserted >= 0.9

The reference is never lorasave's own numbers: logits come from transformers on the merged
checkpoint written by ``lorasave.merge`` in float32 (itself proven against the PeftModel), token ids
from the transformers tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

import lorasave
from _models import GGUF_CORPUS, train_lora
from lorasave.formats.gguf.export import GgufResult, export_gguf

#: At least 64 positions are compared (the issue's bar).
MIN_TOKENS = 64


@dataclass
class GgufCase:
    """One architecture's fixture: sources, the reference logits and the exports made so far."""

    kind: str
    root: Path
    base: Path
    lora: Path
    merged: Path
    ids: list[int]
    ref: np.ndarray  # float32 (n_tokens, vocab): transformers on the float32 merge
    results: dict[str, GgufResult] = field(default_factory=dict)

    def export(self, type: str) -> GgufResult:
        """``export_gguf(base, lora, type=type)``, once per type."""
        if type not in self.results:
            self.results[type] = export_gguf(self.base, self.lora, self.root / f"out-{type}", type=type, modelfile=False)
        return self.results[type]


def pretrain(model: torch.nn.Module, tok: Any, steps: int = 60, seq: int = 64) -> None:
    """A few full-model steps on the corpus: peaked logits, like a real model's (random ones are near ties)."""
    ids = torch.tensor([tok(GGUF_CORPUS * 4).input_ids[: seq * 4]]).reshape(4, seq)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def build_case(
    root: Path,
    kind: str,
    model: PreTrainedModel,
    tok: Any,
    lora: LoraConfig,
    *,
    pretrain_steps: int = 60,
    text: str = GGUF_CORPUS,
    n_tokens: int = 96,
    auto: Any = AutoModelForCausalLM,
) -> GgufCase:
    """Save ``model`` (after :func:`pretrain`) and ``tok`` as the base, train ``lora`` a few steps on it
    (``_models.train_lora``), merge in float32 with ``lorasave.merge`` and compute the reference logits
    of transformers on the merged checkpoint for the first ``n_tokens`` tokens of ``text`` (at least :data:`MIN_TOKENS`),
    loaded with ``auto`` (``AutoModelForImageTextToText`` for a multimodal checkpoint)."""
    base, adapter, merged = root / "base", root / "lora", root / "merged"
    if pretrain_steps:
        pretrain(model, tok, pretrain_steps)
    model.save_pretrained(base)
    tok.save_pretrained(base)
    peft_model = train_lora(model, lora, seed=3)
    peft_model.save_pretrained(adapter)
    lorasave.merge(base, adapter, merged, dtype="float32")
    ids = AutoTokenizer.from_pretrained(base)(text).input_ids[:n_tokens]
    assert len(ids) >= MIN_TOKENS, f"{len(ids)} tokens: give a longer text"
    hf = auto.from_pretrained(merged, dtype=torch.float32, trust_remote_code=False).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    return GgufCase(kind, root, base, adapter, merged, ids, ref)


def margin_top1(got: np.ndarray, ref: np.ndarray, tol: float) -> tuple[float, int]:
    """Top-1 agreement over the positions whose reference top-2 margin exceeds ``tol`` (elsewhere the
    order of two near-equal logits is within the tolerance), and how many positions count."""
    top2 = np.sort(ref, axis=-1)[:, -2:]
    keep = (top2[:, 1] - top2[:, 0]) > tol
    if not keep.any():
        return 1.0, 0
    return float((got.argmax(-1)[keep] == ref.argmax(-1)[keep]).mean()), int(keep.sum())


def check_logits(case: GgufCase, type: str, *, n_ctx: int = 256) -> str:
    """llama.cpp on ``case``'s ``type`` export vs the reference; f32: max|diff| <= 1e-3 * max|logit| and
    margin-aware top-1 100%; other types: reported, top-1 >= 0.9. Returns (and prints) the line the
    closing note quotes."""
    from lorasave.runtimes.llama_cpp.lib import LlamaCppModel

    with LlamaCppModel(case.export(type).gguf_file, n_ctx=n_ctx) as m:
        got = m.logits(case.ids)
    ref = case.ref
    assert got.shape == ref.shape, (got.shape, ref.shape)
    scale = float(np.abs(ref).max())
    diff = float(np.abs(got - ref).max())
    tol = 1e-3 * scale
    top1, n = margin_top1(got, ref, 2 * tol)
    line = f"{case.kind} {type}: max|diff| {diff:.3g} = {diff / scale:.2g} x max|logit|, top-1 {top1:.3f} over {n} of {len(case.ids)} tokens"
    print(line)
    if type == "f32":
        assert diff <= tol and top1 == 1.0, line
    else:
        assert top1 >= 0.9, line
    return line
