"""Byte sizes as transformers and huggingface_hub spell them.

``max_shard_size`` follows ``huggingface_hub.serialization._base.parse_size_to_int``: decimal
units (``KB`` = 10**3, ``MB`` = 10**6, ``GB`` = 10**9, ``TB`` = 10**12 bytes), case-insensitive,
a float mantissa allowed (``"4.5GB"``), a bare integer meaning bytes. Binary units (``GiB``)
are refused there; lorasave accepts them with their binary meaning, which is what a user who
types them wants.
"""

from __future__ import annotations

import re

from lorasave.errors import InvalidOptionError

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")

#: lorasave's default ``max_shard_size``: 5 GB, the Hub-friendly size (huggingface_hub's
#: ``MAX_SHARD_SIZE`` and transformers 4's default). transformers 5 defaults to 50GB.
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9


def parse_size(value: int | str) -> int:
    """Parse a size such as ``"5GB"``, ``"200KB"``, ``"4.5GB"`` or ``1000000`` into bytes.

    Raises:
        InvalidOptionError: not a positive size in one of the units above.
    """
    if isinstance(value, bool):
        raise InvalidOptionError(f"invalid size {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE_RE.match(str(value))
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise InvalidOptionError(f"invalid size {value!r}: write a number of bytes or a number with KB, MB, GB or TB (decimal, e.g. 5GB)")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise InvalidOptionError(f"size must be positive, got {value!r}")
    return n


def human_bytes(n: int) -> str:
    """``1234567`` -> ``"1.23 MB"`` (decimal units, as parse_size reads them)."""
    for unit, factor in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= factor:
            return f"{n / factor:.2f} {unit}"
    return f"{n} B"
