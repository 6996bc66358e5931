"""Atomic output folders and the non-weight files carried into them.

An output is built in a hidden staging folder beside OUT (same file system, so the final
rename is atomic) and renamed into place only when complete. At that moment the sources are
checked unchanged (``source_stamp``) and OUT is checked again (``rename.publish``): an OUT that
appeared during the run is never replaced without ``overwrite``, and with it only a lorasave
output or an empty folder is. Any exception, KeyboardInterrupt included, removes the staging
folder: OUT is either complete or untouched. Files and folders follow the umask.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from lorasave.errors import DiskFullError, InsufficientDiskError, OutputExistsError, UnsafePathError
from lorasave.pipeline.rename import check_replaceable, publish
from lorasave.sources.stamp import Stamp, check_unchanged
from lorasave.util.jsonio import read_json
from lorasave.util.paths import check_inside, escape_message, escaping_target

logger = logging.getLogger(__name__)

#: Tokenizer and processor files transformers' ``save_pretrained`` methods write.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)
#: License-like files carried from the base, matched by prefix.
LICENSE_PREFIXES = ("LICENSE", "LICENCE", "USE_POLICY", "NOTICE")


def has_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` holds a tokenizer (``tokenizer.json``, ``tokenizer_config.json``, ``tokenizer.model`` or ``vocab.json``)."""
    return any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"))


def check_output_path(out: Path, sources: list[Path], overwrite: bool) -> Path:
    """Validate OUT before any work: not a source, not inside one, no source inside it; exists only with overwrite.

    Returns:
        The absolute OUT path.

    Raises:
        UnsafePathError: OUT overlaps BASE, an ADAPTER or the tokenizer folder.
        OutputExistsError: OUT exists and ``overwrite`` is False.
    """
    final = Path(os.path.abspath(out))
    real_final = Path(os.path.realpath(final))
    for src in sources:
        real_src = Path(os.path.realpath(src))
        if real_final == real_src or real_src in real_final.parents or real_final in real_src.parents:
            raise UnsafePathError(f"output {out} overlaps the source folder {src}; choose an output folder outside the sources", path=out)
    if final.exists() or final.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"output {out} already exists; pass --overwrite to replace it", path=out)
        check_replaceable(final)
    return final


def check_free_space(final: Path, needed_bytes: int, *, carried: int = 0, reserved: dict[int, int] | None = None) -> None:
    """Refuse before writing when OUT's file system has less free space than the plan needs.

    Args:
        final: OUT.
        needed_bytes: bytes the plan writes (weights, headers, index).
        carried: bytes of the files copied from the sources (``CarryPlan.nbytes``: licenses,
            tokenizer, generation config).
        reserved: bytes already promised to earlier outputs of the same pass, by device
            (``st_dev``); this output's bytes are added when it fits.

    Raises:
        InsufficientDiskError: ``needed_bytes + carried`` (plus 1% margin) exceeds the free bytes
            left by the earlier outputs.
    """
    parent = _existing_parent(final)
    free = shutil.disk_usage(parent).free
    device = os.stat(parent).st_dev
    taken = reserved.get(device, 0) if reserved is not None else 0
    total = needed_bytes + carried
    if total * 1.01 > free - taken:
        what = f"{total:,} bytes ({carried:,} of them files carried from the sources)" if carried else f"{total:,} bytes"
        others = f", {taken:,} of them needed by the outputs before it in this pass" if taken else ""
        raise InsufficientDiskError(
            f"the output needs {what} but {parent} has {free:,} bytes free{others} (on {filesystem_of(parent)}); free some space or write elsewhere",
            path=final,
            needed_bytes=total,
            free_bytes=free,
        )
    if reserved is not None:
        reserved[device] = taken + int(total * 1.01)


def _existing_parent(final: Path) -> Path:
    parent = final.parent
    while not parent.exists():
        parent = parent.parent
    return parent


def filesystem_of(path: Path) -> str:
    """Name the file system ``path`` is on: ``the file system mounted at /data (/dev/sdb1)``."""
    mount = Path(os.path.realpath(path))
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    device = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text(encoding="utf-8", errors="replace").splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[1].replace("\\040", " ") == str(mount):
                device = fields[0]  # the last entry for a mount point is the one in effect
    return f"the file system mounted at {mount}" + (f" ({device})" if device else "")


#: errno values that mean OUT's file system (or the user's quota on it) is full.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(e: OSError, final: Path) -> DiskFullError:
    """The one-line error for an ENOSPC / EDQUOT raised while writing OUT: it names OUT's file system."""
    parent = _existing_parent(final)
    free = shutil.disk_usage(parent).free
    why = "the disk quota ran out" if e.errno == errno.EDQUOT else "it is full"
    return DiskFullError(
        f"writing {final} stopped: {why} on {filesystem_of(parent)} ({free:,} bytes free now); nothing was written, free some space or write elsewhere",
        path=final,
        filesystem=filesystem_of(parent),
        free_bytes=free,
    )


class StagedOutput:
    """Context manager for an atomic output folder.

    The run first creates and locks (``flock``) a lock file ``.OUT.lorasave-lock-<tag>`` beside
    OUT, then the staging folder ``.OUT.lorasave-tmp-<tag>`` (``<tag>`` is unique per run); the
    lock file is removed only after the staging folder has been renamed into place or deleted.
    So a staging (or replaced ``-old-``) folder whose lock is free, or missing, belongs to a run
    that died, and entering a new run removes it; a locked one belongs to a live run and is left
    alone: concurrent runs never remove each other's work.

    Usage::

        with StagedOutput(final, overwrite=overwrite, sources=stamps) as stage:
            write files under stage.path
            stage.commit()
    """

    #: Kept for callers that skip lock files when listing a folder (the lock now lives beside it).
    LOCK = ".lock"

    def __init__(self, final: Path, *, overwrite: bool = False, sources: dict[Path, Stamp] | None = None) -> None:
        """Args:
        final: OUT (absolute).
        overwrite: at commit, replace a lorasave output or an empty folder found at OUT.
        sources: stamps of the source files (``source_stamp.record``), checked at commit.
        """
        self.final = final
        self.overwrite = overwrite
        self.sources = dict(sources or {})
        tag = f"{os.getpid():x}{uuid.uuid4().hex[:8]}"
        self.path = final.parent / f".{final.name}.lorasave-tmp-{tag}"
        self._old = final.parent / f".{final.name}.lorasave-old-{tag}"
        self.lock_path = lock_path_for(self.path)
        self.committed = False
        self._lock_fd: int | None = None

    def __enter__(self) -> StagedOutput:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        sweep_dead_runs(self.final)
        self._lock_fd = _hold_lock(self.lock_path)
        self.path.mkdir(mode=0o777)  # the umask applies, as to the files written inside
        return self

    def commit(self) -> None:
        """Check the sources unchanged, then move the complete staging folder to OUT.

        Raises:
            SourceChangedError: a source file changed during the run.
            OutputExistsError: OUT appeared during the run and may not be replaced.
        """
        check_unchanged(self.sources)
        publish(self.path, self.final, overwrite=self.overwrite, old=self._old)
        self.committed = True

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.lock_path)  # while still holding it: nobody can take a lock file about to vanish
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if isinstance(exc, OSError) and not isinstance(exc, DiskFullError) and exc.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(exc, self.final) from exc  # name OUT's file system, not the file being copied


def _hold_lock(path: Path) -> int:
    """Create and ``flock`` the lock file ``path``; return its descriptor.

    A sweeping run unlinks a free lock file (while holding it); if that happened between our
    open and our flock, we hold a lock on a file no longer at ``path``: open it again.
    """
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def lock_path_for(folder: Path) -> Path:
    """The lock file of a staging or ``-old-`` folder: ``.OUT.lorasave-lock-<tag>`` beside it."""
    head, _, tag = folder.name.rpartition("-")
    prefix = head.rsplit(".lorasave-", 1)[0]
    return folder.parent / f"{prefix}.lorasave-lock-{tag}"


def _lock_free(lock: Path) -> bool:
    """True when nobody holds ``lock`` (or it does not exist)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def sweep_dead_runs(final: Path) -> list[Path]:
    """Remove staging folders, half-replaced old outputs and lock files of OUT left by runs that died.

    A run's folders are touched only when nobody holds its lock (see ``StagedOutput``). When the lock
    file is gone (lorasave makes it first), nothing is lost: an empty folder is removed, a lorasave
    output (``lorasave.json``) in an ``-old-`` folder is put back as a missing OUT, and anything else
    that merely has such a name is the user's and is left alone. An
    ``-old-`` folder left by a run killed between the two renames of a replace is put back as
    OUT when OUT is missing, removed when OUT is there.

    Returns:
        The paths removed or restored.
    """
    done = []
    prefix = f".{glob.escape(final.name)}.lorasave-"
    for p in sorted(final.parent.glob(prefix + "tmp-*")) + sorted(final.parent.glob(prefix + "old-*")):
        lock = lock_path_for(p)
        if not p.is_dir() or not _lock_free(lock):
            continue
        if not lock.is_file():  # lorasave makes the lock before the folder: without it, nothing is lost
            if ".lorasave-old-" in p.name and not final.exists() and (p / "lorasave.json").is_file():
                os.replace(p, final)  # a lorasave output put back where it was
                logger.info("restored %s from %s, left by a run that did not finish", final, p)
                done.append(p)
            else:
                with contextlib.suppress(OSError):
                    p.rmdir()  # only an empty folder
                    done.append(p)
            continue
        if ".lorasave-old-" in p.name and not final.exists():
            os.replace(p, final)  # killed between the two renames of a replace: put the old OUT back
            logger.info("restored %s from %s, left by a run that did not finish", final, p)
        else:
            shutil.rmtree(p, ignore_errors=True)
            logger.info("removed %s, left by a run that did not finish", p)
        done.append(p)
    for lock in final.parent.glob(prefix + "lock-*"):
        tag = lock.name.rsplit("-", 1)[1]
        owned = (final.parent / f".{final.name}.lorasave-tmp-{tag}").exists() or (final.parent / f".{final.name}.lorasave-old-{tag}").exists()
        if not owned:
            _unlink_if_free(lock)
    return done


def _unlink_if_free(lock: Path) -> None:
    """Remove a lock file nobody holds, holding it meanwhile (see ``_hold_lock``)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_config(
    cfg: dict[str, Any], dst: Path, *, dtype: torch.dtype, quantization: dict[str, Any] | None = None, updates: dict[str, object] | None = None
) -> None:
    """Write a merged output's ``config.json`` as transformers writes it (indent 2, sorted keys).

    Args:
        cfg: the base's config (parsed config.json, or ``config.to_diff_dict()`` of a live model);
            not modified.
        dst: file to write.
        dtype: sets ``dtype`` (transformers 5's key; ``torch_dtype`` is dropped).
        quantization: the ``quantization_config`` to set; any other (top level or nested, as in
            ``text_config``) is removed.
        updates: ``{"dotted.path": value}`` to set (``tie_word_embeddings``, ``vocab_size``).
    """
    cfg = json.loads(json.dumps(cfg))  # deep copy
    cfg.pop("torch_dtype", None)
    cfg.pop("quantization_config", None)
    for v in cfg.values():
        if isinstance(v, dict):
            v.pop("quantization_config", None)
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    if quantization is not None:
        cfg["quantization_config"] = quantization
    for path, value in (updates or {}).items():
        node = cfg
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    dst.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


#: Tokenizer files that may be left out when they break the symlink rule (a note, not an error).
OPTIONAL_TOKENIZER_FILES = ("chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json")


@dataclass
class CarryPlan:
    """The files ``carry_files`` copies into an output, decided before any writing.

    Attributes:
        files: ``(source file, name in OUT)`` pairs.
        skipped: one note per optional file left out because it is a symlink leaving its folder.
    """

    files: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Bytes the copies will take."""
        return sum(src.stat().st_size for src, _ in self.files)


def carry_plan(base: Path | None, tokenizer_dir: Path) -> CarryPlan:
    """Which of ``generation_config.json``, license files and tokenizer files an output gets.

    A file that is a symlink resolving outside the folder it was found in (and outside that
    Hugging Face cache repo's ``blobs/``; the rule is ``paths.escaping_target``) is not copied:
    an optional one (license-like files, ``generation_config.json``, chat templates, processor
    configs) is skipped with a note, a tokenizer file is an error.

    Args:
        base: base folder (generation config, licenses); None: the tokenizer files only (an adapter output).
        tokenizer_dir: folder whose tokenizer files are copied.

    Raises:
        UnsafePathError: a required tokenizer file links outside ``tokenizer_dir``.
    """
    plan = CarryPlan()
    found: list[tuple[Path, str, bool]] = []
    if base is not None:
        if (base / "generation_config.json").is_file():
            found.append((base, "generation_config.json", False))
        for p in sorted(base.iterdir()):
            if p.is_file() and p.name.upper().startswith(LICENSE_PREFIXES):
                found.append((base, p.name, False))
    for n in TOKENIZER_FILES:
        if (tokenizer_dir / n).is_file():
            found.append((tokenizer_dir, n, n not in OPTIONAL_TOKENIZER_FILES))
    for folder, n, required in found:
        src = folder / n
        target = escaping_target(src, folder)
        if target is None:
            plan.files.append((src, n))
        elif required:
            raise UnsafePathError(f"{escape_message(src, target, folder)}: copy the tokenizer file into the folder or remove the link", path=src)
        else:
            plan.skipped.append(f"{n} not carried: {escape_message(src, target, folder)}")
    return plan


def carry_files(base: Path | None, tokenizer_dir: Path, dst: Path, plan: CarryPlan | None = None) -> list[str]:
    """Copy ``generation_config.json``, license files and the tokenizer into ``dst``.

    Args:
        base: base folder (generation config, licenses).
        tokenizer_dir: folder whose tokenizer files are copied.
        dst: staging folder.
        plan: ``carry_plan(base, tokenizer_dir)`` when the caller made it already.

    Returns:
        Names of the files copied. Symlinks are followed only as ``carry_plan`` allows (the
        Hugging Face cache's are); each optional file skipped is logged as a note.

    Raises:
        UnsafePathError: a required tokenizer file links outside its folder.
    """
    plan = plan if plan is not None else carry_plan(base, tokenizer_dir)
    for note in plan.skipped:
        logger.info("%s", note)
    copied = []
    for src, n in plan.files:
        shutil.copyfile(src, dst / n)
        copied.append(n)
    return copied


def align_generation_eos(out: Path, tokenizer_dir: Path) -> str | None:
    """Make ``generation_config.json`` stop on the fine-tune tokenizer's EOS token.

    A fine-tune often changes ``eos_token`` (a chat model's end-of-turn token); generation must
    then stop on it. The id is read with transformers' tokenizer loader (no remote code).

    Returns:
        A note when the file was changed, else None.
    """
    gen_path = out / "generation_config.json"
    if not gen_path.is_file() or not has_tokenizer(tokenizer_dir):
        return None
    try:
        from lorasave.sources.hf_load import load_tokenizer

        eos = load_tokenizer(tokenizer_dir).eos_token_id
    except Exception as e:  # a tokenizer transformers cannot load: leave the generation config alone
        logger.info("could not read the tokenizer in %s (%s); generation_config.json left as is", tokenizer_dir, e)
        return None
    return set_generation_eos(gen_path, eos) if eos is not None else None


def set_generation_eos(gen_path: Path, eos: int) -> str | None:
    """Make ``generation_config.json`` stop on token ``eos`` (unless it already does).

    Returns:
        A note when the file was changed, else None.
    """
    gen = read_json(gen_path)
    current = gen.get("eos_token_id")
    if current == eos or (isinstance(current, list) and eos in current):
        return None
    gen["eos_token_id"] = eos
    gen_path.write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return f"generation_config.json: eos_token_id {current} -> {eos}, the fine-tune tokenizer's EOS"


def tokenizer_source(tokenizer: str | os.PathLike[str] | None, adapter_roots: list[Path], base_root: Path) -> Path:
    """Where the output's tokenizer comes from: ``tokenizer``, else the first adapter holding one, else the base.

    Raises:
        SourceNotFoundError: ``tokenizer`` holds no tokenizer.
        UnsafePathError: a tokenizer file of the chosen folder links outside it.
    """
    if tokenizer is None:
        return check_tokenizer_links(next((r for r in adapter_roots if has_tokenizer(r)), base_root))
    tok_dir = Path(tokenizer)
    if not tok_dir.is_dir() or not has_tokenizer(tok_dir):
        from lorasave.errors import SourceNotFoundError

        raise SourceNotFoundError(
            f"--tokenizer {tokenizer}: no tokenizer there (tokenizer.json, tokenizer_config.json, tokenizer.model or vocab.json)", path=tok_dir
        )
    return check_tokenizer_links(tok_dir)


def check_tokenizer_links(tok_dir: Path) -> Path:
    """Refuse a tokenizer folder whose required files are symlinks leaving it (``paths.check_inside``).

    Returns:
        ``tok_dir``.

    Raises:
        UnsafePathError: such a file; optional ones (``OPTIONAL_TOKENIZER_FILES``) are left to ``carry_plan``.
    """
    for n in TOKENIZER_FILES:
        if n not in OPTIONAL_TOKENIZER_FILES and (tok_dir / n).is_file():
            check_inside(tok_dir / n, tok_dir)
    return tok_dir
