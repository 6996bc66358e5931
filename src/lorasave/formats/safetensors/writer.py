"""Streaming safetensors shard writer: header first, then tensor bytes in file order, one slice at a time.

The header comes from the plan (``safetensors_format.serialize_header``), so the file is
byte-identical to ``safetensors.torch.save_file`` for the same tensors and metadata, yet no
tensor is ever held whole: the writer only checks that each tensor receives exactly the
bytes its layout reserves, in order. The sha256 of the file is computed as it is written.
"""

from __future__ import annotations

import enum
import hashlib
import os
import time
from pathlib import Path
from typing import BinaryIO

from lorasave.errors import LorasaveError
from lorasave.formats.safetensors.header import TensorLayout

_READ_BACK = 8 << 20


class WriterState(enum.Enum):
    """States of a shard writer: NEW -> (begin) OPEN -> (end) CLOSED; any failure -> FAILED."""

    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"
    FAILED = "failed"


class WriterProtocolError(LorasaveError, RuntimeError):
    """A writer was driven out of order (a bug in lorasave, not in the input)."""


class ShardFile:
    """What both shard writers keep: the file, the protocol state, the running digest and the time spent.

    Attributes:
        path: the final file.
        state: the writer's ``WriterState``.
        sha256: hex digest of the final file, set by ``end``.
        hash_seconds, write_seconds: time spent hashing and writing.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.state = WriterState.NEW
        self.sha256: str | None = None
        self.hash_seconds = 0.0
        self.write_seconds = 0.0
        self._f: BinaryIO | None = None
        self._h = hashlib.sha256()

    def _hash_write(self, out: BinaryIO, data: memoryview) -> None:
        """Add ``data`` to the digest, then write it to ``out``, timing each."""
        t0 = time.perf_counter()
        self._h.update(data)
        t1 = time.perf_counter()
        out.write(data)
        self.write_seconds += time.perf_counter() - t1
        self.hash_seconds += t1 - t0

    def abort(self) -> None:
        """Close the file after a failure (the staging folder is removed by the caller)."""
        if self._f is not None and not self._f.closed:
            self._f.close()
        self.state = WriterState.FAILED


class SafetensorsShardWriter(ShardFile):
    """Writes one safetensors file from a precomputed header and ordered tensor bytes.

    Args:
        path: file to create (inside the staging folder).
        header: bytes before the data buffer (length prefix + padded JSON).
        layouts: tensors in file order with their ``[begin, end)`` data offsets (bytes).
        any_order: tensors may arrive in any order (each tensor's bytes still in order): each is
            written at its offset (``os.pwrite``) and the file is hashed by reading it back at ``end``.

    Attributes:
        sha256: hex digest of the whole file, set by ``end``.
        bytes_written: bytes written so far, header included.
        hash_seconds, write_seconds: time spent hashing and in ``write`` system calls.
    """

    def __init__(self, path: Path, header: bytes, layouts: list[TensorLayout], *, any_order: bool = False) -> None:
        super().__init__(path)
        self.any_order = any_order
        self._filled: dict[str, int] = {}  # any_order: bytes written per tensor
        self.header = header
        self.layouts = layouts
        self.bytes_written = 0
        self._i = 0  # index of the tensor being written
        self._pos = 0  # bytes of the data buffer written
        self._by_name: dict[str, TensorLayout] = {}

    def _require(self, state: WriterState) -> None:
        if self.state is not state:
            raise WriterProtocolError(f"{self.path.name}: writer is {self.state.value}, expected {state.value}")

    def begin(self) -> None:
        """Create the file and write the header."""
        self._require(WriterState.NEW)
        self._f = open(self.path, "xb")
        self.state = WriterState.OPEN
        self._emit(memoryview(self.header))
        if self.any_order and self.layouts:  # the full size now: pwrite fills it in any order
            self._f.flush()
            self._f.truncate(len(self.header) + self.layouts[-1].end)

    def _emit(self, data: memoryview) -> None:
        assert self._f is not None
        self._hash_write(self._f, data)
        self.bytes_written += len(data)

    def write(self, name: str, data: memoryview) -> None:
        """Append the next bytes of tensor ``name``; tensors must arrive in file order.

        Raises:
            WriterProtocolError: wrong tensor, or more bytes than its layout holds.
        """
        self._require(WriterState.OPEN)
        if self.any_order:
            self._write_at(name, data)
            return
        while self._i < len(self.layouts) and self._pos == self.layouts[self._i].end and name != self.layouts[self._i].name:
            self._i += 1  # previous tensor complete
        if self._i >= len(self.layouts) or self.layouts[self._i].name != name:
            raise WriterProtocolError(f"{self.path.name}: got bytes of {name!r} out of order")
        lay = self.layouts[self._i]
        if self._pos + len(data) > lay.end:
            raise WriterProtocolError(f"{self.path.name}: {name!r} got more than its {lay.end - lay.begin} bytes")
        self._emit(data)
        self._pos += len(data)

    def _write_at(self, name: str, data: memoryview) -> None:
        if not self._by_name:
            self._by_name = {lay.name: lay for lay in self.layouts}
        lay = self._by_name.get(name)
        if lay is None:
            raise WriterProtocolError(f"{self.path.name}: got bytes of {name!r}, which this file does not hold")
        pos = self._filled.get(name, 0)
        if lay.begin + pos + len(data) > lay.end:
            raise WriterProtocolError(f"{self.path.name}: {name!r} got more than its {lay.end - lay.begin} bytes")
        assert self._f is not None
        t0 = time.perf_counter()
        offset = len(self.header) + lay.begin + pos
        done = 0
        while done < len(data):
            done += os.pwrite(self._f.fileno(), data[done:], offset + done)
        self.write_seconds += time.perf_counter() - t0
        self._filled[name] = pos + len(data)
        self.bytes_written += len(data)
        self._pos += len(data)

    def _hash_back(self) -> None:
        """any_order: hash the finished file by reading it back (from the page cache, mostly)."""
        assert self._f is not None
        self._f.flush()
        t0 = time.perf_counter()
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            while chunk := f.read(_READ_BACK):
                h.update(chunk)
        self._h = h
        self.hash_seconds += time.perf_counter() - t0

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
        if self.any_order:
            self._hash_back()
        self._f.close()
        self.state = WriterState.CLOSED
        self.sha256 = self._h.hexdigest()
        return self.sha256
