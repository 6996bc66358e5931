"""The sharded safetensors output (16-bit, bitsandbytes 4-bit or compressed-tensors) as a writer of the pass.

Shard names, sizes, headers and the index come from the plan (``plan.merge_plan``: transformers'
``save_pretrained`` rules); this writer only turns each block into bytes of the output dtype
(``merging.stream.output_bytes``) and writes them behind the arithmetic on a thread of its own.

Order: a 16-bit shard streams header first when tensors arrive in file order (the order this writer
prefers, used when it is the pass's only writer); in a pass shared with other outputs tensors
arrive in plan order, and each one is written at its offset in the shard (``pwrite``) and the
file hashed once complete. A quantized shard (``Shard.deferred``) is always assembled at the end
(``DeferredShardWriter``).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch

from lorasave.formats.compressed import CompressedSpec
from lorasave.formats.safetensors.deferred import DeferredShardWriter
from lorasave.formats.safetensors.writer import SafetensorsShardWriter
from lorasave.formats.writer import OutputWriter, TensorSink
from lorasave.merging.stream import Block, Timings, check_finite, output_bytes
from lorasave.plan.merge_plan import SHARD_METADATA, MergePlan, OutputTensor, Shard
from lorasave.util.dtypes import st_dtype

#: Most blocks waiting to be written (each at most ``merging.stream.COPY_BLOCK_BYTES``, 16 MiB): at
#: most 64 MiB per writer, so a batch pass's memory grows by that much per output.
QUEUE_BLOCKS = 4
#: Most quantized weights queued for encoding or being encoded on the writer thread: one encodes
#: while the next is merged, one waits.
QUEUE_CALLS = 2
_END, _CALL = object(), object()

ShardWriter = SafetensorsShardWriter | DeferredShardWriter


class WriteBehind:
    """A writer thread fed through a bounded queue; re-raises its error in the caller's thread.

    Besides bytes it runs calls (:meth:`submit`: the encoding of a quantized weight), in queue order,
    at most :data:`QUEUE_CALLS` waiting or running at a time: each holds a whole float32 weight.
    """

    def __init__(self, on_bytes: Any = None) -> None:
        self._q: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize=QUEUE_BLOCKS)
        self._calls = threading.BoundedSemaphore(QUEUE_CALLS)
        self._on_bytes = on_bytes
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="lorasave-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (item := self._q.get()) is not None:
            writer, name, data = item
            try:
                if self._error is not None:
                    continue  # drain after a failure
                if data is _END:
                    writer.end()
                elif data is _CALL:
                    writer()
                else:
                    self.write_now(writer, name, data)
            except BaseException as e:
                self._error = e
            finally:
                if data is _CALL:
                    self._calls.release()

    def write_now(self, writer: ShardWriter, name: str, data: Any) -> None:
        """Write bytes of ``name`` on this thread (from a :meth:`submit` call)."""
        writer.write(name, data)
        if self._on_bytes is not None:
            self._on_bytes(len(data))

    def submit(self, call: Callable[[], None]) -> None:
        """Run ``call`` on the writer thread after what is queued (waits while :data:`QUEUE_CALLS` are pending)."""
        self._check()
        self._calls.acquire()
        self._q.put((call, "", _CALL))

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, writer: ShardWriter, name: str, data: Any) -> None:
        """Queue bytes of ``name`` (or ``END`` to close the writer); raises the writer thread's error."""
        self._check()
        self._q.put((writer, name, data))

    def close_later(self, writer: ShardWriter) -> None:
        """Queue the end of ``writer``'s file."""
        self.put(writer, "", _END)

    def finish(self) -> None:
        """Wait for every queued write; raises the writer thread's error."""
        self._q.put(None)
        self._thread.join()
        self._check()

    def abandon(self) -> None:
        """Stop after a failure elsewhere; queued writes are dropped."""
        self._error = self._error or _Abandoned("abandoned")
        self._q.put(None)
        self._thread.join()


class _Abandoned(Exception):
    """Marks a write-behind thread stopped by a failure elsewhere."""


class _BytesSink:
    """A plain tensor: each block cast to the output dtype and queued."""

    def __init__(self, out: SafetensorsOutput, t: OutputTensor, writer: ShardWriter) -> None:
        self._out, self._t, self._writer = out, t, writer
        if isinstance(writer, DeferredShardWriter):
            writer.declare(t.name, t.dtype, t.shape)

    def add(self, block: Block) -> None:
        self._out.behind.put(self._writer, self._t.name, output_bytes(self._t, block, self._out.timings))

    def close(self) -> None:
        self._out.tensor_done(self._writer)


class _QuantizedSink:
    """A quantized Linear weight: the whole float32 merge collected, quantized once at ``close``.

    The quantization runs on the writer thread (:meth:`WriteBehind.submit`) while the pass merges
    the next tensor; its float32 buffer then goes back to :class:`_Buffers`.
    NVFP4 weights that share a global scale (q/k/v, gate/up: ``CompressedSpec.fusion_groups``) wait
    for the last of their group, then are quantized together (:meth:`SafetensorsOutput.fused_done`).
    """

    def __init__(self, out: SafetensorsOutput, t: OutputTensor, writer: DeferredShardWriter) -> None:
        self._out, self.t, self.writer = out, t, writer
        n = math.prod(t.shape)
        self._flat = out.buffers.get(n)
        self.full = self._flat[:n].view(t.shape)  # (out, in)

    def add(self, block: Block) -> None:
        if block.merged:
            check_finite(self.t, block.values, block.start, block.stop)
        self.full[block.start : block.stop] = block.values

    def close(self) -> None:
        group = self._out.fused.get(self.t.name)
        if group is not None:
            self._out.fused_done(group, self)
        else:
            self.write()

    def write(self, global_scale: torch.Tensor | None = None) -> None:
        """Queue the quantization and the writing of its tensors, and count the weight done."""
        t, out, writer, full, flat = self.t, self._out, self.writer, self.full, self._flat
        assert t.quantize is not None and t.dtype.torch_dtype is not None
        del self.full, self._flat

        def encode() -> None:
            assert t.quantize is not None and t.dtype.torch_dtype is not None
            t0 = time.perf_counter()
            if isinstance(t.quantize, CompressedSpec):
                tensors = t.quantize.serialized(t.name, full, t.dtype.torch_dtype, global_scale)
            else:
                tensors = t.quantize.serialized(t.name, full, t.dtype.torch_dtype)
            out.encode_seconds += time.perf_counter() - t0  # only this thread adds to it
            for name, tensor in tensors.items():
                writer.declare(name, st_dtype(tensor.dtype), tuple(tensor.shape))
                out.behind.write_now(writer, name, memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()).cast("B"))
            del tensors  # written: nothing refers to the buffer any more
            out.buffers.put(flat)

        out.behind.submit(encode)
        out.tensor_done(writer)


class _Buffers:
    """Flat float32 buffers for whole weights, reused from one quantized weight to the next.

    A fresh buffer of tens of MB is a new mapping whose every page faults when first written
    (seconds over a model); the weights of a model come in a few shapes, and at most
    ``QUEUE_CALLS + 1`` are held at a time (one merging, the others queued or encoding), so a few
    buffers of the largest size serve them all.
    """

    def __init__(self, keep: int = QUEUE_CALLS + 1) -> None:
        self._free: list[torch.Tensor] = []
        self._keep = keep
        self._lock = threading.Lock()

    def get(self, n: int) -> torch.Tensor:
        """A flat float32 buffer of at least ``n`` elements (contents undefined)."""
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= n]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        return torch.empty(n, dtype=torch.float32)

    def put(self, buf: torch.Tensor) -> None:
        """Give a buffer back; beyond ``keep`` the smallest is dropped."""
        with self._lock:
            self._free.append(buf)
            if len(self._free) > self._keep:
                del self._free[min(range(len(self._free)), key=lambda i: self._free[i].numel())]


class SafetensorsOutput(OutputWriter):
    """The weight files of a planned merge: ``plan.shards`` (and nothing else: the index is a side file).

    Args:
        plan: the merge plan of this output (its dtype, shard size, 4-bit settings).
        on_bytes: called with the bytes of tensor data written (a progress bar), or None.
        shards: write only the shards of these file names (a Ray task's part of a split output,
            ``pipeline.ray``); default every shard.

    Attributes:
        files: ``{shard file name: sha256}`` after ``end``.
    """

    def __init__(self, plan: MergePlan, on_bytes: Any = None, shards: Collection[str] | None = None) -> None:
        super().__init__()
        self.plan = plan
        self._on_bytes = on_bytes
        self.shards = [sh for sh in plan.shards if shards is None or sh.filename in shards]
        self._owner: dict[str, Shard] = {n: sh for sh in self.shards for n in sh.outputs}
        self._writers: dict[str, ShardWriter] = {}
        self._left: dict[str, int] = {sh.filename: len(sh.outputs) for sh in self.shards}
        self.behind: WriteBehind
        self.buffers = _Buffers()
        #: seconds the writer thread spent quantizing (added to ``timings.merge`` at ``end``)
        self.encode_seconds = 0.0
        self._in_order = False
        self.files: dict[str, str] = {}
        #: weight name -> the names of its NVFP4 fused group; collected sinks of incomplete groups
        self.fused: dict[str, tuple[str, ...]] = {}
        self._waiting: dict[tuple[str, ...], dict[str, _QuantizedSink]] = {}
        q = plan.quantizer
        if isinstance(q, CompressedSpec):
            mods = [n.removesuffix(".weight") for n, t in plan.tensors.items() if t.quantize is not None and n in self._owner]
            for group in q.fusion_groups(mods):
                names = tuple(f"{m}.weight" for m in group)
                self.fused.update(dict.fromkeys(names, names))

    @property
    def needed_bytes(self) -> int:
        return self.plan.total_bytes

    def preferred_order(self) -> list[str]:
        """File order: shard by shard, each in its layout order (4-bit shards: their outputs' order)."""
        order: list[str] = []
        for sh in self.shards:
            order.extend(sh.outputs if sh.deferred else dict.fromkeys(lay.name for lay in sh.layouts))
        return order

    def set_order(self, names: list[str]) -> None:
        """In file order, shards stream header first; in any other order, tensors are written at their offsets."""
        self._in_order = [n for n in names if n in self._owner] == self.preferred_order()

    def begin(self, folder: Path) -> None:
        self.behind = WriteBehind(self._on_bytes)
        for sh in self.shards:
            w: ShardWriter
            if sh.deferred:
                w = DeferredShardWriter(folder / sh.filename, SHARD_METADATA)
            else:
                w = SafetensorsShardWriter(folder / sh.filename, sh.header, sh.layouts, any_order=not self._in_order)
            self._writers[sh.filename] = w
            w.begin()

    def open_tensor(self, name: str) -> TensorSink | None:
        sh = self._owner.get(name)
        if sh is None:
            return None
        t = self.plan.tensors[name]
        w = self._writers[sh.filename]
        if t.quantize is not None:
            assert isinstance(w, DeferredShardWriter)
            return _QuantizedSink(self, t, w)
        return _BytesSink(self, t, w)

    def fused_done(self, group: tuple[str, ...], sink: _QuantizedSink) -> None:
        """One weight of a fused group is merged; once all are, quantize them with their shared global scale."""
        waiting = self._waiting.setdefault(group, {})
        waiting[sink.t.name] = sink
        if len(waiting) < len(group):
            return
        del self._waiting[group]
        spec = sink.t.quantize
        assert isinstance(spec, CompressedSpec) and sink.t.dtype.torch_dtype is not None
        t0 = time.perf_counter()
        gs = spec.global_scale(waiting[n].full.to(sink.t.dtype.torch_dtype) for n in group)
        self.timings.merge += time.perf_counter() - t0
        for n in group:
            waiting[n].write(gs)

    def tensor_done(self, writer: ShardWriter) -> None:
        """Called by a sink: close the shard's file behind the queue once its last tensor is queued."""
        name = writer.path.name
        self._left[name] -= 1
        if self._left[name] == 0:
            self.behind.close_later(writer)

    def end(self) -> dict[str, str]:
        assert not self._waiting, f"fused weights never completed: {list(self._waiting)}"
        self.behind.finish()
        self.timings.merge += self.encode_seconds
        files = {}
        for name, w in self._writers.items():
            assert w.sha256 is not None, f"{name} was never completed"
            files[name] = w.sha256
            self.timings.write += w.write_seconds
            self.timings.hash += w.hash_seconds
        self.files = files
        return files

    def adopt(self, files: dict[str, str], timings: Timings) -> None:
        """The shards the Ray tasks of a split output wrote (``pipeline.ray``): their hashes and seconds."""
        self.files = {sh.filename: files[sh.filename] for sh in self.shards}
        self.timings.add(timings)

    def abort(self) -> None:
        if hasattr(self, "behind"):
            self.behind.abandon()
        for w in self._writers.values():
            w.abort()
