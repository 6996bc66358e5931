"""Names that become file names inside OUT.

A name the user types (``--name``, the ``name`` argument of ``export_gguf`` /
``export_gguf_adapter``) is refused when it could leave OUT: a path separator, ``.`` or ``..``,
NUL or another control character, or an absolute path. A name lorasave derives itself (the output
folder's name, a Hub id such as ``org/model``, metadata from a model folder) is sanitised instead,
so a derived name never fails a run.
"""

from __future__ import annotations

import re

from lorasave.errors import InvalidOptionError

_SEPARATORS = ("/", "\\")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _problem(name: str) -> str | None:
    if not name:
        return "it is empty"
    if any(s in name for s in _SEPARATORS):
        return "it contains a path separator"
    if name in (".", ".."):
        return f"{name!r} names a folder"
    if _CONTROL.search(name):
        return "it contains NUL or a control character"
    return None


def check_file_name(name: str, what: str = "name") -> str:
    """Refuse a user-typed name that would not stay a plain file name inside OUT.

    Args:
        name: the name as typed.
        what: how the user gave it (``"--name"``), for the message.

    Returns:
        ``name`` unchanged.

    Raises:
        InvalidOptionError: ``name`` is empty, ``.`` or ``..``, contains ``/`` or ``\\`` (so also any
            absolute path), NUL or a control character.
    """
    problem = _problem(name) if isinstance(name, str) else "it is not a string"
    if problem is not None:
        raise InvalidOptionError(f"{what} {name!r} cannot be a file name inside the output folder ({problem}); give a plain name such as my-model")
    return name


def safe_file_name(name: str, default: str = "model") -> str:
    """Turn a derived name (output folder name, Hub id, model metadata) into a plain file name.

    Path separators become ``--`` (``org/model`` -> ``org--model``, as in the Hugging Face cache),
    control characters ``_``; leading dots are dropped, so the result never names a folder or a
    hidden file.

    Returns:
        A name for which ``check_file_name`` passes; ``default`` when nothing usable is left.
    """
    out = str(name)
    for sep in _SEPARATORS:
        out = out.replace(sep, "--")
    out = _CONTROL.sub("_", out).lstrip(".").strip()
    return out if out and _problem(out) is None else default
