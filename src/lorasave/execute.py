"""Execute a merge plan: stream every output tensor into its shard, writing behind the arithmetic.

The main thread reads and merges row blocks (``merge_math.stream_tensor``); a writer thread
hashes and writes them (both ``hashlib`` and file writes release the GIL), so on two cores the
arithmetic and the I/O overlap. A bounded queue keeps at most ``QUEUE_BLOCKS`` blocks in flight,
so memory stays at a few tens of MB whatever the model size.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

import torch

from .adapter import Adapter
from .checkpoint import TensorReader
from .dtypes import st_dtype
from .merge_math import ExecContext, Timings, quantized_tensors, stream_tensor
from .plan import SHARD_METADATA, MergePlan, OutputTensor, Shard
from .writers import DeferredShardWriter, SafetensorsShardWriter

#: Most blocks waiting to be written (each at most ``merge_math.COPY_BLOCK_BYTES``).
QUEUE_BLOCKS = 6
_END = object()


class _WriteBehind:
    """A writer thread fed through a bounded queue; re-raises its error in the main thread."""

    def __init__(self, bar: Any) -> None:
        self._q: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize=QUEUE_BLOCKS)
        self._bar = bar
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="lorasave-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (item := self._q.get()) is not None:
            if self._error is not None:
                continue  # drain after a failure
            writer, name, data = item
            try:
                if data is _END:
                    writer.end()
                else:
                    writer.write(name, data)
                    self._bar.update(len(data))
            except BaseException as e:
                self._error = e

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, writer: SafetensorsShardWriter, name: str, data: Any) -> None:
        """Queue bytes of ``name`` (or ``_END`` to close the writer); raises the writer thread's error."""
        self._check()
        self._q.put((writer, name, data))

    def finish(self) -> None:
        """Wait for every queued write; raises the writer thread's error."""
        self._q.put(None)
        self._thread.join()
        self._check()

    def abandon(self) -> None:
        """Stop after a failure in the main thread; queued writes are dropped."""
        self._error = self._error or RuntimeError("abandoned")
        self._q.put(None)
        self._thread.join()


def _produce_deferred(t: OutputTensor, writer: DeferredShardWriter, behind: _WriteBehind, ctx: ExecContext) -> None:
    """Queue the tensors of one output for a deferred-header shard (4-bit outputs)."""
    if t.quantize is not None:
        for name, tensor in quantized_tensors(t, ctx).items():
            writer.declare(name, st_dtype(tensor.dtype), tuple(tensor.shape))
            behind.put(writer, name, memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()).cast("B"))
        return
    writer.declare(t.name, t.dtype, t.shape)
    for chunk in stream_tensor(t, ctx):
        behind.put(writer, t.name, chunk)


def execute(plan: MergePlan, adapters: list[Adapter], folder: Path, bar: Any) -> tuple[dict[str, str], Timings]:
    """Write every shard of ``plan`` into ``folder``.

    Args:
        plan: the merge plan.
        adapters: the adapters its recipes index into.
        folder: the staging folder.
        bar: a tqdm-like progress bar, advanced by bytes of tensor data.

    Returns:
        ``({shard file name: sha256}, timings)``.

    Raises:
        NonFiniteResultError and reader errors, from the main thread; write errors from the writer.
    """
    timings = Timings()
    writers: list[tuple[Shard, SafetensorsShardWriter | DeferredShardWriter]] = []
    behind = _WriteBehind(bar)
    # one intra-op thread: the writer thread has the other core, and OpenMP threads that
    # spin at barriers while it runs would slow the arithmetic tenfold on a 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with TensorReader() as reader:
            ctx = ExecContext(reader, adapters, timings, plan.converter)
            for shard in plan.shards:
                writer: SafetensorsShardWriter | DeferredShardWriter
                if shard.deferred:
                    writer = DeferredShardWriter(folder / shard.filename, SHARD_METADATA)
                    writers.append((shard, writer))
                    writer.begin()
                    for name in shard.outputs:
                        _produce_deferred(plan.tensors[name], writer, behind, ctx)
                else:
                    writer = SafetensorsShardWriter(folder / shard.filename, shard.header, shard.layouts)
                    writers.append((shard, writer))
                    writer.begin()
                    for lay in shard.layouts:
                        for chunk in stream_tensor(plan.tensors[lay.name], ctx):
                            behind.put(writer, lay.name, chunk)
                behind.put(writer, shard.filename, _END)
        behind.finish()
    except BaseException:
        behind.abandon()
        for _, w in writers:
            w.abort()
        raise
    finally:
        torch.set_num_threads(threads)
    files = {}
    for shard, w in writers:
        assert w.sha256 is not None
        files[shard.filename] = w.sha256
        timings.write += w.write_seconds
        timings.hash += w.hash_seconds
    return files, timings
