"""Push a folder to the Hugging Face Hub: ``lorasave push DIR REPO_ID`` and ``--push-to-hub``.

The folder is checked before anything is sent: it must exist and hold files; files listed in its
``lorasave.json`` must still have the sha256 lorasave recorded (a folder edited after the save is
refused, naming the file); symlinks may not leave the folder; a ``README.md`` model card must
load and pass the Hub's metadata validation. Then ``huggingface_hub`` does the transfer:
``create_repo(exist_ok=True)``, ``create_branch(exist_ok=True)`` for ``revision``, and
``upload_folder``, which with ``hf_xet`` (huggingface_hub's default) uploads large files through
Xet and commits many files in several batches. Re-running a push that failed midway is safe:
files the Hub already has are skipped, and a push of an unchanged folder makes no commit.

The token comes from ``token=``, else ``HF_TOKEN``, else the ``hf auth login`` token file
(``huggingface_hub.get_token``). It is passed to huggingface_hub only: lorasave never logs,
prints or writes it, and error messages are scrubbed of it (``lorasave.util.redact``). Every request
waits at most ``LORASAVE_HUB_TIMEOUT`` seconds (default 120) for the Hub (``lorasave.hub.session``).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lorasave.errors import FolderMismatchError, HubAuthError, HubError, InvalidOptionError, ModelCardError, SourceNotFoundError
from lorasave.hub.session import hub_timeout, mapped_hub_errors
from lorasave.hub.session import one_line as _one_line
from lorasave.pipeline.manifest import MANIFEST_NAME, sha256_source
from lorasave.util.jsonio import load_json
from lorasave.util.redact import register as _register_token

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

MODEL_CARD_NAME = "README.md"
DEFAULT_BRANCH = "main"
_NO_TOKEN = "no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access, https://huggingface.co/settings/tokens)"
_MAX_SUMMARY = 300  # characters of a generated commit summary


@dataclass
class PushResult:
    """What ``push`` sent.

    Attributes:
        repo_id: the full repository id (``namespace/name``).
        revision: the branch the files are on (``"main"`` by default), or the pull request's ref
            (``"refs/pr/N"``) with ``create_pr``.
        commit_url: URL of the commit (the branch's latest commit when nothing changed).
        commit_oid: its id.
        files: paths of the files pushed, relative to the folder (the Hub skips unchanged ones).
        total_bytes: their size.
        private: whether the repository is private.
        url: the repository's URL.
        pr_url: the pull request opened with ``create_pr``, else None.
        unchanged: True when the Hub already had every file, so no commit was made.
        commit_message: the commit's summary line.
        seconds: wall time of the call.
    """

    repo_id: str
    revision: str
    commit_url: str
    commit_oid: str
    files: list[str]
    total_bytes: int
    private: bool | None
    url: str
    pr_url: str | None = None
    unchanged: bool = False
    commit_message: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``--json``)."""
        return asdict(self)

    def summary(self) -> str:
        """One line for humans."""
        what = f"{len(self.files)} file(s) ({self.total_bytes / 1e6:.1f} MB)"
        where = f"{self.repo_id}@{self.revision}"
        if self.unchanged:
            return f"{where} already has these {what}; nothing to commit ({self.commit_url})"
        if self.pr_url:
            return f"pushed {what} to {self.repo_id} as pull request {self.pr_url} in {self.seconds:.1f} s"
        return f"pushed {what} to {where}: {self.commit_url} in {self.seconds:.1f} s"


def push(
    folder: PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    progress: bool = False,
) -> PushResult:
    """Upload a folder (a lorasave output, a PEFT adapter, any model folder) to a Hub model repository.

    Creates the repository when it does not exist (``private``; an organization namespace in
    ``repo_id`` is used as given), creates ``revision`` as a branch from ``main`` when it does not
    exist, and commits every file of the folder with huggingface_hub's ``upload_folder`` (large
    files through Xet, many files in several commits). Before any request that uploads, the folder
    is verified against its ``lorasave.json`` and its ``README.md`` is validated.

    Args:
        folder: the folder to push.
        repo_id: ``name`` (in the token owner's namespace) or ``namespace/name``.
        private: create the repository private. When the repository already exists and is public,
            the push is refused rather than publishing files meant to be private. False leaves the
            visibility to the Hub's default (an organization may default to private).
        revision: the branch to push to (default ``main``); created from ``main`` when missing.
            A ``refs/pr/N`` ref pushes to that open pull request.
        token: a Hugging Face token; default ``HF_TOKEN``, then the ``hf auth login`` token.
        commit_message: the commit's summary line; default: what was pushed, from ``lorasave.json``
            (e.g. ``"lorasave: merged bfloat16 checkpoint of base + adapter (3 shards)"``).
        create_pr: open a pull request against ``main`` instead of committing to it (no pull
            request is opened when the Hub already has every file).
        progress: let huggingface_hub show its upload progress on stderr; off by default.

    Returns:
        PushResult.

    Raises:
        SourceNotFoundError: ``folder`` does not exist, is not a folder, or holds no file.
        InvalidOptionError: ``repo_id`` is malformed, ``create_pr`` is given with a ``revision``
            other than ``main``, or ``LORASAVE_HUB_TIMEOUT`` is not a positive number.
        UnsafePathError: a symlink in the folder points outside it, or ``lorasave.json`` names a
            path outside it.
        CheckpointFormatError: ``lorasave.json`` cannot be read.
        FolderMismatchError: a file listed in ``lorasave.json`` is missing or its sha256 differs.
        ModelCardError: ``README.md`` metadata cannot be parsed or the Hub's validation refuses it.
        HubAuthError: no token, a token the Hub rejects (401), or no write access (403).
        HubNotFoundError: the repository or revision is not found (404).
        HubError: the Hub cannot be reached, offline mode is on, it answered another HTTP error
            (5xx after huggingface_hub's retries), an HTML page or something else that is not its
            JSON API (the message names the request and the status), it did not answer one request
            within ``LORASAVE_HUB_TIMEOUT`` seconds (default 120; the message says what it waited
            for), or ``private`` was asked for an existing public repository.
    """
    t0 = time.perf_counter()
    root = Path(folder)
    if not root.is_dir():
        raise SourceNotFoundError(f"{folder}: no such folder to push", path=root)
    tok = check_push_options(repo_id, revision=revision, create_pr=create_pr, token=token)  # before hashing gigabytes
    files = list_push_files(root)
    if not files:
        raise SourceNotFoundError(f"{root}: the folder holds no file to push", path=root)
    manifest = verify_folder(root, files)
    total = sum((root / f).stat().st_size for f in files)
    summary = commit_message if commit_message else default_commit_message(root, manifest, files)
    description = _commit_description(manifest, files, total)

    from huggingface_hub import HfApi, constants

    endpoint = constants.ENDPOINT
    with mapped_hub_errors(repo_id, revision, tok, endpoint) as session, _progress_bars(progress):
        if MODEL_CARD_NAME in files:
            session.step = "validating README.md (POST /api/validate-yaml)"
            validate_model_card(root / MODEL_CARD_NAME, tok)
        from lorasave import __version__

        api = HfApi(endpoint=endpoint, library_name="lorasave", library_version=__version__)
        logger.debug("pushing %d file(s) (%.1f MB) from %s to %s", len(files), total / 1e6, root, repo_id)
        session.step = f"creating the repository {repo_id}"
        repo_url = api.create_repo(repo_id, private=True if private else None, exist_ok=True, token=tok)
        full_id = repo_url.repo_id or repo_id
        branch = revision or DEFAULT_BRANCH
        session.step = f"reading {full_id}'s information"
        repo = api.repo_info(full_id, token=tok)
        if private and repo.private is False:  # create_repo ignores `private` for an existing repo
            raise HubError(
                f"{full_id} already exists and is public; refusing to push files meant to be private: make it private on the Hub (Settings) or drop --private",
                repo_id=full_id,
            )
        if not create_pr and branch != DEFAULT_BRANCH and not branch.startswith("refs/"):
            session.step = f"creating the branch {branch}"
            api.create_branch(full_id, branch=branch, exist_ok=True, token=tok)
        session.step = f"reading the head of {full_id}@{branch}"
        before = repo if branch == DEFAULT_BRANCH else api.repo_info(full_id, revision=branch, token=tok)
        logger.debug("pushing to %s@%s (head %s)", full_id, branch, before.sha)
        session.step = f"uploading {len(files)} file(s) to {full_id}@{branch}"
        info = api.upload_folder(
            repo_id=full_id,
            folder_path=root,
            commit_message=summary,
            commit_description=description,
            revision=None if create_pr else revision,
            create_pr=create_pr,
            token=tok,
        )
    pr_revision = getattr(info, "pr_revision", None)
    result = PushResult(
        repo_id=full_id,
        revision=pr_revision or branch,
        commit_url=info.commit_url,
        commit_oid=info.oid,
        files=files,
        total_bytes=total,
        private=repo.private,
        url=str(repo_url),
        pr_url=info.pr_url,
        unchanged=info.pr_url is None and info.oid == before.sha,
        commit_message=summary,
        seconds=round(time.perf_counter() - t0, 3),
    )
    logger.debug("%s", result.summary())
    return result


# ----------------------------------------------------------------------------- checks


def check_push_options(repo_id: str, *, revision: str | None = None, create_pr: bool = False, token: str | None = None) -> str:
    """The checks of ``push`` that need no folder and no request; run them before a long save that ends in a push.

    Returns:
        The token to use (``resolve_token``).

    Raises:
        InvalidOptionError: ``repo_id`` is malformed, ``create_pr`` comes with a ``revision`` other than ``main``,
            or ``LORASAVE_HUB_TIMEOUT`` is not a positive number of seconds.
        HubAuthError: no token anywhere.
        HubError: huggingface_hub's offline mode is on.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise InvalidOptionError(f"{repo_id!r} is not a Hub repo id ({_one_line(str(e), None)}): give NAME or NAMESPACE/NAME") from None
    if create_pr and revision not in (None, DEFAULT_BRANCH):
        raise InvalidOptionError(
            f"a pull request (--create-pr) is always opened against main, not {revision!r}: drop --revision, or push to the branch without --create-pr"
        )
    hub_timeout()  # a bad LORASAVE_HUB_TIMEOUT fails here, before a long save
    tok = resolve_token(token)
    if constants.HF_HUB_OFFLINE:
        raise HubError("Hugging Face offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE): unset it to push", repo_id=repo_id)
    return tok


def list_push_files(root: Path) -> list[str]:
    """The files ``upload_folder`` sends: every file below ``root`` except ``.git/`` and ``.cache/huggingface/``.

    Returns:
        Paths relative to ``root``, POSIX style, sorted.

    Raises:
        UnsafePathError: a file is a symlink that breaks lorasave's one rule (``paths``): it resolves
            outside ``root`` and outside the Hugging Face cache repo ``root`` is a snapshot of.
    """
    from huggingface_hub.utils import filter_repo_objects
    from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

    from lorasave.util.paths import check_inside

    found = {p.relative_to(root).as_posix(): p for p in sorted(root.glob("**/*")) if p.is_file()}
    kept = sorted(filter_repo_objects(found, ignore_patterns=DEFAULT_IGNORE_PATTERNS))
    for rel in kept:
        check_inside(found[rel], root)
    return kept


def verify_folder(root: Path, files: list[str]) -> dict[str, Any] | None:
    """Check the files listed in ``root/lorasave.json`` against their recorded size and sha256.

    Files the manifest does not list (a model card added later) are pushed unchecked. sha256 values
    are remembered by file identity (``manifest.sha256_source``), so re-running a push does not
    re-hash unchanged gigabytes.

    Returns:
        The manifest, or None when the folder has no ``lorasave.json``.

    Raises:
        CheckpointFormatError: the manifest is not valid JSON or has no ``files`` table.
        UnsafePathError: the manifest names a path outside the folder.
        FolderMismatchError: a listed file is missing, or its size or sha256 differs.
    """
    from lorasave.errors import CheckpointFormatError
    from lorasave.util.paths import check_relative_entry

    path = root / MANIFEST_NAME
    if MANIFEST_NAME not in files:
        return None
    manifest = load_json(path, hint=f"re-create the output or delete {MANIFEST_NAME} to push unchecked")
    table = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(table, dict):
        raise CheckpointFormatError(f"{path}: no 'files' table; re-create the output or delete {MANIFEST_NAME} to push unchecked", path=path)
    listed = set(files)
    fix = "re-create the output with lorasave (--overwrite), or delete lorasave.json to push the folder unchecked"
    for name, entry in sorted(table.items()):
        target = root / check_relative_entry(name, path)  # where a listed link may lead is list_push_files' rule
        if name not in listed:
            raise FolderMismatchError(f"{target}: listed in {MANIFEST_NAME} but missing from the folder; {fix}", path=target, file=name)
        want_sha = entry.get("sha256") if isinstance(entry, dict) else None
        want_size = entry.get("bytes") if isinstance(entry, dict) else None
        if not isinstance(want_sha, str):
            raise CheckpointFormatError(f"{path}: no sha256 for {name!r}; {fix}", path=path)
        size = target.stat().st_size
        if isinstance(want_size, int) and size != want_size:
            raise FolderMismatchError(
                f"{target}: {size} bytes but {MANIFEST_NAME} recorded {want_size}; the file changed after lorasave wrote it: {fix}", path=target, file=name
            )
        if sha256_source(target) != want_sha:
            if name == "README.md":  # a model card edited before pushing is expected; it is still validated
                logger.info("README.md was edited after lorasave wrote it; pushing the edited card")
                continue
            raise FolderMismatchError(f"{target}: sha256 differs from {MANIFEST_NAME}; the file changed after lorasave wrote it: {fix}", path=target, file=name)
    unlisted = [f for f in files if f not in table and f != MANIFEST_NAME]
    if unlisted:
        logger.info("not listed in %s, pushed unchecked: %s", MANIFEST_NAME, ", ".join(unlisted))
    logger.debug("verified %d file(s) against %s", len(table), MANIFEST_NAME)
    return manifest


def validate_model_card(path: Path, token: str | None = None) -> None:
    """Load ``README.md`` with ``huggingface_hub.ModelCard`` and have the Hub validate its metadata.

    ``ModelCard.validate`` POSTs to ``{HF_ENDPOINT}/api/validate-yaml``.

    Raises:
        ModelCardError: the metadata block does not parse, or the Hub refuses it.
        HfHubHTTPError and transport errors of huggingface_hub: mapped to HubError by ``push``.
    """
    from huggingface_hub import ModelCard

    try:
        card = ModelCard.load(path)  # a Path that is a file: read locally, never downloaded
    except Exception as e:  # yaml errors, ValueError (metadata not a mapping), TypeError
        raise ModelCardError(
            f"{path}: the model card metadata cannot be read ({_one_line(str(e), token)}): fix the YAML block between the --- lines", path=path
        ) from None
    try:
        card.validate()
    except ValueError as e:
        raise ModelCardError(
            f"{path}: the Hub refuses the model card metadata ({_validation_messages(str(e), token)}): fix the YAML block at the top of README.md", path=path
        ) from None


def _validation_messages(text: str, token: str | None) -> str:
    try:
        doc = json.loads(text)
        msgs = [str(err.get("message", err)) for err in doc.get("errors", [])] if isinstance(doc, dict) else []
    except ValueError:
        msgs = []
    return _one_line("; ".join(msgs) if msgs else text, token) or "no reason given"


def resolve_token(token: str | None) -> str:
    """``token``, else ``HF_TOKEN``, else the token saved by ``hf auth login`` (``huggingface_hub.get_token``).

    Raises:
        HubAuthError: no token anywhere.
    """
    if token:
        _register_token(token)  # scrubbed from every message and log line from now on
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise HubAuthError(_NO_TOKEN)
    _register_token(found)
    return found


# ----------------------------------------------------------------------------- commit message


def _source_name(src: Any) -> str:
    if not isinstance(src, dict):
        return "?"
    if src.get("hub_id"):
        return str(src["hub_id"])
    path = src.get("path")
    return Path(str(path)).name if path else "?"


def default_commit_message(root: Path, manifest: dict[str, Any] | None, files: list[str]) -> str:
    """The commit summary: what was pushed, from ``lorasave.json`` when present.

    Examples: ``"lorasave: merged bfloat16 checkpoint of tiny-llama + tiny-llama-lora (3 shards)"``,
    ``"lorasave: LORA adapter tiny-llama-lora (r=8, bfloat16) for tiny-llama"``,
    ``"lorasave: upload my-folder (5 files)"``.
    """
    msg = f"lorasave: upload {root.resolve().name} ({len(files)} file{'s' if len(files) != 1 else ''})"
    if manifest is not None:
        command = manifest.get("command")
        sources = manifest.get("sources") or {}
        settings = manifest.get("settings") or {}
        adapters = [a for a in sources.get("adapters") or [] if isinstance(a, dict)]
        if command == "merge":
            form = settings.get("dtype") or "?"
            bnb = settings.get("bnb_4bit")
            if settings.get("save_method") == "merged_4bit" and isinstance(bnb, dict):
                form = f"{bnb.get('quant_type', '?')} 4-bit"
            elif isinstance(settings.get("compressed_tensors"), dict):
                form = f"compressed-tensors {settings['compressed_tensors'].get('scheme', '?')}"
            n = sum(1 for name in manifest.get("files", {}) if name.endswith(".safetensors"))
            names = " + ".join([_source_name(sources.get("base")), *(_source_name(a) for a in adapters)])
            msg = f"lorasave: merged {form} checkpoint of {names} ({n} shard{'s' if n != 1 else ''})"
        elif command == "adapter" and adapters:
            ad = adapters[0]
            details = ", ".join(x for x in (f"r={ad['r']}" if ad.get("r") is not None else "", str(settings.get("dtype") or "")) if x)
            base = ad.get("base_model_name_or_path")
            msg = (
                f"lorasave: {ad.get('peft_type') or 'PEFT'} adapter {_source_name(ad)}"
                + (f" ({details})" if details else "")
                + (f" for {base}" if base else "")
            )
        elif command:
            msg = f"lorasave: {command} output {root.resolve().name} ({len(files)} files)"
    elif "adapter_config.json" in files:
        try:
            cfg = load_json(root / "adapter_config.json")
        except (OSError, ValueError):
            cfg = {}
        if isinstance(cfg, dict):
            r = f" (r={cfg['r']})" if cfg.get("r") is not None else ""
            msg = f"lorasave: {cfg.get('peft_type') or 'PEFT'} adapter {root.resolve().name}{r}"
    return _one_line(msg, None, limit=_MAX_SUMMARY)


def _commit_description(manifest: dict[str, Any] | None, files: list[str], total: int) -> str:
    from lorasave import __version__

    text = f"Pushed with lorasave {__version__}: {len(files)} file(s), {total / 1e6:.1f} MB."
    if manifest is not None:
        text += f" {MANIFEST_NAME} records the sources, the settings and the sha256 of every file (`lorasave verify`)."
    return text


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Silence huggingface_hub's progress display unless ``enabled``; restore its previous state after."""
    if enabled:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

    hf_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")  # the module (the package re-exports the class)
    states = getattr(hf_tqdm, "progress_bar_states", None)
    if are_progress_bars_disabled() or not isinstance(states, dict) or getattr(hf_tqdm, "HF_HUB_DISABLE_PROGRESS_BARS", None) is False:
        yield
        return
    saved = dict(states)
    disable_progress_bars()
    try:
        yield
    finally:
        states.clear()
        states.update(saved)
