"""Reading a base checkpoint: locate it, validate its index and headers, read tensors in slices.

A base is a folder in the Hugging Face layout (``config.json`` plus ``model.safetensors`` or
``model-0000k-of-0000N.safetensors`` with ``model.safetensors.index.json``), or a Hub id found in
the local Hugging Face cache (``huggingface_hub.snapshot_download(local_files_only=True)``; no
network call). Tensor names, dtypes and shapes come from the headers alone; data is read with
positional OS reads, a row slice at a time, so the resident set holds only the slice in flight.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorasave.errors import CheckpointFormatError, PickleRefusedError, SourceNotFoundError, UnsafePathError
from lorasave.formats.quant_bases import QuantizedWeight, check_quant_method, group_quantized
from lorasave.formats.safetensors.header import TensorEntry, pread_exact, read_header
from lorasave.sources.stamp import changed, check_fd
from lorasave.util.dtypes import StDtype, nbytes, st_dtype
from lorasave.util.jsonio import read_json
from lorasave.util.paths import check_inside

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def resolve_source(spec: str | os.PathLike[str], what: str) -> tuple[Path, str | None]:
    """Turn a folder path or a Hub id into a local folder.

    Args:
        spec: a local folder, or a Hub id such as ``HuggingFaceTB/SmolLM2-135M`` present in the
            local Hugging Face cache.
        what: ``"base"`` or ``"adapter"``, for messages.

    Returns:
        ``(folder, hub_id)``; ``hub_id`` is None for a local folder.

    Raises:
        SourceNotFoundError: neither a folder nor a cached Hub id.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return path, None
    if path.exists():
        raise SourceNotFoundError(f"{what} {spec} is a file; give the folder that holds config.json and the weights", path=path)
    text = str(spec)
    if _HUB_ID.match(text) and not text.startswith((".", "/")):
        folder = cached_hub_folder(text)
        if folder is not None:
            return folder, text
        if folder is None:
            raise SourceNotFoundError(
                f"{what} {spec!r} is not a folder, and not a Hub id in the local Hugging Face cache; "
                f"download it first (hf download {text}) or give a local folder",
                path=path,
            )
    raise SourceNotFoundError(f"{what} folder {spec} does not exist", path=path)


def cached_hub_folder(hub_id: str) -> Path | None:
    """The local Hugging Face cache's snapshot folder of ``hub_id`` (no network), or None when it is not there."""
    if not _HUB_ID.match(hub_id) or hub_id.startswith((".", "/")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:
        return None


def _check_plain_name(index_path: Path, name: object) -> str:
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name or Path(name).is_absolute():
        raise UnsafePathError(
            f"{index_path}: weight_map entry {name!r} is not a plain file name in the same folder; refusing to read it",
            path=index_path,
        )
    return name


@dataclass
class Checkpoint:
    """A base checkpoint: config, files and tensor table.

    Attributes:
        root: the folder.
        hub_id: the Hub id it was resolved from, if any.
        config: parsed ``config.json``.
        weight_files: safetensors files, in index order.
        index_path: the index file, when sharded.
        tensors: entry per tensor name, in the checkpoint's own order (file by file, by offset);
            a quantized weight (bitsandbytes, FP8) appears once, as a ``QuantizedWeight``, its
            statistics and scales folded in.
        quant_method: ``"bitsandbytes"`` or ``"fp8"`` for a quantized base, else None.
    """

    root: Path
    hub_id: str | None
    config: dict[str, Any]
    weight_files: list[Path]
    index_path: Path | None
    tensors: dict[str, TensorEntry | QuantizedWeight] = field(default_factory=dict)
    quant_method: str | None = None

    @property
    def nbytes(self) -> int:
        """Total bytes of tensor data."""
        return sum(e.nbytes for e in self.tensors.values())

    def source_files(self) -> list[Path]:
        """Every file whose content defines the weights (config, index, shards)."""
        files = [self.root / "config.json"]
        if self.index_path is not None:
            files.append(self.index_path)
        return files + list(self.weight_files)


def open_checkpoint(spec: str | os.PathLike[str]) -> Checkpoint:
    """Locate a base checkpoint and read its config, index and safetensors headers.

    Raises:
        SourceNotFoundError: no such folder / cached id.
        CheckpointFormatError: missing config.json or weights, malformed files, an index naming a
            missing shard or a tensor absent from its shard.
        UnsafePathError: an index entry that is not a plain file name, or a config, index or shard
            that is a symlink leaving the folder (``paths`` has the rule; the Hugging Face cache's
            ``snapshots/<rev>/x -> ../../blobs/<sha>`` links are followed).
        PickleRefusedError: only pickle weights (``pytorch_model.bin``) are present.
    """
    root, hub_id = resolve_source(spec, "base")
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        if (root / "adapter_config.json").is_file():
            from lorasave.util.hints import command_hint

            raise CheckpointFormatError(f"{root} is a PEFT adapter, not a base model; put the base first: {command_hint('BASE ADAPTER')}", path=root)
        raise CheckpointFormatError(f"{root}: no config.json; BASE must be a Hugging Face model folder", path=root)
    config = read_json(check_inside(cfg_path, root))
    archs = config.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise CheckpointFormatError(f"{cfg_path}: architectures must be a list of class names, got {archs!r}; fix or re-download the file", path=cfg_path)
    index_path = root / SAFE_WEIGHTS_INDEX_NAME
    tensors: dict[str, TensorEntry] = {}
    if index_path.is_file():
        index = read_json(check_inside(index_path, root))
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointFormatError(f"{index_path}: no weight_map; re-download the index", path=index_path)
        files: list[str] = []
        for fname in weight_map.values():
            if _check_plain_name(index_path, fname) not in files:
                files.append(fname)
        files.sort()
        headers = {}
        for fname in files:
            p = root / fname
            try:
                present = p.is_file()
            except OSError:  # a name the file system refuses (too long...)
                present = False
            if not present:
                raise CheckpointFormatError(f"{index_path} names shard {fname}, which is missing; download it again", path=p)
            headers[fname] = read_header(check_inside(p, root))
        for fname in files:
            for name, entry in headers[fname].tensors.items():
                if weight_map.get(name) == fname:
                    tensors[name] = entry
        for name, fname in weight_map.items():
            if name not in tensors:
                raise CheckpointFormatError(
                    f"{index_path} puts tensor {name!r} in {fname}, which does not contain it; re-download the index and its shards", path=index_path
                )
        weight_files = [root / f for f in files]
    elif (root / SAFE_WEIGHTS_NAME).is_file():
        header = read_header(check_inside(root / SAFE_WEIGHTS_NAME, root))
        tensors = dict(header.tensors)
        weight_files = [root / SAFE_WEIGHTS_NAME]
        index_path = None
    else:
        if any((root / n).exists() for n in PICKLE_WEIGHTS):
            raise PickleRefusedError(
                f"{root} has only pickle weights (pytorch_model.bin), which can run code when loaded; convert them to safetensors first",
                path=root,
            )
        raise CheckpointFormatError(f"{root}: no model.safetensors or model.safetensors.index.json", path=root)
    # keep the checkpoint's own order: file by file, by offset
    order = sorted(tensors.values(), key=lambda e: (weight_files.index(e.file), e.offset))
    ckpt = Checkpoint(root, hub_id, config, weight_files, index_path, {e.name: e for e in order})
    ckpt.quant_method = check_quant_method(config, str(root))
    if ckpt.quant_method is not None:
        with TensorReader() as reader:
            weights, used = group_quantized(ckpt.quant_method, config, ckpt.tensors, lambda e: reader.read(e).numpy().tobytes(), cfg_path)
        ckpt.tensors = logical_tensors(ckpt.tensors, weights, used)
    return ckpt


def logical_tensors(entries: dict[str, Any], weights: dict[str, Any], used: set[str]) -> dict[str, Any]:
    """The checkpoint's tensors with each quantized weight in place of the entries it consumes, where the first
    of them stood (an MXFP4 parameter has no entry of its own name: it stands where its ``_blocks`` did)."""
    owner = {e.name: w.name for w in weights.values() for e in w.entries()}
    logical: dict[str, Any] = {}
    for name, entry in entries.items():
        if name in owner:
            logical.setdefault(owner[name], weights[owner[name]])
        elif name in weights:
            logical[name] = weights[name]
        elif name not in used:
            logical[name] = entry
    return logical


@dataclass(frozen=True)
class MemoryEntry:
    """A tensor of a model in memory, standing where a file entry would (``save_pretrained_merged``).

    Attributes:
        name, dtype, shape, nbytes: as ``TensorEntry``.
        tensor: the tensor itself (read, never modified).
    """

    name: str
    dtype: StDtype
    shape: tuple[int, ...]
    nbytes: int
    tensor: torch.Tensor = field(compare=False, repr=False)

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> MemoryEntry:
        """Wrap a tensor."""
        dt = st_dtype(tensor.dtype)
        shape = tuple(tensor.shape)
        return cls(name, dt, shape, nbytes(dt, shape), tensor)


class TensorReader:
    """Reads tensors, or slices of their first dimension, from safetensors files by OS reads.

    Use as a context manager; file descriptors are opened lazily and closed on exit.
    """

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self.bytes_read = 0
        self._lock = threading.Lock()  # the pass's worker threads open files through one reader

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every open file."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _fd(self, entry: TensorEntry) -> int:
        """The open file of ``entry``, checked against the stamp taken when its header was read."""
        path = entry.file
        fd = self._fds.get(path)
        if fd is not None:
            return fd
        with self._lock:
            return self._open(entry)

    def _open(self, entry: TensorEntry) -> int:
        path = entry.file
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise changed(path, "it was deleted") from None
            except OSError as e:
                raise CheckpointFormatError(f"{path}: cannot be opened ({e.strerror or e})", path=path) from None
            try:
                check_fd(path, fd, entry.stamp)
            except BaseException:
                os.close(fd)
                raise
            self._fds[path] = fd
        return fd

    def read(self, entry: TensorEntry | MemoryEntry, start: int = 0, stop: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read rows ``[start, stop)`` of the first dimension of ``entry`` (all of it by default).

        Args:
            entry: where the tensor lives.
            start, stop: row range; a 0-d tensor is one row.
            out: optional contiguous buffer of the entry's dtype with at least the rows' elements;
                the result is a view of it.

        Returns:
            A tensor of shape ``(stop - start, *entry.shape[1:])`` in the entry's dtype.

        Raises:
            CheckpointFormatError: the dtype has no torch equivalent, or the file cannot be read
                (the message names it).
            SourceChangedError: the file was truncated, replaced or rewritten since its header was read.
        """
        if isinstance(entry, MemoryEntry):
            t = entry.tensor.detach()
            rows_t = t[start:stop] if t.dim() else t
            return rows_t.clone() if out is None else out.view(-1)[: rows_t.numel()].view(rows_t.shape).copy_(rows_t)
        dt = entry.dtype.torch_dtype
        if dt is None:
            raise CheckpointFormatError(f"{entry.file}: tensor {entry.name!r} has dtype {entry.dtype.name}, which torch cannot read", path=entry.file)
        rows = entry.shape[0] if entry.shape else 1
        stop = rows if stop is None else stop
        inner = entry.shape[1:] if entry.shape else ()
        row_elems = 1
        for d in inner:
            row_elems *= d
        count = (stop - start) * row_elems
        nbytes = count * entry.dtype.bits // 8
        if out is None:
            buf = torch.empty(count, dtype=dt)
        else:
            buf = out.view(-1)[:count]
        if nbytes:
            view = memoryview(buf.view(torch.uint8).numpy()).cast("B")
            pread_exact(self._fd(entry), nbytes, entry.offset + start * row_elems * entry.dtype.bits // 8, view, entry.file)
            self.bytes_read += nbytes
        shape = (stop - start, *inner) if entry.shape else ()
        return buf.view(shape)
