"""The merge arithmetic: W' = W0 + sum_i scaling_i * (B_i @ A_i), one row block at a time.

Formula: Hu et al. 2021, "LoRA" (arXiv:2106.09685), eq. 3; PEFT ``lora.Linear.get_delta_weight``
(``peft/tuners/lora/layer.py``). For GPT-2 ``Conv1D`` weights, stored ``(in, out)``, the delta is
``(B @ A).T``.

Precision: W0, A and B are upcast to float32, the sum is formed in float32 and rounded once to
the output dtype. For a single adapter the result is bit-identical to
``(W0.float() + scaling * (B.float() @ A.float())).to(dtype)``: each row block computes
``W0_block + (B_block @ A) * scaling`` with the formula's three roundings (a fused
``addmm(alpha=scaling)`` differs unless scaling is a power of two), and the per-element dot
products over ``r`` of a row block are those of the full product (checked by the tests). Blocks of about
1 MiB of float32 keep the arithmetic cache-resident and memory bounded.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .adapter import Adapter
from .checkpoint import TensorReader
from .errors import NonFiniteResultError
from .plan import OutputTensor
from .quant.bnb import Bnb4bitWeight, Int8Weight, dequantize
from .safetensors_format import TensorEntry

#: Target bytes of one float32 row block of merge arithmetic.
MERGE_BLOCK_BYTES = 1 << 20
#: Target bytes of one block of a plain copy or cast.
COPY_BLOCK_BYTES = 16 << 20


@dataclass
class Timings:
    """Seconds spent per phase of the execution.

    Attributes:
        read: reading base and adapter bytes.
        merge: arithmetic (upcasts, addmm, rounding, finiteness checks).
        write: file writes.
        hash: sha256 of the written bytes.
    """

    read: float = 0.0
    merge: float = 0.0
    write: float = 0.0
    hash: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """Rounded to milliseconds."""
        return {k: round(v, 3) for k, v in vars(self).items()}


def _rows_per_block(t: OutputTensor, block_bytes: int, itemsize: int) -> int:
    row_elems = 1
    for d in t.shape[1:]:
        row_elems *= d
    return max(1, block_bytes // max(1, row_elems * itemsize))


def _as_bytes(x: torch.Tensor) -> memoryview:
    # (n, ...) any dtype -> flat bytes; x is contiguous
    return memoryview(x.reshape(-1).view(torch.uint8).numpy()).cast("B")


class _Rows:
    """Row slices of a planned tensor's starting value W0.

    A plain base tensor is read slice by slice from disk, in its stored dtype. A bitsandbytes
    weight, or a weight round-tripped through 4-bit (``merge_into="dequantized"``), is
    dequantized whole to float32 once (one tensor in memory) and sliced.
    """

    def __init__(self, t: OutputTensor, reader: TensorReader, timings: Timings) -> None:
        self._reader = reader
        self._src = t.source
        self._full: torch.Tensor | None = None
        self._buf: torch.Tensor | None = None
        t0 = time.perf_counter()
        if isinstance(t.source, (Bnb4bitWeight, Int8Weight)):
            self._full = dequantize(t.source, reader.read)  # float32, t.shape
        elif t.roundtrip is not None:
            self._full = t.roundtrip.roundtrip(reader.read(t.source))  # float32, t.shape
        timings.read += time.perf_counter() - t0

    @property
    def float32(self) -> bool:
        """Whether slices come out as float32 (dequantized) rather than the stored dtype."""
        return self._full is not None

    def get(self, start: int, stop: int, reuse: bool) -> torch.Tensor:
        """Rows ``[start, stop)``; with ``reuse`` the result may share a buffer with the previous slice."""
        if self._full is not None:
            return self._full[start:stop]
        assert isinstance(self._src, TensorEntry)
        w = self._reader.read(self._src, start, stop, out=self._buf if reuse else None)
        if reuse and self._buf is None:
            self._buf = w
        return w


def _merged_blocks(t: OutputTensor, reader: TensorReader, adapters: list[Adapter], timings: Timings) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, block)``: rows of W0 + sum of the LoRA terms, in float32.

    Each block is ``(stop - start, *shape[1:])``; it is only valid until the next one is requested.
    """
    t0 = time.perf_counter()
    factors = []
    for d in t.deltas:
        ad = adapters[d.adapter]
        a = ad.tensor(d.weights.lora_A, reader).float()  # (r, in)
        b = ad.tensor(d.weights.lora_B, reader).float()  # (out, r)
        if d.transpose:
            # W0 rows are input features: block = A[:, rows].T @ B.T -> (rows, out)
            factors.append((a.T.contiguous(), b.T.contiguous(), d.weights.scaling))  # (in, r), (r, out)
        else:
            factors.append((b, a, d.weights.scaling))  # (out, r), (r, in)
    timings.read += time.perf_counter() - t0
    rows_src = _Rows(t, reader, timings)
    rows = t.shape[0] if t.shape else 1
    step = _rows_per_block(t, MERGE_BLOCK_BYTES, 4)
    for i in range(0, rows, step):
        j = min(rows, i + step)
        t0 = time.perf_counter()
        w = rows_src.get(i, j, reuse=True)  # consumed below before the next read
        t1 = time.perf_counter()
        acc = w.float()  # (rows_blk, cols) float32
        for left, right, scaling in factors:
            # acc + scaling * (left_blk @ right), as three roundings in the formula's order: a fused
            # addmm(alpha=scaling) rounds differently unless scaling is a power of two
            acc = acc + torch.mm(left[i:j], right).mul_(scaling)  # (rows_blk, r) @ (r, cols)
        timings.read += t1 - t0
        timings.merge += time.perf_counter() - t1
        yield i, j, acc


def _check_finite(t: OutputTensor, res: torch.Tensor, i: int, j: int) -> None:
    # a NaN/Inf anywhere makes the float32 sum non-finite (cheap); confirm exactly before failing
    if not torch.isfinite(res.sum(dtype=torch.float32)) and not torch.isfinite(res).all():
        raise NonFiniteResultError(
            f"merged tensor {t.name} has NaN or Inf values (rows {i}-{j}); the adapter weights are broken "
            "or the result overflows the output dtype (try --dtype float32 or bfloat16)",
            tensor=t.name,
        )


def stream_tensor(t: OutputTensor, reader: TensorReader, adapters: list[Adapter], timings: Timings) -> Iterator[memoryview]:
    """Yield the bytes of output tensor ``t`` in row blocks, in the output dtype.

    Args:
        t: the planned output tensor (shape ``(rows, ...)``, dtype ``t.dtype``).
        reader: reads base bytes.
        adapters: the adapters the plan's deltas and replacements index into.
        timings: accumulates read and merge seconds.

    Raises:
        NonFiniteResultError: a merged value is NaN or Inf (after rounding to the output dtype).
    """
    out_dt = t.dtype.torch_dtype
    assert out_dt is not None
    if t.replacement is not None:
        t0 = time.perf_counter()
        full = adapters[t.replacement.adapter].tensor(t.replacement.key, reader)
        t1 = time.perf_counter()
        res = full.to(out_dt).contiguous()
        timings.read += t1 - t0
        timings.merge += time.perf_counter() - t1
        yield _as_bytes(res)
        return
    if t.deltas:
        for i, j, acc in _merged_blocks(t, reader, adapters, timings):
            t0 = time.perf_counter()
            res = acc.to(out_dt)
            _check_finite(t, res, i, j)
            timings.merge += time.perf_counter() - t0
            yield _as_bytes(res)
        return
    rows_src = _Rows(t, reader, timings)
    rows = t.shape[0] if t.shape else 1
    itemsize = 4 if rows_src.float32 else max(1, t.source.dtype.bits // 8)
    step = _rows_per_block(t, COPY_BLOCK_BYTES, itemsize)
    same = not rows_src.float32 and t.source.dtype is t.dtype
    for i in range(0, max(rows, 1), step):
        t0 = time.perf_counter()
        blk = rows_src.get(i, min(rows, i + step), reuse=False)  # a fresh buffer: it is written behind
        t1 = time.perf_counter()
        timings.read += t1 - t0
        if not same:
            blk = blk.to(out_dt).contiguous()
            timings.merge += time.perf_counter() - t1
        yield _as_bytes(blk)


def quantized_tensors(t: OutputTensor, reader: TensorReader, adapters: list[Adapter], timings: Timings) -> dict[str, torch.Tensor]:
    """The tensors a 4-bit output writes for ``t``: its merged float32 value quantized once.

    Args:
        t: an output tensor with ``t.quantize`` set (a Linear weight ``(out, in)``).

    Returns:
        ``{name: packed codes, name + ".absmax": ..., ...}`` as transformers serializes
        bitsandbytes 4-bit weights (``Bnb4bitSpec.serialized``).

    Raises:
        NonFiniteResultError: NaN or Inf in the merged weight.
    """
    assert t.quantize is not None and t.dtype.torch_dtype is not None
    full = torch.empty(t.shape, dtype=torch.float32)  # (out, in): the whole merged weight
    if t.deltas:
        for i, j, acc in _merged_blocks(t, reader, adapters, timings):
            _check_finite(t, acc, i, j)
            full[i:j] = acc
    else:
        rows_src = _Rows(t, reader, timings)
        full.copy_(rows_src.get(0, t.shape[0], reuse=False))
    t0 = time.perf_counter()
    out = t.quantize.serialized(t.name, full, t.dtype.torch_dtype)
    timings.merge += time.perf_counter() - t0
    return out
