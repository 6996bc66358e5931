"""Reading a text file named by an option (``--text FILE``): UTF-8, one clear line when it is not."""

from __future__ import annotations

import os
from pathlib import Path

from lorasave.errors import InvalidOptionError, SourceNotFoundError


def read_utf8(path: str | os.PathLike[str], what: str = "text file") -> str:
    """The whole text of ``path``, decoded as UTF-8.

    Args:
        what: how the messages name the file (``"calibration text"``).

    Raises:
        SourceNotFoundError: no such file.
        InvalidOptionError: not UTF-8 text (the byte offset is named).
    """
    p = Path(path)
    if not p.is_file():
        raise SourceNotFoundError(f"the {what} {p} does not exist", path=p)
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InvalidOptionError(f"the {what} {p} is not UTF-8 text ({e.reason} at byte {e.start})") from None
