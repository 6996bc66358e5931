"""One GGUF model file as a writer of the pass.

The header, metadata and tensor infos are written at ``begin`` (every type and size is known from
the plan: ``formats.gguf.export.gguf_tensors``); then each tensor's blocks are encoded as they
arrive (``formats.gguf.stream.EncodedTensor``), Q/K rows permuted once the tensor is complete, and
the finished tensor queued for the writer thread (``HashingWriteBehind``), which writes and hashes
it. The generated tensors (``rope_freqs``) come first, as in the converter's ``prepare_tensors``
(``generate_extra_tensors`` before the checkpoint's). Tensors must arrive in the
order of the tensor infos (the plan's order, a stacked expert tensor's pieces one after the other):
:meth:`GgufOutput.order`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from lorasave.formats.gguf.experts import Take
from lorasave.formats.gguf.quant import encode
from lorasave.formats.gguf.stream import EncodedTensor, HashingWriteBehind
from lorasave.formats.writer import OutputWriter, TensorSink
from lorasave.merging.stream import Block, check_finite
from lorasave.pipeline.manifest import sha256_file
from lorasave.plan.merge_plan import OutputTensor

logger = logging.getLogger(__name__)


class _Sink:
    """One planned tensor's blocks, fed to every GGUF tensor it is a piece of (``GgufTensor.parts``).

    A GGUF tensor with a whole-tensor ``transform`` (``GgufArch.transforms``) gets the piece's blocks
    copied to float32 until the piece is complete, then the transform of the whole piece.
    """

    def __init__(self, out: GgufOutput, src: OutputTensor, feeds: list[tuple[Any, Take | None]]) -> None:
        self._out, self._src, self._feeds = out, src, feeds
        self._whole: dict[str, list[torch.Tensor]] = {g.name: [] for g, _ in feeds if g.transform is not None}
        for g, _ in feeds:
            if g.name not in out.encoding:  # its first piece: start encoding the GGUF tensor
                out.encoding[g.name] = EncodedTensor(g.shape, g.qtype, g.nbytes, g.shift, g.rows, ggml=out.ggml, importance=g.importance)

    def add(self, block: Block) -> None:
        if block.merged:
            check_finite(self._src, block.values, block.start, block.stop)
        for g, take in self._feeds:
            values = block.values if take is None else take(block.values)
            if g.name in self._whole:  # a block is valid until the next one: keep a float32 copy
                self._whole[g.name].append(values.to(torch.float32, copy=True))
            else:
                self._out.encoding[g.name].add(values, self._out.timings)

    def close(self) -> None:
        for g, _ in self._feeds:
            if g.name in self._whole:
                blocks = self._whole.pop(g.name)
                whole = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
                self._out.encoding[g.name].add(g.transform(whole.contiguous()), self._out.timings)
            if self._out.last[g.name] != self._src.name:
                continue  # more experts to come
            data = self._out.encoding.pop(g.name).result()  # uint8 (rows, row_bytes)
            if g.permute_heads is not None:  # rows are encoded independently: permute the encoded rows
                data = self._out.permute(data, *g.permute_heads)
            self._out.behind.put(data.numpy())


class GgufOutput(OutputWriter):
    """One ``.gguf`` file.

    Args:
        filename: the file's name in the staging folder.
        start: writes the header, metadata and tensor infos to a path and returns the open
            ``gguf.GGUFWriter`` (``formats.gguf.export.start_gguf``).
        tensors: the checkpoint tensors (``GgufTensor``), in tensor-info order.
        extras: the generated tensors (``ExtraTensor``), written first.
        permute: the Q/K row permutation (``formats.gguf.export.permute_qk``) applied to encoded rows.
        ggml: encode with llama.cpp's ``ggml_quantize_chunk`` (a k-quant file: every tensor but the
            F32 ones, so that each is byte for byte what ``llama_model_quantize`` writes).

    Attributes:
        sha256, length: of the finished file, after ``end``.
    """

    def __init__(
        self,
        filename: str,
        start: Callable[[Path], gguf.GGUFWriter],
        tensors: list[Any],
        extras: list[Any],
        permute: Callable[[torch.Tensor, int, int | None], torch.Tensor],
        ggml: bool = False,
    ) -> None:
        super().__init__()
        self.ggml = ggml
        self.permute = permute
        self.filename = filename
        self._start = start
        self.tensors = tensors
        self.extras = extras
        self._feeds: dict[str, list[tuple[Any, Take | None]]] = {}
        self._srcs: dict[str, OutputTensor] = {}
        for g in tensors:
            for p in g.parts:
                self._feeds.setdefault(p.src.name, []).append((g, p.take))
                self._srcs[p.src.name] = p.src
        #: GGUF name -> the planned tensor whose close completes it; GGUF name -> its encoding so far.
        self.last: dict[str, str] = {g.name: g.parts[-1].src.name for g in tensors}
        self.encoding: dict[str, EncodedTensor] = {}
        self._path: Path | None = None
        self._writer: gguf.GGUFWriter | None = None
        self.behind: HashingWriteBehind
        self.sha256: str | None = None

    @property
    def needed_bytes(self) -> int:
        return sum(g.nbytes for g in self.tensors) + sum(e.nbytes for e in self.extras) + (16 << 20)

    def order(self) -> list[str]:
        """Each tensor's pieces, tensor after tensor: a stacked tensor's experts consecutively."""
        return list(dict.fromkeys(p.src.name for g in self.tensors for p in g.parts))

    def begin(self, folder: Path) -> None:
        self._path = folder / self.filename
        self._writer = self._start(self._path)
        self.behind = HashingWriteBehind(self._writer, self.timings)
        for e in self.extras:
            self.behind.put(encode(e.data, e.qtype, ggml=self.ggml))

    def open_tensor(self, name: str) -> TensorSink | None:
        feeds = self._feeds.get(name)
        return None if feeds is None else _Sink(self, self._srcs[name], feeds)

    def end(self) -> dict[str, str]:
        digest, length = self.behind.finish()
        assert self._writer is not None and self._path is not None
        self._writer.close()
        if self._path.stat().st_size != length:  # cannot happen unless gguf-py changes its padding
            logger.warning("hashed %d bytes but %s has %d; hashing the file again", length, self.filename, self._path.stat().st_size)
            digest = sha256_file(self._path)
        self.sha256 = digest
        return {self.filename: digest}

    def abort(self) -> None:
        if hasattr(self, "behind"):
            self.behind.abandon()

    def counts(self) -> dict[str, int]:
        """GGML type name -> number of tensors of that type."""
        out: dict[str, int] = {}
        for g in [*self.tensors, *self.extras]:
            out[g.qtype.name] = out.get(g.qtype.name, 0) + 1
        return out

    def n_params(self) -> int:
        """Parameters of the file's tensors (``general.size_label``)."""
        return sum(int(np.prod(g.shape)) for g in self.tensors) + sum(int(e.data.size) for e in self.extras)
