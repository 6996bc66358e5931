"""A safetensors shard whose header is only known once its tensors are computed.

bitsandbytes 4-bit statistics (the quant-state JSON carries the mean of the block scales) are
only known after quantizing, so a 4-bit shard cannot be written header-first. This writer
appends tensor bytes to a scratch file in the order they arrive, then assembles the final file
(header, then data in safetensors' order) with positional reads, hashing as it goes. Memory
stays at one copy buffer; the extra I/O is the size of the (4-bit, hence small) shard.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from lorasave.formats.safetensors.header import layout, pread_exact, serialize_header
from lorasave.formats.safetensors.writer import ShardFile, WriterProtocolError, WriterState
from lorasave.util.dtypes import StDtype, nbytes

_COPY = 16 << 20


class DeferredShardWriter(ShardFile):
    """Collects tensors in any order, writes ``path`` as ``safetensors.torch.save_file`` would at ``end``.

    Each tensor is first ``declare``d (dtype, shape), then its bytes arrive through one or more
    ``write`` calls, contiguously.

    Attributes:
        sha256: hex digest of the final file, set by ``end``.
        hash_seconds, write_seconds: time spent hashing and writing.
    """

    def __init__(self, path: Path, metadata: dict[str, str] | None) -> None:
        super().__init__(path)
        self.metadata = metadata
        self._scratch = path.with_name(path.name + ".scratch")
        self._specs: dict[str, tuple[StDtype, tuple[int, ...]]] = {}
        self._spans: dict[str, list[int]] = {}  # name -> [begin, end) in the scratch file
        self._pos = 0

    def begin(self) -> None:
        """Create the scratch file."""
        if self.state is not WriterState.NEW:
            raise WriterProtocolError(f"{self.path.name}: begin() on a {self.state.value} writer")
        self._f = open(self._scratch, "xb")
        self.state = WriterState.OPEN

    def declare(self, name: str, dtype: StDtype, shape: tuple[int, ...]) -> None:
        """Announce a tensor before its bytes."""
        if name in self._specs:
            raise WriterProtocolError(f"{self.path.name}: tensor {name!r} declared twice")
        self._specs[name] = (dtype, tuple(shape))

    def write(self, name: str, data: memoryview) -> None:
        """Append bytes of a declared tensor."""
        if self.state is not WriterState.OPEN or name not in self._specs:
            raise WriterProtocolError(f"{self.path.name}: bytes of undeclared {name!r} or writer not open")
        span = self._spans.setdefault(name, [self._pos, self._pos])
        if span[1] != self._pos:
            raise WriterProtocolError(f"{self.path.name}: bytes of {name!r} are not contiguous")
        assert self._f is not None
        t0 = time.perf_counter()
        self._f.write(data)
        self.write_seconds += time.perf_counter() - t0
        self._pos += len(data)
        span[1] = self._pos

    def end(self) -> str:
        """Check every tensor is complete, write the final file, remove the scratch file; returns the sha256."""
        if self.state is not WriterState.OPEN:
            raise WriterProtocolError(f"{self.path.name}: end() on a {self.state.value} writer")
        assert self._f is not None
        self._f.close()
        for name, (dt, shape) in self._specs.items():
            b, e = self._spans.get(name, [0, 0])
            if e - b != nbytes(dt, shape):
                raise WriterProtocolError(f"{self.path.name}: {name!r} got {e - b} of {nbytes(dt, shape)} bytes")
        lay = layout((n, dt, shape) for n, (dt, shape) in self._specs.items())
        header = serialize_header(lay, self.metadata)
        self._h = hashlib.sha256(header)
        buf = bytearray(_COPY)
        view = memoryview(buf)
        fd = os.open(self._scratch, os.O_RDONLY)
        try:
            with open(self.path, "xb") as out:
                out.write(header)
                for entry in lay:
                    b, e = self._spans.get(entry.name, [0, 0])
                    while b < e:
                        n = min(_COPY, e - b)
                        pread_exact(fd, n, b, view, self._scratch)
                        self._hash_write(out, view[:n])
                        b += n
        finally:
            os.close(fd)
        os.unlink(self._scratch)
        self.state = WriterState.CLOSED
        self.sha256 = self._h.hexdigest()
        return self.sha256
