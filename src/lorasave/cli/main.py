"""The ``lorasave`` command line: ``lorasave COMMAND BASE [ADAPTER ...] -o OUT [options]``.

A thin shell: parse options, call the library function of the same name, print a summary (or
``--json``), and map errors to one line on stderr and a non-zero exit code (``--debug`` shows the
traceback instead). The group and its shared options live in :mod:`lorasave.cli.app`; each module
of commands registers its commands on it when imported here.
"""

from __future__ import annotations

from lorasave.cli import batch, commands, gguf, imatrix  # noqa: F401  (register their commands on ``main``)
from lorasave.cli.app import EXIT_INTERNAL, EXIT_INTERRUPTED, main, run
from lorasave.cli.gguf import GGUF_TYPE_CHOICES

__all__ = ["EXIT_INTERNAL", "EXIT_INTERRUPTED", "GGUF_TYPE_CHOICES", "main", "run"]

if __name__ == "__main__":  # pragma: no cover
    run()
