"""The command a user ran, so that hints in error messages name it.

``cli.py`` sets ``INVOKED_AS`` to the subcommand's name (``gguf``, ``onnx``, ...) for the run; a
message that suggests a command line builds it with ``command_hint`` (``lorasave gguf BASE
ADAPTER``, not ``lorasave merge BASE ADAPTER`` when the user ran ``lorasave gguf``). Library
calls outside the command line get ``merge``.
"""

from __future__ import annotations

from contextvars import ContextVar

INVOKED_AS: ContextVar[str] = ContextVar("lorasave_invoked_as", default="merge")


def command_hint(arguments: str) -> str:
    """``"lorasave <the command run> <arguments>"``, e.g. ``command_hint("BASE ADAPTER")``."""
    return f"lorasave {INVOKED_AS.get()} {arguments}"
