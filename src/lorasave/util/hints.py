"""Hints in error messages: the command a user ran, and how to install a missing optional package.

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


#: Optional packages -> the install command that brings them (``[project.optional-dependencies]``).
INSTALL_HINTS = {
    "gguf": "pip install 'lorasave[gguf]'",
    "sentencepiece": "pip install 'lorasave[gguf]'",
    "onnx": "pip install 'lorasave[onnx]'",
    "onnxruntime": "pip install 'lorasave[onnx]'",
    "onnxscript": "pip install 'lorasave[onnx]'",
    "bitsandbytes": "pip install 'lorasave[bnb]'",
    "peft": "pip install 'lorasave[verify]'",
    "ray": "pip install 'lorasave[ray]'",
    "yaml": "pip install pyyaml",
}


def missing_package_message(e: ModuleNotFoundError) -> str:
    """``"this command needs the gguf package; install it with: pip install 'lorasave[gguf]'"``."""
    root = (e.name or "").split(".")[0]
    hint = INSTALL_HINTS.get(root, f"pip install {root}") if root else "install lorasave's optional dependencies"
    return f"this command needs the {root or 'missing'} package; install it with: {hint}"
