"""Text from files made safe to print on one line.

Tensor names, module names and config values come from files anyone can write: a newline in one
would split an error into several lines (and fake a second ``error:`` or ``note:`` line), an ESC
would drive the terminal, a bidi override would reorder what is shown. :func:`escape` writes each
such character as ``repr`` does (``\\n``, ``\\x1b``, ``\\u202e``); everything else is kept.
"""

from __future__ import annotations

import re

#: C0 and C1 controls, DEL, line and paragraph separators, bidi embeddings, overrides and isolates.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _one(m: re.Match[str]) -> str:
    ch = m.group()
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with control, line-separator and bidi characters written as escapes; one line, inert."""
    return _UNSAFE.sub(_one, text)


def escape_lines(text: str) -> str:
    """:func:`escape` for each ``\\n``-separated line of a multi-line summary (the line breaks are kept)."""
    return "\n".join(escape(line) for line in text.split("\n"))
