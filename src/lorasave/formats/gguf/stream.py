"""The tensor-data half of a streamed GGUF: merge and encode on the main thread, write and hash behind.

The main thread merges each tensor in row blocks (``merging.stream.tensor_blocks``, float32) and
encodes every block while it is still in the cache (``gguf_encode``, byte for byte
``gguf.quants``) into the tensor's data buffer; a writer thread appends finished tensors to the
file with ``GGUFWriter.write_tensor_data`` (in plan order: header, KV data and tensor infos are
already written) and feeds the same bytes, alignment padding included, to sha256. Both file writes
and ``hashlib`` release the GIL, so on two cores the arithmetic and the I/O overlap, and the file is
never read back to hash it. At most :data:`QUEUE_BYTES` of finished tensors wait, so memory stays
bounded whatever the model size.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from typing import Any

import gguf
import numpy as np
import torch

from lorasave.formats.gguf.encode import encode_into
from lorasave.merging.stream import Timings


class _PlainWrite(np.ndarray):
    """An array whose ``tofile`` is a plain ``file.write`` of its buffer.

    ``GGUFWriter.write_tensor_data`` calls ``ndarray.tofile``, which writes through a duplicated
    ``FILE*`` at about 0.4 GB/s here; ``BufferedWriter.write`` of the buffer runs at page-cache speed
    (about 5 GB/s) and releases the GIL during the system call.
    """

    def tofile(self, fid: Any, sep: str = "", format: str = "%s") -> None:
        assert not sep
        fid.write(memoryview(self.view(np.ndarray)).cast("B"))


#: Bytes of encoded tensors waiting for the writer thread, the one it writes included (one
#: tensor of any size is always let through).
QUEUE_BYTES = 64 << 20
_READ_CHUNK = 8 << 20


class EncodedTensor:
    """The GGUF data of one planned tensor, encoded block by block as the pass hands the blocks over.

    Values are the float32 merge (``merging.stream.Block``; an unchanged tensor upcast), plus
    ``shift`` (Gemma's RMSNorm ``+1``), encoded as ``qtype``: the bytes of ``gguf.quants.quantize``
    of the whole merged tensor. Every GGML type encodes each row on its own, so a row permutation
    (Llama Q/K, ``formats.gguf.export.permute_qk``) can be applied to the result.

    Args:
        shape: the GGUF tensor's shape, rows first (a planned tensor's, or ``(n_expert, rows, ne0)``
            for stacked experts, whose pieces are added one after the other).
        qtype: the GGML type; ``shape[-1]`` a multiple of its block size.
        nbytes: bytes of the encoded tensor (``formats.gguf.quant.tensor_nbytes``).
        shift: added to every value (Gemma's RMSNorm ``+1``), or 0.
        rows: only the first ``rows`` rows are encoded (``GgufTensor.rows``), or None for all.
        ggml: encode with llama.cpp's ``ggml_quantize_chunk`` (``runtimes.llama_cpp.ggml``) rather
            than gguf-py's arithmetic (every type but F32; the k-quant files). It encodes each row
            on its own, so each block of whole rows is encoded as it comes.
        importance: float32 ``(n_mat, ne0)``: the importance matrix of the tensor (one row per
            expert of a 3-D tensor: rows ``[k * rows_per_expert, (k + 1) * rows_per_expert)`` use
            row ``k``, as ``llama_tensor_quantize_impl``'s ``imatrix_for_row``), or None.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        qtype: gguf.GGMLQuantizationType,
        nbytes: int,
        shift: float = 0.0,
        rows: int | None = None,
        ggml: bool = False,
        importance: np.ndarray | None = None,
    ) -> None:
        self.shape = shape
        self.qtype = qtype
        self.ggml = ggml and qtype is not gguf.GGMLQuantizationType.F32
        self._ne0 = int(shape[-1]) if shape else 1
        self.nbytes = nbytes
        self.shift = shift
        self._block = gguf.GGML_QUANT_SIZES[qtype][0]
        self._size = gguf.GGML_QUANT_SIZES[qtype][1]
        self.out = torch.empty(nbytes, dtype=torch.uint8)
        self._pos = 0
        self.n_rows = (shape[0] if shape else 1) if rows is None else rows
        self._want = self.n_rows * (int(np.prod(shape[1:])) if shape else 1)  # values written
        self._done = 0
        self.importance = importance
        self._rows_per_expert = int(shape[-2]) if len(shape) >= 2 else 1

    def add(self, values: torch.Tensor, timings: Timings) -> None:
        """Encode the next block of values (blocks arrive in row order; the caller checks merged values
        are finite: ``merging.stream.check_finite``)."""
        if self._done >= self._want:
            return  # rows past ``rows`` are not written
        t0 = time.perf_counter()
        x = values.reshape(-1)
        if x.dtype is not torch.float32:
            x = x.to(torch.float32)
        x = x[: self._want - self._done]  # (rows_blk * row_elems,)
        self._done += x.numel()
        if self.shift:
            x = x + self.shift  # Gemma RMSNorm: HF computes x * (1 + w), llama.cpp x * w
        n = x.numel() // self._block * self._size
        if self.ggml:  # whole rows: blocks are row blocks of the tensor
            self._ggml_encode(x.contiguous().numpy().reshape(-1, self._ne0), self.out[self._pos : self._pos + n].numpy(), (self._done - x.numel()) // self._ne0)
        else:
            encode_into(x, self.qtype, self.out[self._pos : self._pos + n])
        self._pos += n
        timings.merge += time.perf_counter() - t0

    def _ggml_encode(self, rows: np.ndarray, out: np.ndarray, first: int) -> None:
        """``ggml_quantize_chunk`` of ``rows`` (float32 ``(n, ne0)``, rows ``first...`` of the tensor) into ``out``,
        cut where the expert (the importance row) changes."""
        from lorasave.runtimes.llama_cpp import ggml as ggml_quant

        if self.importance is None or self.importance.shape[0] == 1:
            imatrix = None if self.importance is None else self.importance[0]
            ggml_quant.quantize_into(rows, self.qtype, out, _encode_threads(), imatrix=imatrix)
            return
        row_bytes = out.size // max(1, rows.shape[0])
        r = 0
        while r < rows.shape[0]:
            k = (first + r) // self._rows_per_expert
            end = min(rows.shape[0], (k + 1) * self._rows_per_expert - first)
            ggml_quant.quantize_into(rows[r:end], self.qtype, out[r * row_bytes : end * row_bytes], _encode_threads(), imatrix=self.importance[k])
            r = end

    def result(self) -> torch.Tensor:
        """uint8 ``(rows, row_bytes)``: the encoded rows (one row for a 0-d tensor)."""
        if self._pos != self.nbytes:
            raise AssertionError(f"encoded {self._pos} bytes of a {list(self.shape)} tensor, expected {self.nbytes}")
        return self.out.reshape(self.n_rows, -1)


class HashingWriteBehind:
    """Writes tensor data through a ``GGUFWriter`` on a thread, hashing the file's bytes as they go.

    Start it after ``write_ti_data_to_file``: it hashes the bytes already in the file (header,
    KV data, tensor infos), then every padding and tensor ``write_tensor_data`` writes. Tensors
    wait in a queue of at most :data:`QUEUE_BYTES` (one tensor always fits).
    """

    def __init__(self, writer: gguf.GGUFWriter, timings: Timings) -> None:
        assert writer.fout is not None and len(writer.fout) == 1
        self._writer = writer
        self._fout = writer.fout[0]
        self._timings = timings
        self._hash = hashlib.sha256()
        self._length = 0
        self._items: deque[np.ndarray | None] = deque()
        self._queued = 0  # bytes in self._items
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._abandoned = False
        self._fout.flush()
        t0 = time.perf_counter()
        with open(self._fout.name, "rb") as f:  # the metadata written so far (a few MB at most)
            while chunk := f.read(_READ_CHUNK):
                self._update(chunk)
        timings.hash += time.perf_counter() - t0
        self._thread = threading.Thread(target=self._loop, name="lorasave-gguf-writer", daemon=True)
        self._thread.start()

    def _update(self, data: bytes | memoryview) -> None:
        self._hash.update(data)
        self._length += len(data)

    def _pad(self, n: int) -> None:
        pad = gguf.GGUFWriter.ggml_pad(n, self._writer.data_alignment) - n  # as GGUFWriter.write_padding
        if pad:
            self._update(bytes(pad))

    def _write(self, data: np.ndarray) -> None:
        self._pad(self._fout.tell())
        t0 = time.perf_counter()
        self._writer.write_tensor_data(data.view(_PlainWrite))
        t1 = time.perf_counter()
        self._update(memoryview(data).cast("B"))
        self._pad(data.nbytes)
        self._timings.write += t1 - t0
        self._timings.hash += time.perf_counter() - t1

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                data = self._items[0]
            if data is None:
                return
            if self._error is None and not self._abandoned:
                try:
                    self._write(data)
                except BaseException as e:  # re-raised in the main thread
                    self._error = e
            with self._cond:
                self._items.popleft()
                self._queued -= data.nbytes
                self._cond.notify_all()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, data: np.ndarray) -> None:
        """Queue the next tensor's data (its info's ``nbytes``); waits while :data:`QUEUE_BYTES` are queued.

        Raises:
            The writer thread's error (``OSError``...).
        """
        data = np.ascontiguousarray(data)
        with self._cond:
            while self._items and self._queued + data.nbytes > QUEUE_BYTES and self._error is None:
                self._cond.wait()
            self._check()
            self._items.append(data)
            self._queued += data.nbytes
            self._cond.notify_all()

    def _stop(self) -> None:
        with self._cond:
            self._items.append(None)
            self._cond.notify_all()
        self._thread.join()

    def finish(self) -> tuple[str, int]:
        """Wait for every queued tensor, flush, and return the file's ``(sha256 hex, bytes)``.

        Raises:
            The writer thread's error (``OSError``...).
        """
        self._stop()
        self._check()
        self._fout.flush()
        return self._hash.hexdigest(), self._length

    def abandon(self) -> None:
        """Stop after a failure in the main thread; queued tensors are dropped."""
        self._abandoned = True
        self._stop()


def _encode_threads() -> int:
    """Threads for ggml's encoding of one block: the pass's ``--threads`` (default the cores), at most the cores.

    The encoding runs on the pass thread while the writer thread waits for the tensor, so it may use
    every core (llama_model_quantize uses them all too).
    """
    from lorasave.pipeline.threads import machine_threads, requested_threads

    cores = machine_threads()
    return max(1, min(requested_threads() or cores, cores))
