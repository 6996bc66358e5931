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

import collections
import itertools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from lorasave.errors import NonFiniteResultError
from lorasave.formats.quant_bases import QUANTIZED_TYPES, dequantize
from lorasave.formats.safetensors.header import TensorEntry
from lorasave.plan.merge_plan import OutputTensor
from lorasave.plan.recipes import AdapterTensor, Axis, DoraNorm, ExpertDelta, LoraDelta, Lycoris, LycorisDelta, Operation, Scale, SetRows, VectorDelta
from lorasave.sources.adapter import Adapter
from lorasave.sources.checkpoint import MemoryEntry, TensorReader

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

    def add(self, other: Timings) -> Timings:
        """Add ``other``'s seconds, phase by phase, to these; returns self (a writer's into its job's...)."""
        for phase, seconds in vars(other).items():
            setattr(self, phase, getattr(self, phase) + seconds)
        return self

    def as_dict(self) -> dict[str, float]:
        """Rounded to milliseconds."""
        return {k: round(v, 3) for k, v in vars(self).items()}


@dataclass
class ExecContext:
    """What the arithmetic needs besides the plan's recipe.

    Attributes:
        reader: reads base and adapter bytes.
        adapters: the adapters recipes index into.
        timings: accumulates seconds per phase.
        converter: runtime -> checkpoint tensors, for ``ExpertDelta``.
        expert_cache: the last runtime-parameter deltas, converted (siblings reuse them).
        pool: worker threads that compute merged blocks ahead, in order (``pipeline.threads``);
            None computes them here.
        workers: the pool's threads.
    """

    reader: TensorReader
    adapters: list[Adapter]
    timings: Timings
    converter: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    expert_cache: dict[tuple[int, str], dict[str, torch.Tensor]] = field(default_factory=dict)
    pool: ThreadPoolExecutor | None = None
    workers: int = 1

    def expert_delta(self, op: ExpertDelta) -> torch.Tensor:
        """The piece of ``ΔP`` (float32, weight applied) that checkpoint tensor ``op.target`` receives."""
        key = (op.adapter, op.param)
        if key not in self.expert_cache:
            assert self.converter is not None
            ad = self.adapters[op.adapter]
            experts = op.shape[0]
            a = ad.tensor(op.lora_A, self.reader).float()  # (E*r, in), experts slowest
            b = ad.tensor(op.lora_B, self.reader).float()  # (out, r*E), experts fastest
            a = a.reshape(experts, -1, a.shape[-1])  # (E, r, in)
            b = b.reshape(b.shape[0], -1, experts)  # (out, r, E)
            pattern = "o r e, e r i -> e i o" if op.transposed else "o r e, e r i -> e o i"
            delta = torch.einsum(pattern, b, a) * op.scaling  # (E, out, in) or (E, in, out)
            if op.weight != 1.0:
                delta = delta * op.weight
            self.expert_cache.clear()  # one parameter's pieces at a time: bounded memory
            # a checkpoint that stores the parameter itself (fused experts) takes the delta as it is
            self.expert_cache[key] = {op.param: delta} if op.target == op.param else self.converter({op.param: delta})
        return self.expert_cache[key][op.target]


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

    A plain base tensor is read slice by slice from disk, in its stored dtype. A quantized base
    weight (bitsandbytes, FP8), or a weight round-tripped through 4-bit (``merge_into="dequantized"``), is
    dequantized whole to float32 once (one tensor in memory) and sliced; a tensor saved in an
    adapter is loaded whole.
    """

    def __init__(self, t: OutputTensor, ctx: ExecContext) -> None:
        reader, adapters, timings = ctx.reader, ctx.adapters, ctx.timings
        self._reader = reader
        self._src = t.source
        self._full: torch.Tensor | None = None
        self._buf: torch.Tensor | None = None
        self.float32 = False  # whether slices come out as float32 rather than the stored dtype
        t0 = time.perf_counter()
        if isinstance(t.source, QUANTIZED_TYPES):
            self._full, self.float32 = dequantize(t.source, reader.read), True  # float32, t.shape
        elif isinstance(t.source, AdapterTensor):
            self._full = adapters[t.source.adapter].tensor(t.source.key, reader)
        elif t.roundtrip is not None:
            self._full, self.float32 = t.roundtrip.roundtrip(reader.read(t.source)), True  # float32, t.shape
        timings.read += time.perf_counter() - t0

    def get(self, start: int, stop: int, reuse: bool) -> torch.Tensor:
        """Rows ``[start, stop)``; with ``reuse`` the result may share a buffer with the previous slice."""
        if self._full is not None:
            return self._full[start:stop]
        assert isinstance(self._src, (TensorEntry, MemoryEntry))
        w = self._reader.read(self._src, start, stop, out=self._buf if reuse else None)
        if reuse and self._buf is None:
            self._buf = w
        return w


def _lycoris_delta(op: LycorisDelta, ad: Adapter, reader: TensorReader, shape: tuple[int, ...]) -> torch.Tensor:
    """The whole ΔW of a LoHa / LoKr module in float32, reshaped to ``shape`` (weight applied)."""
    f = {role: ad.tensor(key, reader).float() for role, key in op.keys}
    scale = torch.tensor(op.scaling, dtype=torch.float32)
    if op.kind is Lycoris.LOHA:
        # (w1a (out, r) @ w1b (r, in)) * (w2a @ w2b) * scale
        delta = ((f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])) * scale
    else:
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]  # (a, b) -> (a, b, 1, 1) to kron with a conv kernel
        delta = torch.kron(w1, w2) * scale
    delta = delta.reshape(shape)  # (out, in[, k, k]) as the base weight
    return delta * op.weight if op.weight != 1.0 else delta


class _Ops:
    """The operations of one output tensor, with their factors loaded once (float32)."""

    def __init__(self, t: OutputTensor, ctx: ExecContext) -> None:
        reader, adapters = ctx.reader, ctx.adapters
        self.items: list[tuple[Operation, tuple[torch.Tensor, ...]]] = []
        self.whole = any(isinstance(o, DoraNorm) and o.axis is Axis.COLS for o in t.ops)
        for op in t.ops:
            ad = adapters[op.adapter]
            if isinstance(op, LoraDelta):
                a = ad.tensor(op.lora_A, reader).float()
                b = ad.tensor(op.lora_B, reader).float()
                a = a.reshape(a.shape[0], -1)  # (r, in) ; conv (r, in, kh, kw) -> (r, in*kh*kw)
                b = b.reshape(b.shape[0], -1)  # (out, r); conv (out, r, 1, 1) -> (out, r)
                if op.transpose:
                    # W0 rows are input features (Conv1D) or vocabulary rows (embedding): block = A[:, rows].T @ B.T
                    self.items.append((op, (a.T.contiguous(), b.T.contiguous())))  # (in, r), (r, out)
                else:
                    self.items.append((op, (b, a)))  # (out, r), (r, in)
            elif isinstance(op, LycorisDelta):
                self.items.append((op, (_lycoris_delta(op, ad, reader, t.shape),)))
            elif isinstance(op, (VectorDelta, Scale, DoraNorm)):
                self.items.append((op, (ad.tensor(op.key, reader).float().reshape(-1),)))
            elif isinstance(op, SetRows):
                self.items.append((op, (ad.tensor(op.key, reader).float(),)))
            elif isinstance(op, ExpertDelta):
                self.items.append((op, (ctx.expert_delta(op).reshape(t.shape),)))

    def apply(self, acc: torch.Tensor, i: int, j: int, *, skip_cols_norm: bool) -> torch.Tensor:
        """Apply every operation to rows ``[i, j)``: ``acc`` is ``(j - i, *shape[1:])`` float32."""
        for op, f in self.items:
            if isinstance(op, LoraDelta):
                left, right = f
                flat = acc.reshape(acc.shape[0], -1)  # (rows_blk, cols)
                # acc + scaling * (left_blk @ right), as three roundings in the formula's order: a fused
                # addmm(alpha=scaling) rounds differently unless scaling is a power of two
                d = torch.mm(left[i:j], right).mul_(op.scaling)  # (rows_blk, r) @ (r, cols)
                if op.weight != 1.0:
                    d.mul_(op.weight)
                acc = (flat + d).reshape(acc.shape)
            elif isinstance(op, (LycorisDelta, ExpertDelta)):
                acc = acc + f[0][i:j]
            elif isinstance(op, VectorDelta):
                v = f[0][i:j] * op.scaling
                acc = acc + (v * op.weight if op.weight != 1.0 else v)
            elif isinstance(op, Scale):
                if op.axis is Axis.ROWS:
                    acc = acc * f[0][i:j].reshape(-1, *([1] * (acc.dim() - 1)))
                else:
                    acc = acc * f[0].reshape(1, -1)
            elif isinstance(op, SetRows):
                for k, row in enumerate(op.indices):
                    if i <= row < j:
                        acc[row - i] = f[0][k]
            elif isinstance(op, DoraNorm):
                if op.axis is Axis.ROWS:
                    norm = torch.linalg.norm(acc.reshape(acc.shape[0], -1), dim=1)  # (rows_blk,)
                    acc = (f[0][i:j] / norm).reshape(-1, *([1] * (acc.dim() - 1))) * acc
                elif not skip_cols_norm:
                    raise AssertionError("column DoRA norms need the whole tensor")
        return acc

    def finish_whole(self, full: torch.Tensor) -> torch.Tensor:
        """Column DoRA norms over the whole ``(rows, cols)`` tensor (GPT-2 Conv1D, embeddings)."""
        for op, f in self.items:
            if isinstance(op, DoraNorm) and op.axis is Axis.COLS:
                norm = torch.linalg.norm(full, dim=0)  # (cols,): over in-features / the vocabulary
                full = (f[0] / norm).reshape(1, -1) * full
        return full


def _merged_blocks(t: OutputTensor, ctx: ExecContext) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, block)``: rows of W0 with every operation applied, in float32.

    Each block is ``(stop - start, *shape[1:])``; it is only valid until the next one is requested.
    """
    timings = ctx.timings
    t0 = time.perf_counter()
    ops = _Ops(t, ctx)
    timings.read += time.perf_counter() - t0
    rows_src = _Rows(t, ctx)
    rows = t.shape[0] if t.shape else 1
    step = _rows_per_block(t, MERGE_BLOCK_BYTES, 4)
    full = torch.empty(t.shape, dtype=torch.float32) if ops.whole else None  # whole tensor only for column norms
    if ctx.pool is not None and full is None and rows > step:
        yield from _pooled_blocks(t, ctx, ops, rows_src, rows, step)
        return
    for i in range(0, rows, step):
        j = min(rows, i + step)
        t0 = time.perf_counter()
        w = rows_src.get(i, j, reuse=True)  # consumed below before the next read
        t1 = time.perf_counter()
        acc = ops.apply(w.float().reshape((j - i, *t.shape[1:])), i, j, skip_cols_norm=ops.whole)
        timings.read += t1 - t0
        timings.merge += time.perf_counter() - t1
        if full is None:
            yield i, j, acc
        else:
            full[i:j] = acc
    if full is not None:
        t1 = time.perf_counter()
        full = ops.finish_whole(full)
        timings.merge += time.perf_counter() - t1
        for i in range(0, rows, step):
            yield i, min(rows, i + step), full[i : i + step]


def _pooled_blocks(t: OutputTensor, ctx: ExecContext, ops: _Ops, rows_src: _Rows, rows: int, step: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``_merged_blocks`` on ``ctx.pool``: up to two blocks per worker computed ahead, yielded in row order.

    Each block reads its rows into a buffer of its own; the arithmetic is the sequential path's, so
    the values do not depend on the number of workers.
    """
    assert ctx.pool is not None
    timings = ctx.timings

    def one(i: int, j: int) -> torch.Tensor:
        t0 = time.perf_counter()
        w = rows_src.get(i, j, reuse=False)
        t1 = time.perf_counter()
        acc = ops.apply(w.float().reshape((j - i, *t.shape[1:])), i, j, skip_cols_norm=False)
        timings.read += t1 - t0
        timings.merge += time.perf_counter() - t1
        return acc

    starts = iter(range(0, rows, step))
    ahead = 2 * max(1, ctx.workers)
    pending: collections.deque[tuple[int, int, Future[torch.Tensor]]] = collections.deque()

    def submit(i: int) -> None:
        j = min(rows, i + step)
        pending.append((i, j, ctx.pool.submit(one, i, j)))  # type: ignore[union-attr]

    try:
        for i in itertools.islice(starts, ahead):
            submit(i)
        while pending:
            i, j, fut = pending.popleft()
            nxt = next(starts, None)
            if nxt is not None:
                submit(nxt)
            yield i, j, fut.result()
    finally:  # a failure or a closed generator: drop what was computed ahead
        for _, _, fut in pending:
            fut.cancel()


def check_finite(t: OutputTensor, res: torch.Tensor, i: int, j: int) -> None:
    """Raises NonFiniteResultError when rows ``[i, j)`` of ``t`` hold a NaN or Inf."""
    # a NaN/Inf anywhere makes the float32 sum non-finite (cheap); confirm exactly before failing
    if not torch.isfinite(res.sum(dtype=torch.float32)) and not torch.isfinite(res).all():
        raise NonFiniteResultError(
            f"merged tensor {t.name} has NaN or Inf values (rows {i}-{j}); the adapter weights are broken "
            "or the result overflows the output dtype (try --dtype float32 or bfloat16)",
            tensor=t.name,
        )


@dataclass(frozen=True)
class Block:
    """Rows ``[start, stop)`` of one tensor's value, as the pass hands them to every output.

    Attributes:
        values: ``(stop - start, *shape[1:])``. When ``merged``: float32 W0 + Σ ΔW, valid only until
            the next block is requested (consume or copy it at once). Otherwise the starting value
            unchanged, in its stored dtype (float32 when ``float32``: a dequantized or adapter-saved
            tensor), a fresh buffer that may be kept.
        merged: an adapter changed the tensor (the values are the float32 merge).
        float32: unchanged values that come out as float32 rather than the stored dtype.
    """

    start: int
    stop: int
    values: torch.Tensor
    merged: bool
    float32: bool = False


def tensor_blocks(t: OutputTensor, ctx: ExecContext) -> Iterator[Block]:
    """Yield the value of planned tensor ``t`` in row blocks, read and merged once for every output.

    A changed tensor comes in float32 blocks of about ``MERGE_BLOCK_BYTES``; an unchanged one in
    blocks of about ``COPY_BLOCK_BYTES`` of its stored dtype. The block boundaries depend only on
    the tensor (never on the outputs), so each output's bytes are those of a run that writes it alone.
    """
    if t.ops:
        for i, j, acc in _merged_blocks(t, ctx):
            yield Block(i, j, acc, True)
        return
    timings = ctx.timings
    rows_src = _Rows(t, ctx)
    rows = t.shape[0] if t.shape else 1
    itemsize = 4 if rows_src.float32 else max(1, t.source.dtype.bits // 8)
    step = _rows_per_block(t, COPY_BLOCK_BYTES, itemsize)
    for i in range(0, max(rows, 1), step):
        t0 = time.perf_counter()
        blk = rows_src.get(i, min(rows, i + step), reuse=False)  # a fresh buffer: it may be written behind
        timings.read += time.perf_counter() - t0
        yield Block(i, min(rows, i + step), blk, False, rows_src.float32)


def output_bytes(t: OutputTensor, block: Block, timings: Timings) -> memoryview:
    """One block of ``t`` in its output dtype ``t.dtype``, as bytes (a buffer the caller may keep).

    Raises:
        NonFiniteResultError: a merged value is NaN or Inf after rounding to the output dtype.
    """
    out_dt = t.dtype.torch_dtype
    assert out_dt is not None
    t0 = time.perf_counter()
    if block.merged:
        res = block.values.to(out_dt)
        if res is block.values:  # float32 output: the merge buffer is reused for the next block
            res = res.clone()
        check_finite(t, res, block.start, block.stop)
    elif block.float32 or t.source.dtype is not t.dtype:
        res = block.values.to(out_dt).contiguous()
    else:
        res = block.values
    timings.merge += time.perf_counter() - t0
    return _as_bytes(res)


def quantized_tensors(t: OutputTensor, ctx: ExecContext) -> dict[str, torch.Tensor]:
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
    if t.ops:
        for i, j, acc in _merged_blocks(t, ctx):
            check_finite(t, acc, i, j)
            full[i:j] = acc
    else:
        full.copy_(_Rows(t, ctx).get(0, t.shape[0], reuse=False))
    t0 = time.perf_counter()
    out = t.quantize.serialized(t.name, full, t.dtype.torch_dtype)
    ctx.timings.merge += time.perf_counter() - t0
    return out
