"""Independent per-tensor recomputations behind ``lorasave verify`` (tensors level and GGUF outputs).

Nothing here reuses the merge path (``merge_math`` / ``plan``): each recipe is restated from
PEFT's definition and checked against the written tensor.

- LoRA: ``W'·x`` against ``W0·x + s·B(A·x)`` for random ``x`` (factors applied to vectors).
- DoRA: ``W' = m / ||W0 + s·BA|| ⊙ (W0 + s·BA)``, the norm per output row (Linear, conv) or per
  column of the stored matrix (GPT-2 Conv1D, embeddings); the norms are computed here block by
  block of rows/columns from ``W0`` and the factors, then the LoRA probe is scaled by them.
- IA3: ``W' = W0 ⊙ l`` element by element.
- full replacements (``modules_to_save``): bit-exact equal to the adapter tensor cast.
- bitsandbytes bases: ``W0`` dequantized with bitsandbytes, then as above.
- GGUF (``verify_gguf``): float tensors read back with gguf-py, dequantized, renamed and
  un-permuted, then probed with a bound for the GGML type (F32/F16/BF16: one rounding; Q8_0: half a quantization step per element,
  from the block's absmax / 127, plus the step's own F16 rounding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

PROBES = 4  # random vectors per tensor
TINY = 2.0**-24  # absolute floor of one rounding: float16's smallest subnormal
BLOCK = 256  # rows / columns per block when computing DoRA norms


@dataclass
class Expect:
    """What one output tensor should be.

    Attributes:
        kind: ``"lora"``, ``"dora"``, ``"ia3"``, ``"replace"``, ``"base"`` or ``"skip"``.
        terms: ``[(adapter, ModuleParts, scaling)]`` for lora / dora / ia3.
        replace: ``(adapter, key)`` of the full tensor that replaces the base (or is the new base).
        reason: why a ``"skip"`` tensor is not probed.
    """

    kind: str
    terms: list[tuple[Any, Any, float]] = field(default_factory=list)
    replace: tuple[Any, str] | None = None
    reason: str = ""


LORA_KEYS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"}


def expectations(ads: list[Any], weights: list[float]) -> dict[str, Expect]:
    """Tensor name -> :class:`Expect` for every tensor an adapter touches (others: the base)."""
    from lorasave.sources.adapter import TunerType

    exp: dict[str, Expect] = {}

    def add(name: str, kind: str, term: tuple[Any, Any, float]) -> None:
        e = exp.get(name)
        if e is None:
            exp[name] = Expect(kind, [term])
        elif e.kind == kind == "lora":
            e.terms.append(term)
        elif e.kind == "replace":  # the adapter carries the (resized) base of this module
            exp[name] = Expect(kind, [term], replace=e.replace)
        elif e.kind != "skip":
            exp[name] = Expect("skip", reason=f"{e.kind} and {kind} from several adapters on one tensor not probed")

    for i, ad in enumerate(ads):
        for name, key in ad.extra.items():
            if name in exp:
                exp[name] = Expect("skip", reason="replaced by several adapters")
            else:
                exp[name] = Expect("replace", replace=(ad, key))
        for module, part in ad.parts.items():
            keys = set(part.keys)
            wname = f"{module}.weight"
            if "lora_B.bias" in keys:
                exp[f"{module}.bias"] = Expect("skip", reason="lora_bias not probed")
                keys.discard("lora_B.bias")
            if ad.tuner is TunerType.LORA and part.is_lora and keys <= LORA_KEYS:
                add(wname, "lora", (ad, part, part.scaling * weights[i]))
            elif ad.tuner is TunerType.LORA and part.is_lora and keys <= LORA_KEYS | {"lora_magnitude_vector"}:
                add(wname, "dora" if weights[i] == 1.0 else "skip", (ad, part, part.scaling))
                if exp[wname].kind == "skip" and not exp[wname].reason:
                    exp[wname].reason = "weighted DoRA not probed"
            elif ad.tuner is TunerType.IA3 and keys == {"ia3_l"} and weights[i] == 1.0:
                add(wname, "ia3", (ad, part, 1.0))
                exp.setdefault(f"{module}.bias", Expect("skip", reason="IA3 bias scaling not probed"))
            else:
                exp[wname] = Expect("skip", reason=f"{ad.tuner.value} recipe not probed ({', '.join(sorted(part.keys))})")
    for name, e in exp.items():
        if e.kind in ("lora", "dora", "ia3") and name in {n for ad in ads for n in ad.extra}:
            e.replace = next((ad, ad.extra[name]) for ad in ads if name in ad.extra)
        if e.kind in ("dora", "ia3") and len(e.terms) > 1:
            exp[name] = Expect("skip", reason=f"{e.kind} from several adapters not probed")
    return exp


def base_tensor(ckpt: Any, name: str, reader: Any) -> torch.Tensor:
    """The base's tensor; a quantized weight dequantized to float32 (bitsandbytes by bitsandbytes, FP8 with its scales)."""
    from lorasave.formats.quant_bases import QUANTIZED_TYPES, dequantize

    entry = ckpt.tensors[name]
    if isinstance(entry, QUANTIZED_TYPES):
        return dequantize(entry, reader.read)
    return reader.read(entry)


def _factors(ad: Any, part: Any, reader: Any, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, R)`` with the stored delta ``= L @ R``: ``B @ A``, or ``A.T @ B.T`` when transposed."""
    a = ad.tensor(part.lora_A, reader).float()
    b = ad.tensor(part.lora_B, reader).float()
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    return (a.T, b.T) if transposed else (b, a)


def dora_norms(w0: torch.Tensor, left: torch.Tensor, right: torch.Tensor, s: float, per_column: bool) -> torch.Tensor:
    """``||W0 + s·L@R||`` per row (or per column), a block of rows (columns) at a time, in float64."""
    w0 = w0.double()
    left, right = left.double(), right.double()
    if per_column:
        return torch.cat([(w0[:, j : j + BLOCK] + s * (left @ right[:, j : j + BLOCK])).norm(dim=0) for j in range(0, w0.shape[1], BLOCK)])
    return torch.cat([(w0[i : i + BLOCK] + s * (left[i : i + BLOCK] @ right)).norm(dim=1) for i in range(0, w0.shape[0], BLOCK)])


def probe(
    w1f: torch.Tensor, w0: torch.Tensor, exp: Expect, transposed_of: Any, reader: Any, gen: torch.Generator, err_elem: torch.Tensor | float, rel: float
) -> float:
    """``max |W'·x − y| / bound`` for a LoRA or DoRA tensor (≤ 1 passes).

    Args:
        w1f: the written tensor as float32, ``(rows, cols)``.
        w0: the base tensor as float32, ``(rows, cols)``.
        exp: a ``"lora"`` or ``"dora"`` expectation.
        transposed_of: ``part -> bool``, whether the stored weight is ``(in, out)`` / ``(vocab, dim)``.
        err_elem: per-element error bound of ``w1f`` (a tensor like it, or a relative eps).
        rel: relative slack for float32 accumulation (and DoRA's norms).
    """
    x = torch.randn(w0.shape[1], PROBES, generator=gen)
    col = torch.ones(w0.shape[1], 1)
    row = torch.ones(w0.shape[0], 1)
    factors = []
    for ad, part, s in exp.terms:
        transposed = transposed_of(part)
        left, right = _factors(ad, part, reader, transposed)
        factors.append((left, right, s))
        if exp.kind == "dora":
            m = ad.tensor(part.keys["lora_magnitude_vector"], reader).float().reshape(-1, 1)
            g = m / dora_norms(w0, left, right, s, per_column=transposed).float().reshape(-1, 1)
            if transposed:
                col = g
            else:
                row = g
    xs = col * x
    y = w0 @ xs
    extra = w0.abs() @ xs.abs()
    for left, right, s in factors:
        y = y + s * (left @ (right @ xs))
        extra = extra + abs(s) * (left.abs() @ (right.abs() @ xs.abs()))
    y = row * y
    extra = row.abs() * extra
    if isinstance(err_elem, torch.Tensor):
        rounding = err_elem @ x.abs()
    else:
        rounding = err_elem * (w1f.abs() @ x.abs()) + TINY * x.abs().sum(0)
    bound = rounding + rel * extra + 1e-30
    return float((((w1f @ x) - y).abs() / bound).max())


def ia3_error(w1: torch.Tensor, w0: torch.Tensor, exp: Expect, transposed: bool, reader: Any, eps: float) -> float:
    """``max |W' − W0 ⊙ l| / (2·eps·|W0 ⊙ l|)`` element by element (≤ 1 passes)."""
    ad, part, _ = exp.terms[0]
    lvec = ad.tensor(part.keys["ia3_l"], reader).float()
    if transposed and lvec.dim() == 2:
        lvec = lvec.T
    want = w0.float() * lvec
    bound = 2 * eps * want.abs() + 1e-30
    return float(((w1.float() - want).abs() / bound).max())


# ----------------------------------------------------------------------------- GGUF


def ggml_eps(qtype: Any) -> float | None:
    """Relative rounding of a float GGML type, or None for a block-quantized one."""
    import gguf

    Q = gguf.GGMLQuantizationType
    return {Q.F32: 2.0**-23, Q.F16: 2.0**-10, Q.BF16: 2.0**-7}.get(qtype)


def q8_0_error(w: torch.Tensor) -> torch.Tensor:
    """Per-element error bound of a Q8_0 tensor, from its dequantized values.

    Each block of 32 has ``d = absmax/127`` (stored as F16) and ``q = round(x / d)``; the decoded
    ``q·d16`` is within ``d/2 + 127·|d − d16|`` ≤ ``(0.5 + 127·2⁻¹¹)·d`` of ``x``, and the largest
    ``|q|`` is 127, so ``absmax(decoded) / 127`` is ``d16``. A margin of 10% covers ``d`` vs ``d16``.
    """
    rows = w.reshape(-1, 32).abs()
    d = rows.amax(dim=1, keepdim=True) / 127
    return (d * (0.5 + 127 * 2.0**-11) * 1.1).expand_as(rows).reshape(w.shape)


#: Block types with one scale (and for ``_1`` types a minimum) per 32 values: GGML type name ->
#: (steps between the lowest and highest code, error in steps). ``Q4_0``/``Q5_0``: ``d = max/-8``
#: (``/-16``), codes ``-8..7`` (``-16..15``), so the value at the far end of the max may clip by
#: one step; ``Q4_1``/``Q5_1``: ``d = (max - min)/15`` (``/31``), codes ``0..15`` (``0..31``),
#: round to nearest (gguf-py ``quants.py``, ggml ``quantize_row_q4_0_ref`` and friends).
BLOCK_TYPES: dict[str, tuple[int, float]] = {"Q4_0": (15, 1.0), "Q5_0": (31, 1.0), "Q4_1": (15, 0.5), "Q5_1": (31, 0.5)}


def block_error(w: torch.Tensor, qtype_name: str) -> torch.Tensor | None:
    """Per-element error bound of a Q4_0/Q4_1/Q5_0/Q5_1 tensor from its dequantized values, or None.

    A block's step ``d`` is its decoded range over the number of steps between the extreme codes
    (for ``_0`` types the decoded range spans at least ``steps`` steps minus the clipped one, so
    ``range / (steps - 1)`` bounds ``d``); the error is ``k·d`` plus the F16 rounding of the
    stored scale and minimum (``2⁻¹¹`` relative, times the largest code), with a 10% margin.
    """
    if qtype_name not in BLOCK_TYPES:
        return None
    steps, k = BLOCK_TYPES[qtype_name]
    rows = w.reshape(-1, 32)  # (n_blocks, 32)
    hi, lo = rows.amax(dim=1, keepdim=True), rows.amin(dim=1, keepdim=True)
    d = (hi - lo) / (steps - 1)
    absmax = torch.maximum(hi.abs(), lo.abs())
    bound = (k * d + (steps + 1) * 2.0**-11 * (d + absmax)) * 1.1 + TINY
    return bound.expand_as(rows).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's ``LlamaModel.permute``: interleaved pairs -> rotate-half rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def norm_shift(config: dict[str, Any], hf_name: str) -> float:
    """What GGUF export added to tensor ``hf_name`` (Gemma's RMSNorm ``+1``; ``gguf_arch.GgufArch.shift``), else 0."""
    from lorasave.formats.gguf.arch import gguf_arch_for

    return gguf_arch_for(config).shift(hf_name)
