"""The one symlink rule for files lorasave reads from a source folder, and relative-entry checks.

A file found in a source folder (a base, an adapter, a tokenizer folder, a folder to push) may be a
symlink, as every file of a Hugging Face cache snapshot is. It is followed only when its resolved
target lies

* inside that source folder, or
* inside the ``blobs/`` folder of the same Hugging Face cache repo, when the source folder is a
  snapshot (``.../models--org--name/snapshots/<rev>/x -> ../../blobs/<sha256>``).

Anything else (a ``LICENSE`` linking to ``~/.ssh/id_rsa``, a shard linking to another model) is
never read: weights, configs and required tokenizer files are refused with ``UnsafePathError``,
optional carried files (licenses, ``generation_config.json``, chat templates) are skipped with a
note. The same rule decides what ``lorasave push`` may upload.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from lorasave.errors import UnsafePathError

#: Folder prefixes of the repos in a Hugging Face cache (``huggingface_hub.constants.REPO_TYPES``).
_CACHE_REPO_PREFIXES = ("models--", "datasets--", "spaces--")


def cache_blobs(folder: Path) -> Path | None:
    """The ``blobs/`` folder of the Hugging Face cache repo that ``folder`` (resolved) is a snapshot of, or None.

    ``folder`` may be the snapshot itself or a folder below it (``snapshots/<rev>/sub``).
    """
    parts = Path(os.path.realpath(folder)).parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith(_CACHE_REPO_PREFIXES):
            return Path(*parts[:i]) / "blobs"
    return None


def escaping_target(path: Path, folder: Path) -> Path | None:
    """Where ``path`` (found in ``folder``) really leads, when that breaks the symlink rule; None when it may be read."""
    real_folder = Path(os.path.realpath(folder))
    target = Path(os.path.realpath(path))
    if target.is_relative_to(real_folder):
        return None
    blobs = cache_blobs(real_folder)
    if blobs is not None and target.is_relative_to(blobs):
        return None
    return target


def escape_message(path: Path, target: Path, folder: Path) -> str:
    """The words for a link that breaks the rule (shared by errors and notes)."""
    return f"{path} links to {target}, outside the folder {folder} (nor a Hugging Face cache blob of it); lorasave does not follow such links"


def check_inside(path: Path, folder: Path) -> Path:
    """Refuse to read ``path`` when it is a link that leaves ``folder`` (see the module docstring).

    Returns:
        ``path`` unchanged.

    Raises:
        UnsafePathError: the resolved target lies outside ``folder`` and its cache repo's ``blobs/``.
    """
    target = escaping_target(path, folder)
    if target is not None:
        raise UnsafePathError(f"{escape_message(path, target, folder)}: copy the file into the folder or remove the link", path=path)
    return path


def relative_entry_problem(entry: object) -> str | None:
    """Why ``entry`` is not a relative path that stays inside its folder (None when it is)."""
    if not isinstance(entry, str) or not entry:
        return "not a file name"
    if "\x00" in entry:
        return "it contains NUL"
    if PurePosixPath(entry).is_absolute() or PureWindowsPath(entry).is_absolute() or PureWindowsPath(entry).drive:
        return "it is an absolute path"
    if ".." in PurePosixPath(entry.replace("\\", "/")).parts:
        return "it contains '..'"
    return None


def check_relative_entry(entry: object, listed_in: Path) -> str:
    """Refuse a file entry of a lorasave-written list (``lorasave.json``) that could leave its folder.

    Returns:
        ``entry``.

    Raises:
        UnsafePathError: ``entry`` is not a string, is absolute, or contains ``..`` or NUL.
    """
    problem = relative_entry_problem(entry)
    if problem is not None:
        raise UnsafePathError(
            f"{listed_in} lists {entry!r} ({problem}); an output lists only files inside itself, so the file was edited or damaged: refusing it",
            path=listed_in,
        )
    assert isinstance(entry, str)
    return entry
