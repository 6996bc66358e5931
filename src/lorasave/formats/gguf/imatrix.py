"""Importance matrices in llama-imatrix's file layouts: read both, write the GGUF one.

An importance matrix holds, for every weight matrix ``W`` (``ncols`` inputs) that llama.cpp
multiplies, the sum over the calibration tokens of the squared input activations, ``in_sum2[j] =
Σ x_j²``, and the number of token rows summed, ``counts``; a MoE weight has one of each per expert
(``n_mat`` matrices). ``llama_model_quantize`` takes ``in_sum2 / counts`` per weight as its
``imatrix`` (the importance of each input column when rounding that weight's rows).

The GGUF layout (``tools/imatrix/imatrix.cpp`` ``save_imatrix``, llama.cpp v0.5.0): key
``general.type = "imatrix"``, ``imatrix.datasets`` (array of strings: the calibration files),
``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32); per weight, in name order,
``<name>.in_sum2`` F32 ``[ncols, n_mat]`` and ``<name>.counts`` F32 ``[1, n_mat]`` (GGML order,
fastest dimension first). The legacy ``.dat`` layout (``common/imatrix-loader.cpp``
``common_imatrix_load_legacy``): little-endian int32 ``n_entries``, then per entry int32 name
length, the name's bytes, int32 ``ncall``, int32 ``nval``, ``nval`` float32 values (already
divided by the count and multiplied by ``ncall``), then optionally int32 ``chunk_count``, int32
length and the dataset name.

:func:`load_imatrix` reads either (and a folder ``lorasave imatrix`` wrote) and gives, per weight,
exactly the floats ``tools/quantize/quantize.cpp`` ``load_imatrix`` hands to
``llama_model_quantize``: for the GGUF layout ``in_sum2 / count`` per matrix in float32, the count
rounded as ``std::lround`` rounds it, and 1.0 for a matrix whose count is not positive; for the
legacy layout the values divided by ``ncall``, or as stored when ``ncall`` is 0 or less.
:func:`write_imatrix` writes the GGUF layout byte for byte as llama-imatrix does.

A malformed or hostile file is one :class:`~lorasave.errors.ImatrixError` line: every read is
checked against the file's end (nothing is allocated beyond the file's size), entry counts and
name lengths are bounded, and a non-finite importance is refused as ``llama-quant.cpp`` refuses it.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorasave.errors import CheckpointFormatError, ImatrixError, SourceNotFoundError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: The file ``lorasave imatrix`` writes into its output folder.
IMATRIX_FILE = "imatrix.gguf"
#: Tensor name suffixes of the GGUF layout.
SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"
#: Metadata keys of the GGUF layout (``gguf.Keys.IMatrix``, ``common/imatrix-loader.h``).
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
#: ggml's ``GGML_MAX_NAME``: a GGUF tensor name has at most 63 bytes (``gguf.cpp`` refuses longer ones).
MAX_TENSOR_NAME = 63
#: Most weights one file may describe (a 1T-parameter MoE has a few thousand).
MAX_ENTRIES = 1 << 16
#: Longest weight or dataset name accepted in a legacy ``.dat`` file, in bytes.
MAX_LEGACY_NAME = 4096
#: Largest count accepted (``std::lround`` of a larger float is undefined).
MAX_COUNT = float(1 << 62)


@dataclass(frozen=True)
class ImatrixEntry:
    """The statistics of one weight.

    Attributes:
        sums: float32 ``(n_mat, ncols)``: Σ x² per input column of each matrix (GGUF layout), or
            ``(1, nval)`` values already normalised to ``ncall`` (legacy layout).
        counts: int64 ``(n_mat,)``: token rows summed per matrix, as ``std::lround`` of the stored
            float (GGUF); ``(1,)`` holding ``ncall`` (legacy).
    """

    sums: np.ndarray
    counts: np.ndarray


@dataclass
class Imatrix:
    """An importance matrix file, read.

    Attributes:
        path: the file read.
        entries: weight name (GGUF tensor name, ``blk.0.attn_q.weight``) -> its statistics.
        datasets: the calibration files it was computed from (``imatrix.datasets``).
        chunk_count: chunks evaluated (``imatrix.chunk_count``; legacy: the trailing count, or 0).
        chunk_size: tokens per chunk (``imatrix.chunk_size``; 0 for the legacy layout).
        legacy: read from the legacy ``.dat`` layout.
    """

    path: Path
    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False
    _importance: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def names(self) -> list[str]:
        """The weight names, sorted."""
        return sorted(self.entries)

    def importance(self, name: str) -> np.ndarray | None:
        """The importance of weight ``name`` as ``llama_model_quantize`` receives it, or None when absent.

        Returns:
            float32 1-D, ``n_mat * ncols`` values, matrix after matrix (see the module docstring).
        """
        if name not in self.entries:
            return None
        if name not in self._importance:
            self._importance[name] = _importance(self.entries[name], self.legacy)
        return self._importance[name]

    def importances(self) -> dict[str, np.ndarray]:
        """Every entry's :meth:`importance`: the ``imatrix`` of ``llama_model_quantize`` (name -> float32 1-D)."""
        out = {}
        for name in self.names:
            values = self.importance(name)
            assert values is not None
            out[name] = values
        return out


def _importance(e: ImatrixEntry, legacy: bool) -> np.ndarray:
    """``tools/quantize/quantize.cpp`` ``load_imatrix``'s normalisation of one entry, in float32."""
    if legacy:
        ncall = int(e.counts[0]) if e.counts.size else 0
        flat = e.sums.reshape(-1)
        return (flat / np.float32(ncall)).astype(np.float32) if ncall > 0 else flat.astype(np.float32, copy=True)
    count = e.counts.astype(np.float32)  # (float) entry.counts[j]
    positive = count > 0
    safe = np.where(positive, count, np.float32(1))[:, None]
    out = np.where(positive[:, None], e.sums / safe, np.float32(1)).astype(np.float32)
    return out.reshape(-1)


def _lround(x: np.ndarray) -> np.ndarray:
    """``std::lround`` of float32 values (half away from zero) as int64."""
    x = x.astype(np.float64)
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


def load_imatrix(path: PathLike) -> Imatrix:
    """Read an importance matrix: llama-imatrix's GGUF layout, its legacy ``.dat``, or a ``lorasave imatrix`` folder.

    Args:
        path: a file, or a folder holding ``imatrix.gguf``. A file starting with the GGUF magic is
            read as GGUF (a malformed one is an error, not retried as legacy); any other as ``.dat``.

    Returns:
        The :class:`Imatrix`, each entry checked: its importances finite.

    Raises:
        SourceNotFoundError: no such file, or a folder without ``imatrix.gguf``.
        ImatrixError: the file is malformed, not an importance matrix, a GGUF one lacks the
            ``imatrix.*`` metadata (``llama-quantize`` refuses those too), ``in_sum2``/``counts`` do
            not pair up or disagree in shape, a value is not F32, or an importance is not finite.
    """
    p = Path(path)
    if p.is_dir():
        p = p / IMATRIX_FILE
    if not p.is_file():
        raise SourceNotFoundError(f"importance matrix {path} not found (a llama-imatrix .gguf/.dat file or a lorasave imatrix folder)", path=path)
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ImatrixError(f"{p}: cannot read the importance matrix ({e.strerror or e})", path=p) from None
    imx = _read_gguf(p) if magic == b"GGUF" else _read_legacy(p)
    if not imx.entries:
        raise ImatrixError(f"{p}: the importance matrix holds no entries", path=p)
    for name in imx.names:
        values = imx.importance(name)
        assert values is not None
        if not np.isfinite(values).all():
            bad = float(values[~np.isfinite(values)][0])
            raise ImatrixError(f"{p}: imatrix contains non-finite value {bad} (entry {name!r}); llama.cpp refuses it too", path=p)
    logger.debug("%s: %d importance entries from %d chunks of %d tokens", p, len(imx.entries), imx.chunk_count, imx.chunk_size)
    return imx


# ---------------------------------------------------------------------------------------- GGUF


def _read_gguf(p: Path) -> Imatrix:
    from lorasave.formats.gguf.read import guarded, open_gguf

    with open(p, "rb") as f:
        head = f.read(24)
    if len(head) == 24:  # bound the counts before gguf-py loops over them
        n_tensors, n_kv = struct.unpack_from("<QQ", head, 8)
        if n_tensors > 2 * MAX_ENTRIES or n_kv > MAX_ENTRIES:
            raise ImatrixError(f"{p}: GGUF header claims {n_tensors} tensors and {n_kv} keys; an importance matrix has at most {2 * MAX_ENTRIES}", path=p)
    try:
        reader = open_gguf(p)
        return guarded(p, lambda: _gguf_contents(p, reader))
    except CheckpointFormatError as e:
        if isinstance(e, ImatrixError):
            raise
        raise ImatrixError(str(e).replace("not a readable GGUF file", "not a readable importance matrix GGUF"), path=p) from None


def _u32(p: Path, reader: Any, key: str) -> int:
    import gguf

    fld = reader.fields[key]
    if fld.types != [gguf.GGUFValueType.UINT32]:
        raise ImatrixError(f"{p}: {key} is {'/'.join(t.name for t in fld.types)}, not UINT32 as llama-imatrix writes it", path=p)
    return int(fld.contents())


def _gguf_contents(p: Path, reader: Any) -> Imatrix:
    import gguf

    missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in reader.fields]
    if missing:
        raise ImatrixError(
            f"{p}: missing imatrix metadata ({', '.join(missing)}): not an importance matrix llama-imatrix wrote (llama-quantize refuses it too)",
            path=p,
        )
    datasets: list[str] = []
    fld = reader.fields[KEY_DATASETS]
    if fld.types[:1] == [gguf.GGUFValueType.ARRAY] and fld.types[1:] == [gguf.GGUFValueType.STRING]:
        datasets = [str(s) for s in fld.contents()]
    chunk_count, chunk_size = _u32(p, reader, KEY_CHUNK_COUNT), _u32(p, reader, KEY_CHUNK_SIZE)
    pairs: dict[str, dict[str, Any]] = {}
    for t in reader.tensors:
        for suffix, part in ((SUMS_SUFFIX, "sums"), (COUNTS_SUFFIX, "counts")):
            if t.name.endswith(suffix) and len(t.name) > len(suffix):
                pairs.setdefault(t.name[: -len(suffix)], {})[part] = t
    if len(pairs) > MAX_ENTRIES:
        raise ImatrixError(f"{p}: {len(pairs)} entries, more than the {MAX_ENTRIES} accepted", path=p)
    entries = {}
    for name, pair in sorted(pairs.items()):
        if set(pair) != {"sums", "counts"}:
            raise ImatrixError(f"{p}: mismatched sums and counts for {name!r} (one of {name}.in_sum2 / {name}.counts is missing)", path=p)
        sums, counts = pair["sums"], pair["counts"]
        if sums.tensor_type != gguf.GGMLQuantizationType.F32 or counts.tensor_type != gguf.GGMLQuantizationType.F32:
            raise ImatrixError(f"{p}: sums and counts for {name!r} must be F32 (they are {sums.tensor_type.name}, {counts.tensor_type.name})", path=p)
        ne = [int(n) for n in sums.shape]  # GGML order: ne[0] = ncols
        n_mat = int(counts.n_elements)
        if n_mat < 1 or sums.n_elements < 1 or ne[0] * n_mat != sums.n_elements or int(counts.shape[0]) != 1:
            raise ImatrixError(
                f"{p}: {name!r}: in_sum2 {ne} and counts {[int(n) for n in counts.shape]} disagree (expected [ncols, n_mat] and [1, n_mat])",
                path=p,
            )
        raw = np.asarray(counts.data, dtype=np.float32).reshape(-1)
        if not np.isfinite(raw).all() or (np.abs(raw) > MAX_COUNT).any():
            raise ImatrixError(f"{p}: {name!r}: counts must be finite token counts (found {raw[~np.isfinite(raw) | (np.abs(raw) > MAX_COUNT)][0]})", path=p)
        values = np.array(sums.data, dtype=np.float32).reshape(n_mat, ne[0])
        entries[name] = ImatrixEntry(values, _lround(raw))
    return Imatrix(p, entries, datasets, chunk_count, chunk_size, legacy=False)


# -------------------------------------------------------------------------------------- legacy


class _Cursor:
    """Little-endian reads over a byte buffer; a read past its end raises :class:`ImatrixError`."""

    def __init__(self, p: Path, data: np.ndarray) -> None:
        self.p, self.data, self.offset = p, data, 0

    @property
    def left(self) -> int:
        return int(self.data.size) - self.offset

    def take(self, n: int, what: str) -> np.ndarray:
        if n < 0 or n > self.left:
            raise ImatrixError(
                f"{self.p}: truncated legacy importance matrix: {what} ({n} bytes at byte {self.offset}) runs past the end of the file", path=self.p
            )
        out = self.data[self.offset : self.offset + n]
        self.offset += n
        return out

    def i32(self, what: str) -> int:
        return int(self.take(4, what).view("<i4")[0])

    def name(self, what: str) -> str:
        n = self.i32(f"{what} length")
        if n < 0 or n > MAX_LEGACY_NAME:
            raise ImatrixError(f"{self.p}: legacy importance matrix: {what} of {n} bytes (at most {MAX_LEGACY_NAME})", path=self.p)
        raw = bytes(self.take(n, what)).split(b"\0", 1)[0]  # read as a C string, as llama.cpp does
        return raw.decode("utf-8", errors="replace")


def _read_legacy(p: Path) -> Imatrix:
    size = p.stat().st_size
    data = np.memmap(p, dtype=np.uint8, mode="r") if size else np.zeros(0, dtype=np.uint8)
    cur = _Cursor(p, data)
    n_entries = cur.i32("entry count") if size >= 4 else 0
    if n_entries < 1:
        raise ImatrixError(f"{p}: not an importance matrix (neither GGUF nor a legacy .dat with entries)", path=p)
    if n_entries > MAX_ENTRIES or n_entries * 12 > cur.left:
        raise ImatrixError(f"{p}: legacy importance matrix claims {n_entries} entries; the file cannot hold them (or more than {MAX_ENTRIES})", path=p)
    entries: dict[str, ImatrixEntry] = {}
    for i in range(n_entries):
        name = cur.name(f"name of entry {i + 1}")
        ncall = cur.i32(f"ncall of {name!r}")
        nval = cur.i32(f"value count of {name!r}")
        if nval < 1:
            raise ImatrixError(f"{p}: legacy importance matrix: entry {name!r} has {nval} values", path=p)
        values = np.array(cur.take(4 * nval, f"values of {name!r}").view("<f4"), dtype=np.float32).reshape(1, nval)
        if name in entries:
            raise ImatrixError(f"{p}: legacy importance matrix names {name!r} twice", path=p)
        entries[name] = ImatrixEntry(values, np.array([ncall], dtype=np.int64))
    chunk_count, datasets = 0, []
    if cur.left >= 4:  # the optional trailer: chunk count, then the dataset's name
        chunk_count = cur.i32("chunk count")
        if cur.left >= 4:
            n = int(np.asarray(cur.data[cur.offset : cur.offset + 4]).view("<i4")[0])
            if 0 < n <= min(cur.left - 4, MAX_LEGACY_NAME):
                datasets.append(cur.name("dataset name"))
    del data
    return Imatrix(p, entries, datasets, chunk_count, 0, legacy=True)


# ---------------------------------------------------------------------------------------- write


def write_imatrix(
    path: PathLike,
    sums: dict[str, np.ndarray],
    counts: dict[str, np.ndarray],
    *,
    datasets: list[str],
    chunk_count: int,
    chunk_size: int,
) -> Path:
    """Write an importance matrix in llama-imatrix's GGUF layout (``save_imatrix``), atomically.

    Keys ``general.type``, ``imatrix.datasets``, ``imatrix.chunk_count``, ``imatrix.chunk_size`` in
    that order (no ``general.architecture``), then per weight in name order ``<name>.in_sum2`` F32
    ``[ncols, n_mat]`` and ``<name>.counts`` F32 ``[1, n_mat]`` (``[ncols]`` and ``[1]`` when
    ``n_mat`` is 1: ggml drops trailing 1s from a shape); 32-byte alignment. The bytes are
    those ``gguf_write_to_file`` writes for the same values (tests/test_imatrix.py).

    Args:
        path: the file to write (replaced when it exists).
        sums: weight name -> Σ x² per input column, ``(ncols,)`` or ``(n_mat, ncols)``; cast to float32.
        counts: weight name -> token rows summed, a number or ``(n_mat,)``; stored as float32.
        datasets: calibration file names (at least one: gguf-py cannot write an empty array, and
            without the key llama-quantize refuses the file).
        chunk_count: chunks evaluated.
        chunk_size: tokens per chunk.

    Returns:
        ``path``.

    Raises:
        ImatrixError: the names of ``sums`` and ``counts`` differ, a name is too long for GGUF
            (63 bytes with its suffix), shapes disagree, a value is not finite, no dataset is given,
            or a count does not fit in u32.
    """
    import gguf

    p = Path(path)
    if set(sums) != set(counts):
        raise ImatrixError(f"sums and counts name different weights: {sorted(set(sums) ^ set(counts))[:3]}", path=p)
    if not sums:
        raise ImatrixError("an importance matrix needs at least one weight", path=p)
    if not datasets:
        raise ImatrixError("an importance matrix needs at least one dataset name (imatrix.datasets)", path=p)
    for what, n in (("chunk_count", chunk_count), ("chunk_size", chunk_size)):
        if not 0 <= int(n) < 1 << 32:
            raise ImatrixError(f"{what} {n} does not fit the u32 llama-imatrix stores", path=p)
    arrays = []
    for name in sorted(sums):
        if len((name + SUMS_SUFFIX).encode()) > MAX_TENSOR_NAME:
            raise ImatrixError(f"weight name {name!r} is too long for a GGUF tensor name ({MAX_TENSOR_NAME} bytes with {SUMS_SUFFIX})", path=p)
        s = np.asarray(sums[name], dtype=np.float32)
        s = s.reshape(1, -1) if s.ndim == 1 else s
        c = np.asarray(counts[name], dtype=np.float32).reshape(-1, 1)
        if s.ndim != 2 or s.shape[0] != c.shape[0] or s.size == 0:
            raise ImatrixError(f"{name!r}: sums {s.shape} and counts {c.shape[0]} disagree (expected (n_mat, ncols) and (n_mat,))", path=p)
        if not (np.isfinite(s).all() and np.isfinite(c).all()):
            raise ImatrixError(f"{name!r}: imatrix contains non-finite value", path=p)
        if s.shape[0] == 1:  # ggml writes a shape without its trailing 1s (ggml_n_dims): [ncols], [1]
            s, c = s.reshape(-1), c.reshape(-1)
        arrays.append((name, np.ascontiguousarray(s), np.ascontiguousarray(c)))
    writer = gguf.GGUFWriter(None, arch="")
    writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes no architecture
    writer.add_type(gguf.GGUFType.IMATRIX)
    writer.add_array(gguf.Keys.IMatrix.DATASETS, [str(d) for d in datasets])
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, int(chunk_count))
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, int(chunk_size))
    for name, s, c in arrays:
        writer.add_tensor(name + SUMS_SUFFIX, s)
        writer.add_tensor(name + COUNTS_SUFFIX, c)
    tmp = p.with_name(f".{p.name}.lorasave-tmp")
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p
