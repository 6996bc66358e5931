"""The ``lorasave.json`` manifest that makes every output self-describing.

It records the sources (paths, Hub ids and the sha256 of every file that defines them), the
settings, the lorasave version, and the sha256 and size in bytes of every file written, so
``lorasave verify OUT`` needs nothing else.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lorasave.sources import cache

MANIFEST_NAME = "lorasave.json"
MANIFEST_FORMAT = 1
_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks (hashlib releases the GIL on large updates)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sources_record(ckpt: Any, adapters: Sequence[Any]) -> dict[str, Any]:
    """``sources.base`` and ``sources.adapters`` of ``lorasave.json``: each folder's path and the sha256 of
    every file read from it (``Checkpoint.source_files`` / ``Adapter.source_files``, paths relative to it)."""
    return {
        "base": {
            "path": str(ckpt.root.resolve()),
            "hub_id": ckpt.hub_id,
            "files": {str(p.relative_to(ckpt.root)): sha256_source(p) for p in ckpt.source_files()},
        },
        "adapters": [{"path": str(a.root.resolve()), "files": {str(p.relative_to(a.root)): sha256_source(p) for p in a.source_files()}} for a in adapters],
    }


def sha256_source(path: Path) -> str:
    """sha256 of a source file, remembered by its stat identity (``cache.stat_key``) across runs."""
    key = cache.stat_key(path)
    hit = cache.get("sha256", key)
    if isinstance(hit, str) and len(hit) == 64 and all(c in "0123456789abcdef" for c in hit):
        return hit
    digest = sha256_file(path)
    if cache.stat_key(path) == key:  # unchanged while it was read
        cache.put("sha256", digest, key)
    return digest


class SourceHasher:
    """Hashes source files on a background thread while the merge runs."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorasave-hash")
        self._jobs: dict[Path, Future[str]] = {}

    def submit(self, paths: list[Path]) -> None:
        """Queue files for hashing (each once)."""
        for p in paths:
            if p not in self._jobs:
                self._jobs[p] = self._pool.submit(sha256_source, p)

    def result(self, paths: list[Path], root: Path) -> dict[str, str]:
        """``{path relative to root: sha256}`` for ``paths``, waiting for the jobs."""
        return {str(p.relative_to(root)): self._jobs[p].result() for p in paths}

    def close(self) -> None:
        """Stop the worker (pending jobs are cancelled)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def result_dict(result: Any) -> dict[str, Any]:
    """JSON-ready form of a result dataclass (``--json``): ``dataclasses.asdict`` with its ``Path`` fields (and lists of them) as strings."""
    from dataclasses import asdict

    def plain(v: Any) -> Any:
        return str(v) if isinstance(v, Path) else [plain(x) for x in v] if isinstance(v, list) else v

    return {k: plain(v) for k, v in asdict(result).items()}


def write_manifest(folder: Path, *, command: str, sources: dict[str, Any], settings: dict[str, Any], result: dict[str, Any], files: dict[str, str]) -> Path:
    """Write ``lorasave.json`` into ``folder``.

    Args:
        folder: the staging folder.
        command: ``"merge"``, ``"adapter"``, ...
        sources: description of the inputs with their file hashes.
        settings: the options used.
        result: summary figures of the run.
        files: ``{file name: sha256}`` of every written file except the manifest; sizes are read here.

    Returns:
        The manifest's path.
    """
    from lorasave import __version__

    doc = {
        "format": MANIFEST_FORMAT,
        "lorasave_version": __version__,
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "sources": sources,
        "settings": settings,
        "result": result,
        "files": {n: {"sha256": h, "bytes": (folder / n).stat().st_size} for n, h in sorted(files.items())},
    }
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path
