"""The strict GGUF reader ``inspect`` and ``verify`` both use.

gguf-py's ``GGUFReader`` returns a short (often empty) array when a read runs past the end of the
file, so a corrupted array length or count makes it loop up to 2**64 times over nothing, and it
raises whatever its parsing meets (``ValueError``, ``KeyError``, ``IndexError``, numpy errors...).
:func:`open_gguf` checks every read and turns any failure into one :class:`CheckpointFormatError`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from lorasave.errors import CheckpointFormatError

T = TypeVar("T")


def _strict_class() -> type:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise CheckpointFormatError("reading GGUF needs the gguf package: pip install gguf") from None

    class StrictReader(GGUFReader):  # type: ignore[misc]
        """gguf-py's reader, except that a read past the end of the file is an error.

        With every read checked, each step consumes bytes of the file and a malformed file fails fast.
        """

        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> Any:
            arr = super()._get(offset, dtype, count, override_order)
            if len(arr) < int(count):
                raise ValueError(f"{int(count)} items at byte {offset} run past the end of the file")
            return arr

    return StrictReader


def malformed(path: str | os.PathLike[str], e: BaseException) -> CheckpointFormatError:
    """The one-line error for a GGUF file gguf-py could not parse (``e``: what it raised)."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return CheckpointFormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {first[:200]}); re-download or re-convert it", path=Path(path))


def open_gguf(path: str | os.PathLike[str]) -> Any:
    """A ``gguf.GGUFReader`` over ``path`` whose every read was checked against the file's end.

    Raises:
        CheckpointFormatError: gguf is not installed, or the file is not a well-formed GGUF file.
    """
    cls = _strict_class()
    try:
        return cls(str(path))
    except Exception as e:  # gguf-py raises whatever its parsing meets
        raise malformed(path, e) from None


def guarded(path: str | os.PathLike[str], fn: Callable[[], T]) -> T:
    """``fn()``, with anything it raises while decoding ``path``'s contents turned into the one-line error.

    Raises:
        CheckpointFormatError: ``fn`` failed on the file's contents.
    """
    from lorasave.errors import LorasaveError

    try:
        return fn()
    except LorasaveError:
        raise
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, MemoryError) as e:
        raise malformed(path, e) from None
