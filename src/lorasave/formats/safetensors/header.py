"""The safetensors file format: header parsing with validation, header serialization.

Format (https://huggingface.co/docs/safetensors, ``safetensors/src/tensor.rs``):
8 bytes little-endian u64 ``N``, then ``N`` bytes of UTF-8 JSON
``{"__metadata__": {str: str}, name: {"dtype": D, "shape": [..], "data_offsets": [begin, end]}, ...}``
padded with spaces to a multiple of 8, then the data buffer; offsets are relative to the buffer.
``serialize`` orders tensors by dtype (descending enum order) then name, writes them
contiguously, lists them in the header in that order, and puts ``__metadata__`` first.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lorasave.errors import CheckpointFormatError
from lorasave.sources.stamp import Stamp, changed
from lorasave.util.dtypes import ST_DTYPES, StDtype, nbytes
from lorasave.util.jsonio import InvalidJsonError, parse_json

#: Largest header safetensors itself accepts (``N_MAX`` in tensor.rs): 100 MB.
MAX_HEADER_BYTES = 100_000_000

#: Largest element count (and dimension) a tensor may have: what torch and numpy index with.
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a safetensors file.

    Attributes:
        name: tensor name.
        dtype: safetensors dtype.
        shape: tensor shape.
        file: the file holding it.
        offset: absolute byte offset of its first byte in ``file``.
        nbytes: its length in bytes.
        stamp: the file's identity when the header was read (reads check it).
    """

    name: str
    dtype: StDtype
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int
    stamp: Stamp | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed, validated safetensors header.

    Attributes:
        path: the file.
        metadata: the ``__metadata__`` dict (may be empty).
        tensors: entries by name, in header order.
        data_start: byte offset of the data buffer (8 + header length).
        stamp: the file's identity (size, mtime, inode) when the header was read.
    """

    path: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]
    data_start: int
    stamp: Stamp | None = None


def _bad(path: Path, what: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{path}: not a valid safetensors file ({what}); re-download or re-save it", path=path)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_extent(path: Path, name: str, dt: StDtype, shape: list[int], file_size: int) -> None:
    """Refuse shapes no file can hold: an element count past int64, or a zero dimension beside a huge one.

    The count of the non-zero dimensions is computed with Python ints, stopping as soon as it
    passes ``INT64_MAX`` (torch and numpy multiply in int64 and overflow or hang on such shapes).
    An empty tensor's other dimensions must still fit in the file: ``[0, 2**62]`` is refused.
    """
    count = 1
    for d in shape:
        if d > INT64_MAX:
            raise _bad(path, f"tensor {name!r} has a dimension of {d} elements, past the int64 limit")
        count *= max(d, 1)
        if count > INT64_MAX:
            raise _bad(path, f"tensor {name!r} has shape {_short(shape)}, whose element count overflows int64")
    if 0 in shape and nbytes(dt, tuple(max(d, 1) for d in shape)) > file_size:
        raise _bad(path, f"tensor {name!r} has shape {_short(shape)}: a zero dimension beside dimensions larger than the file could hold")


def read_header(path: str | Path) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file without reading tensor data.

    Checks: header length fits the file and ``MAX_HEADER_BYTES``, JSON is an object nested at
    most ``jsonio.MAX_DEPTH`` deep, every entry has a known dtype, a shape of non-negative ints
    whose element count fits in int64 (an empty tensor's other dimensions fitting in the file), offsets inside the data buffer
    whose length equals ``prod(shape) * itemsize``, offsets that neither overlap nor leave
    holes, and a buffer that ends where the file ends.

    Raises:
        SourceNotFoundError: the file does not exist (as FileNotFoundError from ``open``).
        CheckpointFormatError: any check fails; the message names the file and the problem.
    """
    path = Path(path)
    with open(path, "rb") as f:
        stamp = Stamp.of(os.fstat(f.fileno()))
        size = stamp.size
        head = f.read(8)
        if len(head) < 8:
            raise _bad(path, f"file is {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise _bad(path, f"header length {n} bytes exceeds the 100 MB limit")
        if 8 + n > size:
            raise _bad(path, f"header length {n} bytes is larger than the file ({size} bytes); it is truncated")
        raw = f.read(n)
    if len(raw) != n:
        raise changed(path, f"it ended inside its {n}-byte header")
    try:
        obj = parse_json(raw)
    except InvalidJsonError as e:
        raise _bad(path, f"header is not UTF-8 JSON: {e}") from None
    if not isinstance(obj, dict):
        raise _bad(path, "header is not a JSON object")
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(path, "__metadata__ must map strings to strings")
    data_start = 8 + n
    data_len = size - data_start
    tensors: dict[str, TensorEntry] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in obj.items():
        if not isinstance(info, dict):
            raise _bad(path, f"entry {name!r} is not an object")
        dt = ST_DTYPES.get(info["dtype"]) if isinstance(info.get("dtype"), str) else None
        if dt is None:
            raise _bad(path, f"tensor {name!r} has unknown dtype {info.get('dtype')!r}")
        shape = info.get("shape")
        offs = info.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise _bad(path, f"tensor {name!r} has an invalid shape {_short(shape)}")
        _check_extent(path, name, dt, shape, size)
        if not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs) or not 0 <= offs[0] <= offs[1]:
            raise _bad(path, f"tensor {name!r} has invalid data_offsets {offs!r}")
        if offs[1] > data_len:
            raise _bad(path, f"tensor {name!r} ends at byte {offs[1]} but the data buffer has {data_len} bytes; the file is truncated")
        expect = nbytes(dt, tuple(shape))
        if offs[1] - offs[0] != expect:
            raise _bad(
                path,
                f"tensor {name!r} has {offs[1] - offs[0]} bytes but dtype {dt.name} and shape {shape} need {expect}",
            )
        spans.append((offs[0], offs[1], name))
        tensors[name] = TensorEntry(name, dt, tuple(shape), path, data_start + offs[0], expect, stamp)
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else "leaves a gap before it"
            raise _bad(path, f"tensor {name!r} at offset {begin} {what}")
        pos = end
    if pos != data_len:
        raise _bad(path, f"data buffer has {data_len} bytes but the tensors cover {pos}")
    return SafetensorsHeader(path, dict(metadata), tensors, data_start, stamp)


@dataclass(frozen=True)
class TensorLayout:
    """One tensor's place in a file lorasave is about to write."""

    name: str
    dtype: StDtype
    shape: tuple[int, ...]
    begin: int
    end: int


def layout(tensors: Iterable[tuple[str, StDtype, tuple[int, ...]]]) -> list[TensorLayout]:
    """Order tensors as ``safetensors.serialize`` does and assign their data offsets.

    Args:
        tensors: ``(name, dtype, shape)`` triples in any order.

    Returns:
        The layouts in file order: dtype descending (enum rank), then name ascending.
    """
    items = sorted(tensors, key=lambda t: (-t[1].rank, t[0]))
    out: list[TensorLayout] = []
    pos = 0
    for name, dt, shape in items:
        n = nbytes(dt, shape)
        out.append(TensorLayout(name, dt, tuple(shape), pos, pos + n))
        pos += n
    return out


def serialize_header(entries: list[TensorLayout], metadata: dict[str, str] | None) -> bytes:
    """The bytes before the data buffer: u64 length + JSON header padded with spaces to 8 bytes.

    Byte-identical to what ``safetensors.torch.save_file`` writes for the same tensors and
    metadata (checked by the golden-bytes tests).
    """
    obj: dict[str, object] = {}
    if metadata:
        obj["__metadata__"] = dict(metadata)
    for e in entries:
        obj[e.name] = {"dtype": e.dtype.name, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def pread_exact(fd: int, nbytes_: int, offset: int, out: memoryview, path: Path | str = "source file") -> None:
    """Read exactly ``nbytes_`` bytes at ``offset`` of ``fd`` (the file ``path``) into ``out`` (OS reads, no mmap).

    Reading with ``os.preadv`` rather than memory-mapping keeps the page cache out of the
    process's resident set, so peak RSS stays at the few buffers in flight.

    Raises:
        SourceChangedError: the file ended early (it was truncated while being read).
        CheckpointFormatError: the OS refused the read (an I/O error); the message names ``path``.
    """
    done = 0
    while done < nbytes_:
        try:
            got = os.preadv(fd, [out[done:nbytes_]], offset + done)
        except OSError as e:
            raise CheckpointFormatError(f"{path}: cannot be read ({e.strerror or e}); check the disk or copy the file again", path=path) from None
        if got <= 0:
            raise changed(Path(path), f"it ended while reading {nbytes_:,} bytes at offset {offset:,}")
        done += got
