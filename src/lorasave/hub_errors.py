"""Errors of ``lorasave push`` (to be moved into ``lorasave.errors``).

Same conventions as ``lorasave.errors``: each class derives from ``LorasaveError`` and the
matching builtin, ``str(err)`` is one line that names the fix, and the CLI prints it as
``error: ...``. None of them ever holds the Hugging Face token.
"""

from __future__ import annotations

from pathlib import Path

from .errors import LorasaveError

EXIT_HUB = 4


class HubError(LorasaveError, ConnectionError):
    """A request to the Hugging Face Hub failed: unreachable, offline mode, or an HTTP error.

    Attributes:
        repo_id: the repository concerned, when known.
        status: the HTTP status code, or None when no response came back.
    """

    exit_code = EXIT_HUB

    def __init__(self, message: str, *, repo_id: str | None = None, status: int | None = None, path: str | Path | None = None) -> None:
        super().__init__(message, path=path)
        self.repo_id = repo_id
        self.status = status


class HubAuthError(HubError, PermissionError):
    """No token was found, the Hub rejected it (401), or it may not write to the repository (403)."""


class HubNotFoundError(HubError, FileNotFoundError):
    """The repository or revision does not exist on the Hub (404), or is not visible with this token."""


class ModelCardError(LorasaveError, ValueError):
    """The folder's ``README.md`` model card has metadata that the Hub would refuse."""


class FolderMismatchError(LorasaveError, ValueError):
    """A file of the folder to push differs from what ``lorasave.json`` recorded (or is missing).

    Attributes:
        file: the file name, relative to the folder.
    """

    def __init__(self, message: str, *, path: str | Path | None = None, file: str) -> None:
        super().__init__(message, path=path)
        self.file = file
