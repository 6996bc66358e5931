"""Noticing a source file that changes under a running save.

When a safetensors header is read, the file's identity is recorded: size, modification time
(nanoseconds) and inode. Reads check it when they open the file, a short read means the file
shrank, and every save checks all its sources once more just before the output is put in place.
A shard truncated, replaced (a new inode) or rewritten (a new mtime) during the run therefore
stops it with ``SourceChangedError`` naming the file, instead of a merge of mixed bytes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorasave.errors import SourceChangedError


@dataclass(frozen=True)
class Stamp:
    """A file's identity: ``(size, mtime_ns, inode)`` (and the device, so an inode is unique)."""

    size: int
    mtime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, st: os.stat_result) -> Stamp:
        """The stamp of a ``stat`` result."""
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)

    def differences(self, now: Stamp) -> str:
        """What changed, for a message: ``"size 100 -> 50, mtime ..."``; empty when identical."""
        parts = []
        if now.size != self.size:
            parts.append(f"size {self.size:,} -> {now.size:,} bytes")
        if now.mtime_ns != self.mtime_ns:
            parts.append("modification time changed")
        if (now.inode, now.device) != (self.inode, self.device):
            parts.append("replaced by another file")
        return ", ".join(parts)


def changed(path: Path, what: str) -> SourceChangedError:
    """The error for ``path``, which changed during the run (``what`` says how)."""
    return SourceChangedError(f"{path} changed during the run ({what}); rerun once it no longer changes", path=path)


def check_fd(path: Path, fd: int, stamp: Stamp | None) -> None:
    """Check an open file against the stamp recorded when its header was read.

    Raises:
        SourceChangedError: size, mtime or inode differ.
    """
    if stamp is None:
        return
    diff = stamp.differences(Stamp.of(os.fstat(fd)))
    if diff:
        raise changed(path, diff)


def check_unchanged(stamps: dict[Path, Stamp]) -> None:
    """Check every source file against its recorded stamp (before the output is put in place).

    Raises:
        SourceChangedError: a file changed or disappeared.
    """
    for path, stamp in stamps.items():
        try:
            now = Stamp.of(os.stat(path))
        except FileNotFoundError:
            raise changed(path, "it was deleted") from None
        except OSError as e:
            raise changed(path, f"it can no longer be read: {e.strerror}") from None
        diff = stamp.differences(now)
        if diff:
            raise changed(path, diff)


def _file_entries(value: Any) -> Iterable[Any]:
    entries = getattr(value, "entries", None)
    if callable(entries):  # a quantized weight: several checkpoint entries
        return entries()
    return [value]


def record(ckpt: Any, adapters: Iterable[Any] = ()) -> dict[Path, Stamp]:
    """The stamps of a run's source files: the weight files' from when their headers were read,
    the others' (config, index, adapter config) from now.

    Args:
        ckpt: a ``Checkpoint`` (or None); its ``tensors`` and ``source_files()`` are used.
        adapters: ``Adapter`` objects; their ``entries`` and ``source_files()`` are used.
    """
    stamps: dict[Path, Stamp] = {}
    groups: list[tuple[Iterable[Any], list[Path]]] = []
    if ckpt is not None:
        groups.append((ckpt.tensors.values(), ckpt.source_files()))
    for ad in adapters:
        groups.append((ad.entries.values(), ad.source_files()))
    for values, files in groups:
        for value in values:
            for e in _file_entries(value):
                stamp = getattr(e, "stamp", None)
                if stamp is not None:
                    stamps.setdefault(e.file, stamp)
        for f in files:
            if f not in stamps:
                try:
                    stamps[f] = Stamp.of(os.stat(f))
                except OSError:  # a live model's placeholder path, a file never read
                    continue
    return stamps
