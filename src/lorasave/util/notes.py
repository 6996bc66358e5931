"""Notes: what a command says besides its result, and which of them only ``--verbose`` shows.

A note is a plain string in a result's ``notes`` (``--json``) and in ``lorasave.json``, and a log line
(``note: ...`` on stderr). A :class:`Detail` is a note that says the same thing on every run for the
same sources and options: a default spelled out (``tokenizer.ggml.add_bos_token = False, as the
tokenizer does``), how a type is encoded. It is recorded all the same but logged at :data:`VERBOSE`,
below INFO: ``--verbose`` (or ``--debug``) shows it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

#: The log level of :class:`Detail` notes: between DEBUG and INFO (``lorasave --verbose``).
VERBOSE = 15
logging.addLevelName(VERBOSE, "VERBOSE")


class Detail(str):
    """A note that is no news on a second run: recorded like any note, logged at :data:`VERBOSE`."""

    __slots__ = ()


def level_of(note: str) -> int:
    """:data:`VERBOSE` for a :class:`Detail`, else INFO."""
    return VERBOSE if isinstance(note, Detail) else logging.INFO


def log_notes(logger: logging.Logger, notes: Iterable[str]) -> None:
    """Log each note at its level (:func:`level_of`)."""
    for note in notes:
        logger.log(level_of(note), "%s", note)
