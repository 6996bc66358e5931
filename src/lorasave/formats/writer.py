"""The one interface every output format implements: a writer fed tensor by tensor by the pass.

The pass (``pipeline.execute.execute_pass``) reads each base tensor once, merges it once per job
(``merging.stream.tensor_blocks``) and hands the row blocks to every writer of that job:

    writer.begin(folder)                       # create files in the staging folder
    for name in pass order:                    # writer.order(): the order it needs, if any
        sink = writer.open_tensor(name)        # None: the writer does not write this tensor
        for block in blocks: sink.add(block)   # float32 merge or unchanged stored values
        sink.close()
    files = writer.end()                       # {file name: sha256}; writer.abort() on failure

A writer converts blocks to its own form (cast, GGML encoding, 4-bit quantization), checks its own
values (NaN/Inf after rounding) and writes behind the arithmetic on a thread of its own. Side files
(config, tokenizer, card), the manifest, verification and the atomic rename are the pipeline's
(``pipeline.finalize``), not the writer's. Adding a format: one module with an ``OutputWriter``
subclass, and one registration line in ``pipeline.outputs``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Protocol

from lorasave.merging.stream import Block, Timings


class TensorSink(Protocol):
    """Receives one tensor's row blocks, in row order."""

    def add(self, block: Block) -> None:
        """Take the next block (consume ``block.values`` at once when ``block.merged``)."""

    def close(self) -> None:
        """The tensor is complete."""


class OutputWriter(ABC):
    """One output format's weight files in one staging folder.

    Attributes:
        timings: seconds per phase spent by this writer (merge = its conversion/encoding, write, hash).
    """

    def __init__(self) -> None:
        self.timings = Timings()

    def order(self) -> list[str] | None:
        """Tensor names in the order this writer must receive them, or None if any order works."""
        return None

    def preferred_order(self) -> list[str] | None:
        """The order that lets this writer stream without extra work, when it is the only writer."""
        return self.order()

    def set_order(self, names: list[str]) -> None:
        """Told by the pass, before ``begin``, the order tensors will come in (default: ignored)."""
        return None

    @property
    @abstractmethod
    def needed_bytes(self) -> int:
        """Bytes its files will take at most (the free-space check), known before ``begin``."""

    @abstractmethod
    def begin(self, folder: Path) -> None:
        """Create its files in ``folder`` (the staging folder)."""

    @abstractmethod
    def open_tensor(self, name: str) -> TensorSink | None:
        """A sink for tensor ``name`` (a checkpoint name), or None when this writer does not write it."""

    @abstractmethod
    def end(self) -> dict[str, str]:
        """Finish every file; returns ``{file name: sha256 hex}``.

        Raises:
            The write errors of its thread (``OSError``, ``DiskFullError`` is mapped by the caller).
        """

    def adopt(self, files: dict[str, str], timings: Timings) -> None:
        """Take the files other processes wrote for it (the Ray tasks of a split output: ``pipeline.ray``).

        Raises:
            NotImplementedError: this writer's output cannot be split (the default).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot be split over tasks")

    @abstractmethod
    def abort(self) -> None:
        """Stop after a failure; files are left for the staging folder's removal."""
