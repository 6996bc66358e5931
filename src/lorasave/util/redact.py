"""Keep Hugging Face tokens out of everything lorasave prints or logs.

``scrub(text)`` replaces, with ``***``:

- every token lorasave knows of: the one given to ``push(token=...)`` (``register``), ``HF_TOKEN``
  / ``HUGGING_FACE_HUB_TOKEN``, and the token ``hf auth login`` stored (``huggingface_hub.get_token``,
  looked up only once huggingface_hub is imported);
- the value of any ``Authorization`` header or field (``Authorization: Bearer ...``,
  ``"authorization": "..."``);
- any string shaped like a Hugging Face token (``hf_`` followed by 10 or more letters and digits),
  so a token a server echoes back, or one lorasave was never told about, is caught too.

The command line applies it to every log line (``RedactFilter`` on its handler and on
huggingface_hub's), to the one-line error messages and to the ``--debug`` traceback; ``lorasave.hub.push``
applies it to every server message it quotes.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable

MASK = "***"
_TOKEN_SHAPE = re.compile(r"\bhf_[A-Za-z0-9]{10,}")
# the header or JSON/form field name, its separator and optional quote, then the scheme and credential
_AUTHORIZATION = re.compile(
    r"""(?P<key>authorization["']?\s*[:=]\s*["']?)(?:(?:bearer|basic|token|digest)\s+)?[^\s"',;&}\]]+""",
    re.IGNORECASE,
)
_ENV_TOKENS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_registered: set[str] = set()


def register(token: str | None) -> None:
    """Remember ``token`` so that ``scrub`` hides it wherever it appears (for the whole process)."""
    if token and len(token) >= 4:
        _registered.add(token)


def known_tokens() -> set[str]:
    """The tokens ``scrub`` hides verbatim: registered ones, the environment's, huggingface_hub's stored one."""
    found = set(_registered)
    found.update(v for name in _ENV_TOKENS if (v := os.environ.get(name, "").strip()))
    if "huggingface_hub" in sys.modules:  # never import it just for this
        try:
            from huggingface_hub import get_token

            if stored := get_token():
                found.add(stored)
        except Exception:  # an unreadable token file must not break error reporting
            pass
    return {t for t in found if len(t) >= 4}


def scrub(text: str, extra: Iterable[str | None] = ()) -> str:
    """``text`` with every known token, every ``Authorization`` value and every ``hf_...`` token replaced by ``***``."""
    if not text:
        return text
    for token in sorted(known_tokens() | {t for t in extra if t and len(t) >= 4}, key=len, reverse=True):
        text = text.replace(token, MASK)
    text = _AUTHORIZATION.sub(lambda m: m["key"] + MASK, text)
    return _TOKEN_SHAPE.sub(MASK, text)


class RedactFilter(logging.Filter):
    """A handler filter that scrubs each record's message and traceback before any formatter sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the handler report it as logging does
            return True
        record.msg, record.args = scrub(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


_FILTER = RedactFilter()


def add_filter(handlers: Iterable[logging.Handler]) -> list[logging.Handler]:
    """Add the scrubbing filter to ``handlers``; returns those it was added to (for ``remove_filter``)."""
    added = [h for h in handlers if _FILTER not in h.filters]
    for h in added:
        h.addFilter(_FILTER)
    return added


def remove_filter(handlers: Iterable[logging.Handler]) -> None:
    """Undo ``add_filter``."""
    for h in handlers:
        h.removeFilter(_FILTER)
