"""The push of Unsloth's ``push_to_hub_*`` names (and ``push_to_hub=True``): save into a folder, then ``lorasave.push``."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorasave.errors import InvalidOptionError, LorasaveError

PathLike = str | os.PathLike[str]


@dataclass
class SavedAndPushed:
    """What a ``push_to_hub_*`` call (or ``push_to_hub=True``) did.

    Attributes:
        saved: the save's result (MergeResult, AdapterResult, GgufResult or GgufAdapterResult); its
            ``output`` no longer exists when it was a temporary folder.
        pushed: ``lorasave.push``'s PushResult.
        kept: the local output folder when it was kept (``save_directory``), else None.
    """

    saved: Any
    pushed: Any
    kept: Path | None = None

    def summary(self) -> str:
        """Two lines for humans: the save and the push."""
        return f"{self.saved.summary()}\n{self.pushed.summary()}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**self.saved.to_dict(), "kept": str(self.kept) if self.kept else None, "push": self.pushed.to_dict()}


def save_and_push(
    save: Callable[[Path], Any],
    repo_id: str,
    *,
    save_directory: PathLike | None,
    token: str | None,
    private: bool | None,
    commit_message: str | None,
    create_pr: bool,
    revision: str | None,
) -> SavedAndPushed:
    """``save(folder)`` then ``lorasave.push(folder, repo_id)``; the push checks run first.

    The folder is ``save_directory`` (kept) or a temporary one named after the repository (removed
    after the push; kept, and named in the error, when the push fails).

    Raises:
        Everything ``check_push_options``, ``save`` and ``push`` raise; a push error's message says
        where the output is and how to retry with ``lorasave push``.
    """
    from lorasave.hub.push import check_push_options, push
    from lorasave.util.names import safe_file_name

    tok = check_push_options(repo_id, revision=revision, create_pr=create_pr, token=token if isinstance(token, str) else None)
    tmp = None if save_directory is not None else Path(tempfile.mkdtemp(prefix="lorasave-push-"))
    folder = Path(save_directory) if save_directory is not None else tmp / safe_file_name(repo_id.rsplit("/", 1)[-1])  # type: ignore[operator]
    try:
        saved = save(folder)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        pushed = push(saved.output, repo_id, private=bool(private), revision=revision, token=tok, commit_message=commit_message, create_pr=create_pr)
    except LorasaveError as e:
        e.message = f"{e.message} (the output is complete in {saved.output}; to retry: lorasave push {saved.output} {repo_id})"
        raise
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    return SavedAndPushed(saved, pushed, None if tmp is not None else Path(saved.output))


def push_target(caller: str, save_directory: PathLike, repo_id: str | None) -> str:
    """The repo ``push_to_hub=True`` pushes to: ``repo_id``, else ``save_directory`` taken as a repo id (Unsloth's rule).

    Raises:
        InvalidOptionError: ``save_directory`` is no repo id and ``repo_id`` is not given.
    """
    if repo_id:
        return repo_id
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    target = os.fspath(save_directory)
    try:
        validate_repo_id(target)
    except HFValidationError:
        raise InvalidOptionError(
            f"{caller}(push_to_hub=True) pushes to repo_id=, else to save_directory taken as a Hub repo id (as Unsloth does), and "
            f"{target!r} is not one: pass repo_id='namespace/name', call {caller.replace('save_pretrained', 'push_to_hub')}(repo_id, ...), "
            f"or save and then run `lorasave push {target} REPO_ID`; nothing was written"
        ) from None
    return target
