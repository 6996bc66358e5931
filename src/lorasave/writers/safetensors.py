"""Streaming safetensors shard writer: header first, then tensor bytes in file order, one slice at a time.

The header comes from the plan (``safetensors_format.serialize_header``), so the file is
byte-identical to ``safetensors.torch.save_file`` for the same tensors and metadata, yet no
tensor is ever held whole: the writer only checks that each tensor receives exactly the
bytes its layout reserves, in order. The sha256 of the file is computed as it is written.
"""

from __future__ import annotations

import enum
import hashlib
import time
from pathlib import Path
from typing import BinaryIO

from ..errors import LorasaveError
from ..safetensors_format import TensorLayout


class WriterState(enum.Enum):
    """States of a shard writer: NEW -> (begin) OPEN -> (end) CLOSED; any failure -> FAILED."""

    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"
    FAILED = "failed"


class WriterProtocolError(LorasaveError, RuntimeError):
    """A writer was driven out of order (a bug in lorasave, not in the input)."""


class SafetensorsShardWriter:
    """Writes one safetensors file from a precomputed header and ordered tensor bytes.

    Args:
        path: file to create (inside the staging folder).
        header: bytes before the data buffer (length prefix + padded JSON).
        layouts: tensors in file order with their ``[begin, end)`` data offsets (bytes).

    Attributes:
        sha256: hex digest of the whole file, set by ``end``.
        bytes_written: bytes written so far, header included.
        hash_seconds, write_seconds: time spent hashing and in ``write`` system calls.
    """

    def __init__(self, path: Path, header: bytes, layouts: list[TensorLayout]) -> None:
        self.path = path
        self.header = header
        self.layouts = layouts
        self.state = WriterState.NEW
        self.sha256: str | None = None
        self.bytes_written = 0
        self.hash_seconds = 0.0
        self.write_seconds = 0.0
        self._f: BinaryIO | None = None
        self._h = hashlib.sha256()
        self._i = 0  # index of the tensor being written
        self._pos = 0  # bytes of the data buffer written

    def _require(self, state: WriterState) -> None:
        if self.state is not state:
            raise WriterProtocolError(f"{self.path.name}: writer is {self.state.value}, expected {state.value}")

    def begin(self) -> None:
        """Create the file and write the header."""
        self._require(WriterState.NEW)
        self._f = open(self.path, "xb")
        self.state = WriterState.OPEN
        self._emit(memoryview(self.header))

    def _emit(self, data: memoryview) -> None:
        assert self._f is not None
        t0 = time.perf_counter()
        self._h.update(data)
        t1 = time.perf_counter()
        self._f.write(data)
        self.write_seconds += time.perf_counter() - t1
        self.hash_seconds += t1 - t0
        self.bytes_written += len(data)

    def write(self, name: str, data: memoryview) -> None:
        """Append the next bytes of tensor ``name``; tensors must arrive in file order.

        Raises:
            WriterProtocolError: wrong tensor, or more bytes than its layout holds.
        """
        self._require(WriterState.OPEN)
        while self._i < len(self.layouts) and self._pos == self.layouts[self._i].end and name != self.layouts[self._i].name:
            self._i += 1  # previous tensor complete
        if self._i >= len(self.layouts) or self.layouts[self._i].name != name:
            raise WriterProtocolError(f"{self.path.name}: got bytes of {name!r} out of order")
        lay = self.layouts[self._i]
        if self._pos + len(data) > lay.end:
            raise WriterProtocolError(f"{self.path.name}: {name!r} got more than its {lay.end - lay.begin} bytes")
        self._emit(data)
        self._pos += len(data)

    def end(self) -> str:
        """Close the file after checking every tensor was written in full; returns the sha256.

        Raises:
            WriterProtocolError: the data buffer is incomplete.
        """
        self._require(WriterState.OPEN)
        expected = self.layouts[-1].end if self.layouts else 0
        if self._pos != expected:
            raise WriterProtocolError(f"{self.path.name}: {self._pos} of {expected} data bytes written")
        assert self._f is not None
        self._f.close()
        self.state = WriterState.CLOSED
        self.sha256 = self._h.hexdigest()
        return self.sha256

    def abort(self) -> None:
        """Close the file after a failure (the staging folder is removed by the caller)."""
        if self._f is not None and not self._f.closed:
            self._f.close()
        self.state = WriterState.FAILED
