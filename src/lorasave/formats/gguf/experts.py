"""Mixture-of-experts tensors: which planned (HF) tensors make up each GGUF tensor.

llama.cpp keeps each layer's experts in one 3-D tensor per projection, ``blk.L.ffn_{gate,up,down}_exps``
of numpy shape ``(n_expert, rows, cols)``. Checkpoints hold them in one of two ways, and the converter
of llama.cpp v0.5.0 turns both into the same tensors:

* one tensor per expert (``mlp.experts.N.gate_proj.weight``, Mixtral's ``block_sparse_moe.experts.N.w1.weight``;
  what transformers 5 ``save_pretrained`` writes, reverting its load-time fusion): ``torch.stack`` in
  expert order (``Qwen2MoeModel.modify_tensors`` in ``conversion/qwen.py``, ``LlamaModel.modify_tensors``
  in ``conversion/llama.py``), mapped by gguf-py under the name without the expert index;
* transformers 5's fused parameters (``mlp.experts.gate_up_proj`` ``(E, 2 * n_ff, n_embd)``,
  ``mlp.experts.down_proj``): split and/or transposed per architecture (``arch.FusedExperts``).

Here no tensor is stacked in memory: a stacked GGUF tensor lists its experts' planned tensors as
:class:`~lorasave.formats.gguf.model.Piece` objects, and the writer encodes them one after the other
(expert ``k``'s rows land at row ``k * rows``); a fused tensor's row blocks (whole experts) are cut
into their parts as they arrive. The LoRA of an expert is merged into its planned tensor before that
(``plan.merge_plan``: per-expert modules, and PEFT ``target_parameters`` through transformers'
reverse weight conversion).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch.base import FusedExperts
from lorasave.plan.merge_plan import OutputTensor


@dataclass(frozen=True)
class Take:
    """One part of a fused expert tensor, as the converter cuts it (``FusedExperts``).

    Applied to row blocks of the stored tensor (the pass cuts a 3-D tensor along its first axis,
    so a block holds whole experts): ``x`` of shape ``(n, a, b)`` (or ``(n, a)`` for a bias) gives part
    ``part`` of ``parts`` equal parts along ``axis`` (contiguous, or every ``parts``-th element when
    ``interleaved``), with the last two axes swapped when ``transpose``.
    """

    part: int
    parts: int
    axis: int
    interleaved: bool = False
    transpose: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[self.axis] // self.parts
        cut = slice(self.part, None, self.parts) if self.interleaved else slice(self.part * n, (self.part + 1) * n)
        x = x[(slice(None),) * self.axis + (cut,)]
        return x.transpose(-1, -2) if self.transpose else x

    def shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        """The part's shape from the stored tensor's."""
        out = list(stored)
        out[self.axis] //= self.parts
        if self.transpose:
            out[-1], out[-2] = out[-2], out[-1]
        return tuple(out)


@dataclass(frozen=True)
class Piece:
    """One planned tensor's share of a GGUF tensor: all of it (``take`` None) or a part of a fused one.

    The pieces of a GGUF tensor are written one after the other: expert ``k`` of a stacked
    ``ffn_*_exps`` fills rows ``[k * rows, (k + 1) * rows)`` of its ``(n_expert * rows, ne0)`` data.
    """

    src: OutputTensor
    take: Take | None = None


#: ``<prefix>.experts.<k>.<name>.<weight|bias>``: one expert's tensor.
PER_EXPERT = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<k>\d+)\.(?P<rest>[^.]+\.(?:weight|bias))$")


@dataclass
class Source:
    """What one GGUF tensor is made of.

    Attributes:
        hf: the HF name gguf-py's ``TensorNameMap`` maps to its GGUF name.
        src: its first planned tensor.
        pieces: every piece in writing order, or empty for ``src`` as it is.
        shape: the written shape when ``pieces`` is set, else None (``src.shape``).
    """

    hf: str
    src: OutputTensor
    pieces: list[Piece | None] = field(default_factory=list)
    shape: tuple[int, ...] | None = None


def _fused_rule(name: str, fused: tuple[FusedExperts, ...]) -> FusedExperts | None:
    for f in fused:
        if name.endswith((f".{f.suffix}", f".{f.suffix}.weight")) or name in (f.suffix, f"{f.suffix}.weight"):
            return f
    return None


def gguf_sources(tensors: Iterable[tuple[str, OutputTensor]], fused: tuple[FusedExperts, ...], n_expert: int) -> list[Source]:
    """The GGUF tensors' sources, in the order of their first planned tensor.

    Args:
        tensors: ``(text-model name, planned tensor)`` in plan order (those the file leaves out
            already removed; the name is the tensor's own but for a multimodal checkpoint's
            language model: ``GgufArch.text_name``).
        fused: the architecture's fused expert tensors (``GgufArch.fused``).
        n_expert: experts per MoE layer (config ``num_experts``...), 0 for a dense model: no stacking.

    Raises:
        UnsupportedModelError: a layer's per-expert tensors are incomplete or differ in shape, or a
            fused tensor does not split into equal parts.
    """
    out: list[Source] = []
    stacks: dict[str, Source] = {}
    for text_name, t in tensors:
        m = PER_EXPERT.match(text_name) if n_expert else None
        if m is not None and int(m["k"]) < n_expert:
            hf = f"{m['prefix']}.experts.{m['rest']}"
            s = stacks.get(hf)
            if s is None:
                s = stacks[hf] = Source(hf, t, [None] * n_expert)
                out.append(s)
            s.pieces[int(m["k"])] = Piece(t)
            continue
        rule = _fused_rule(text_name, fused) if n_expert else None
        if rule is None:
            out.append(Source(text_name, t))
            continue
        prefix = text_name.removesuffix(".weight").removesuffix(rule.suffix)
        parts = len(rule.into)
        if len(t.shape) not in (2, 3) or t.shape[0] != n_expert:
            raise UnsupportedModelError(f"fused expert tensor {t.name} has shape {list(t.shape)}, not ({n_expert}, ...) for {n_expert} experts")
        axis = len(t.shape) - 1 if rule.transposed or len(t.shape) == 2 else 1
        if t.shape[axis] % parts:
            raise UnsupportedModelError(f"fused expert tensor {t.name} {list(t.shape)} does not split into {parts} equal parts")
        for i, into in enumerate(rule.into):
            take = Take(i, parts, axis, rule.interleaved, rule.transposed and len(t.shape) == 3)
            if parts == 1 and not take.transpose:
                out.append(Source(prefix + into, t, [Piece(t)], tuple(t.shape)))
            else:
                out.append(Source(prefix + into, t, [Piece(t, take)], take.shape(tuple(t.shape))))
    for hf, s in stacks.items():
        missing = [k for k, p in enumerate(s.pieces) if p is None]
        if missing:
            raise UnsupportedModelError(f"{hf}: the checkpoint has no tensor for expert {missing[0]} of {n_expert} ({len(missing)} missing)")
        shapes = {tuple(p.src.shape) for p in s.pieces if p is not None}
        if len(shapes) != 1:
            raise UnsupportedModelError(f"{hf}: the experts' tensors differ in shape ({sorted(shapes)}); they cannot be stacked")
        s.shape = (n_expert, *shapes.pop())
    return out
