"""A small on-disk cache for facts that are slow to recompute and fully determined by their key.

- Architecture facts (``architecture.ArchitectureInfo``), keyed by the sha256 of ``config.json``
  and the transformers and lorasave versions: skips importing transformers and building the
  model on the meta device (about 2.5 s) on later runs of the same base.
- File sha256s, keyed by the file's stat identity (device, inode, size, mtime and ctime in ns),
  as git's index and rsync do: any write to the file changes its ctime, so a stale hash is never
  returned. Saves re-reading multi-GB sources only to hash them.

Location: ``$LORASAVE_CACHE``, else ``$XDG_CACHE_HOME/lorasave``, else ``~/.cache/lorasave``.
``LORASAVE_CACHE=off`` disables it. A cache that cannot be read or written is ignored; an entry
that is not what lorasave wrote (bad JSON, deep nesting, the wrong shape) is ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from lorasave.util.jsonio import parse_json

logger = logging.getLogger(__name__)


def cache_dir() -> Path | None:
    """The cache folder, or None when disabled."""
    env = os.environ.get("LORASAVE_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "0", "off", "no", "false") else Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lorasave"


def _read(kind: str, key: str) -> Any | None:
    root = cache_dir()
    if root is None:
        return None
    path = root / kind / f"{key}.json"
    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        return parse_json(data)
    except ValueError as e:  # damaged, too deeply nested, a 10,000-digit number: rebuilt by the caller
        logger.info("ignoring the malformed cache file %s (%s); rebuilding it", path, e)
        return None


def _write(kind: str, key: str, value: Any) -> None:
    root = cache_dir()
    if root is None:
        return
    try:
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f)
        os.replace(tmp, folder / f"{key}.json")
    except OSError as e:  # a read-only home, a full disk: the cache is an optimisation only
        logger.debug("cache write failed: %s", e)


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:32]


def get(kind: str, *key_parts: str) -> Any | None:
    """The cached value for ``key_parts`` in ``kind``, or None."""
    return _read(kind, _key(*key_parts))


def put(kind: str, value: Any, *key_parts: str) -> None:
    """Store a JSON-serialisable value."""
    _write(kind, _key(*key_parts), value)


def stat_key(path: Path) -> str:
    """Identity of a file's current content as far as the file system tells."""
    st = os.stat(path)
    return f"{os.path.realpath(path)}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
