"""The ONNX decoder as a writer of the pass: weights streamed into ``model.onnx.data``, the graph at the end.

Every initializer's place in the external-data file is fixed before the pass (shapes and dtypes are
known from the plan), so each row block of a merged tensor is converted and written at its offset
(``os.pwrite``) as it arrives, in any tensor order, and nothing is held whole. A Linear weight is
stored as the checkpoint's (out, in) matrix (the graph's ``Gemm`` has ``transB=1``), cast to the
graph dtype; with quantization, each block of rows is quantized at once by onnxruntime's own
block quantizer (``onnxruntime.quantization.matmul_nbits_quantizer.DefaultWeightOnlyQuantizer.
qbits_block_quant``, the function ``MatMulNBitsQuantizer`` calls per weight): it quantizes each
column of the (K, N) = (in, out) MatMul weight independently, so rows [a, b) of the (out, in)
weight give rows [a, b) of the packed weight, scales and zero points, bit for bit. The file is
hashed once complete (read back). ``model.onnx`` (the graph, external-data references) is written
at ``end``.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorasave.formats.onnx.graph import LM_HEAD, OPSET, DecoderGraph, QuantSpec
from lorasave.formats.onnx.spec import DecoderSpec
from lorasave.formats.writer import OutputWriter, TensorSink
from lorasave.merging.stream import Block, check_finite

ONNX_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
#: Tensors of at least this many bytes start on a 4096-byte boundary (onnxruntime can map them).
_ALIGN_FROM = 1 << 16
_READ_BACK = 8 << 20


@dataclass
class _Entry:
    """One initializer in the data file: numpy dtype, shape, byte offset and length, bytes per row."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    row_bytes: int


def _quant_shapes(rows: int, cols: int, q: QuantSpec) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Packed, scales and zero-point shapes of an (N=rows, K=cols) weight, as ``qbits_block_quant`` makes them."""
    kpack = 8 // q.bits
    k_blocks = (cols + q.block_size - 1) // q.block_size
    return (rows, k_blocks, (q.block_size + kpack - 1) // kpack), (rows, k_blocks), (rows, (k_blocks + kpack - 1) // kpack)


def block_quantizer(q: QuantSpec) -> Any:
    """onnxruntime's ``DefaultWeightOnlyQuantizer`` configured as ``MatMulNBitsQuantizer`` configures it (QOperator)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    return DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=q.block_size, is_symmetric=q.symmetric, bits=q.bits))


class OnnxOutput(OutputWriter):
    """``model.onnx`` + ``model.onnx.data`` of one decoder.

    Args:
        spec: the architecture.
        shapes: every checkpoint tensor's shape (the plan's).
        dtype: ``"float32"`` or ``"float16"``: weights, activations, cache and logits.
        quant: MatMulNBits settings for the Linear weights (lm_head included), or None.
        opset: opset of the ONNX domain.
        lora: projection names whose Linears take LoRA inputs (``formats.onnx.lora``).

    Raises:
        UnsupportedModelError: (at construction) a tensor the graph reads is not in the checkpoint.

    Attributes:
        graph: the :class:`DecoderGraph` (its ``weights`` and ``quantized`` name the initializers).
        files: ``{file name: sha256}`` after ``end``.
    """

    def __init__(
        self, spec: DecoderSpec, shapes: dict[str, tuple[int, ...]], dtype: str, quant: QuantSpec | None, opset: int = OPSET, lora: Collection[str] = ()
    ) -> None:
        from onnx import TensorProto

        from lorasave.errors import UnsupportedModelError

        super().__init__()
        self.spec, self.dtype_name, self.quant, self.opset = spec, dtype, quant, opset
        self.np_dtype = np.dtype(np.float16 if dtype == "float16" else np.float32)
        self.graph = DecoderGraph(spec, TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT, quant, lambda n: n in shapes, lora)
        self.proto = self.graph.build()
        embed = f"{spec.prefix}embed_tokens.weight"
        # checkpoint tensor -> [(initializer entries it fills, quantized?)]
        self.sources: dict[str, list[tuple[str, bool]]] = {}
        for w in self.graph.weights:
            self.sources.setdefault(w, []).append((w, False))
        for w in self.graph.quantized:
            src = embed if w == LM_HEAD and w not in shapes else w
            self.sources.setdefault(src, []).append((w, True))
        missing = sorted(n for n in self.sources if n not in shapes)
        if missing:
            raise UnsupportedModelError(f"the checkpoint lacks {', '.join(missing[:3])}, which the {spec.model_type} ONNX graph reads")
        self.entries: dict[str, _Entry] = {}
        pos = 0

        def place(name: str, dt: np.dtype, shape: tuple[int, ...]) -> None:
            nonlocal pos
            nbytes = int(np.prod(shape)) * dt.itemsize
            if nbytes >= _ALIGN_FROM:
                pos = (pos + 4095) // 4096 * 4096
            self.entries[name] = _Entry(name, dt, shape, pos, nbytes, nbytes // shape[0] if shape and shape[0] else nbytes)
            pos += nbytes

        for src, targets in self.sources.items():
            shape = tuple(shapes[src])
            for name, quantized in targets:
                if not quantized:
                    place(name, self.np_dtype, shape)
                    continue
                assert quant is not None
                packed, scales, zeros = _quant_shapes(shape[0], int(np.prod(shape[1:])), quant)
                place(f"{name}_Q{quant.bits}", np.dtype(np.uint8), packed)
                place(f"{name}_scales", self.np_dtype, scales)
                place(f"{name}_zero_points", np.dtype(np.uint8), zeros)  # written always, referenced only when asymmetric
        self.data_bytes = pos
        self._quantizer = block_quantizer(quant) if quant is not None else None
        self._fd: int | None = None
        self._folder: Path | None = None
        self.files: dict[str, str] = {}

    @property
    def needed_bytes(self) -> int:
        return self.data_bytes + (16 << 20)

    def begin(self, folder: Path) -> None:
        self._folder = folder
        self._fd = os.open(folder / DATA_NAME, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.ftruncate(self._fd, self.data_bytes)

    def open_tensor(self, name: str) -> TensorSink | None:
        targets = self.sources.get(name)
        return None if targets is None else _Sink(self, name, targets)

    def write_rows(self, entry: str, start: int, data: np.ndarray) -> None:
        """Write rows ``start...`` of initializer ``entry`` (``data`` in its dtype, C order)."""
        e = self.entries[entry]
        buf = memoryview(np.ascontiguousarray(data)).cast("B")
        offset = e.offset + start * e.row_bytes
        assert offset + len(buf) <= e.offset + e.nbytes, entry
        assert self._fd is not None
        t0 = time.perf_counter()
        done = 0
        while done < len(buf):
            done += os.pwrite(self._fd, buf[done:], offset + done)
        self.timings.write += time.perf_counter() - t0

    def quantize_rows(self, entry: str, start: int, rows: np.ndarray) -> None:
        """Quantize rows (N block, K) of weight ``entry`` and write packed, scales and zero points."""
        assert self._quantizer is not None and self.quant is not None
        t0 = time.perf_counter()
        packed, scales, zeros = self._quantizer.qbits_block_quant(np.ascontiguousarray(rows.T))
        self.timings.merge += time.perf_counter() - t0
        self.write_rows(f"{entry}_Q{self.quant.bits}", start, packed)
        self.write_rows(f"{entry}_scales", start, scales)
        self.write_rows(f"{entry}_zero_points", start, zeros)

    def _model(self) -> Any:
        from onnx import TensorProto, helper

        graph = self.proto
        used = set(self.graph.weights) | {n for names in self.graph.quantized.values() for n in names}
        for name, e in self.entries.items():
            if name not in used:
                continue
            t = TensorProto(name=name, dims=list(e.shape), data_type=helper.np_dtype_to_tensor_dtype(e.dtype))
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", DATA_NAME), ("offset", str(e.offset)), ("length", str(e.nbytes))):
                t.external_data.add(key=key, value=value)
            graph.initializer.append(t)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset), helper.make_opsetid("com.microsoft", 1)], producer_name="lorasave")
        model.ir_version = 10
        return model

    def end(self) -> dict[str, str]:
        import onnx

        assert self._fd is not None and self._folder is not None
        os.close(self._fd)
        self._fd = None
        t0 = time.perf_counter()
        onnx.save_model(self._model(), str(self._folder / ONNX_NAME))
        self.timings.write += time.perf_counter() - t0
        t0 = time.perf_counter()
        self.files = {n: _sha256(self._folder / n) for n in (ONNX_NAME, DATA_NAME)}
        self.timings.hash += time.perf_counter() - t0
        return self.files

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_BACK):
            h.update(chunk)
    return h.hexdigest()


class _Sink:
    """One checkpoint tensor: each block cast (and quantized) and written at its rows' offsets."""

    def __init__(self, out: OnnxOutput, name: str, targets: list[tuple[str, bool]]) -> None:
        self._out, self._name, self._targets = out, name, targets

    def add(self, block: Block) -> None:
        out = self._out
        t0 = time.perf_counter()
        values = block.values if block.values.dtype == torch.float32 else block.values.float()
        rows = values.reshape(values.shape[0], -1) if values.dim() > 1 else values
        cast = rows.numpy().astype(out.np_dtype, copy=out.np_dtype == np.float32)  # a copy: the merge buffer is reused
        if block.merged and not np.isfinite(cast).all():
            check_finite(_Named(self._name), torch.from_numpy(cast.astype(np.float32)), block.start, block.stop)
        out.timings.merge += time.perf_counter() - t0
        for entry, quantized in self._targets:
            if quantized:
                out.quantize_rows(entry, block.start, cast)
            else:
                out.write_rows(entry, block.start, cast)

    def close(self) -> None:
        return None


@dataclass(frozen=True)
class _Named:
    """What ``check_finite`` reads of a planned tensor: its name."""

    name: str
