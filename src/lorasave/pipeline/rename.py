"""Putting a finished output folder in place without ever replacing what is not lorasave's.

The final step of every save moves the complete staging folder to OUT. OUT is checked again at
that moment, because a user (or another run) may have created it while the run was working:

- without ``overwrite``, the move is ``renameat2(RENAME_NOREPLACE)``: it fails if anything is at
  OUT, atomically, and the run stops with ``OutputExistsError`` (exit 3), its work discarded;
- with ``overwrite``, only a lorasave output (a folder holding ``lorasave.json``) or an empty
  folder is replaced: ``renameat2(RENAME_EXCHANGE)`` swaps the two folders in one step, then the
  old output, now under the staging name, is checked once more and removed (or, if it turned out
  not to be replaceable, swapped back and the run refused). The last run to commit wins.

Commits into one parent folder are also serialized with ``flock`` on that folder, so two lorasave
runs never interleave their checks. Where the kernel, the file system or the C library lacks
``renameat2`` (it came with Linux 3.15 and glibc 2.28), the same lock, a re-check and plain
``rename`` calls are used: ``rename`` of a folder onto a non-empty folder or onto a file fails, so
a user's files are still never replaced.

Output files and folders follow the umask, as files a plain ``open`` creates do; a file made with
``mkstemp`` (mode 0600) gets that mode with ``apply_umask`` before it is renamed into place.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from lorasave.errors import OutputExistsError

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
#: errno values meaning "something is in the way at the destination".
_TAKEN = (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR)


def _load_renameat2() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


#: glibc's ``renameat2``, or None (then the lock-and-rename fallback is used).
RENAMEAT2: Callable[..., int] | None = _load_renameat2()


class Unsupported(Exception):
    """``renameat2`` with these flags is not available here (no symbol, ENOSYS, or the file system refuses the flag)."""


def renameat2(src: Path, dst: Path, flags: int) -> None:
    """``renameat2(AT_FDCWD, src, AT_FDCWD, dst, flags)``.

    Raises:
        Unsupported: not available for this kernel, C library or file system.
        OSError: the call failed (``FileExistsError`` when ``dst`` exists with RENAME_NOREPLACE...).
    """
    fn = RENAMEAT2
    if fn is None:
        raise Unsupported
    if fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        raise Unsupported
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def is_replaceable(path: Path) -> bool:
    """Whether ``--overwrite`` may replace ``path``: a real folder holding ``lorasave.json``, or an empty folder."""
    from lorasave.pipeline.manifest import MANIFEST_NAME

    if path.is_symlink() or not path.is_dir():
        return False
    return (path / MANIFEST_NAME).is_file() or not any(path.iterdir())


def check_replaceable(final: Path) -> None:
    """Overwrite only what lorasave wrote: a folder with ``lorasave.json``, or an empty folder.

    Raises:
        OutputExistsError: OUT is a file, a link, or a folder lorasave did not write.
    """
    from lorasave.pipeline.manifest import MANIFEST_NAME

    if is_replaceable(final):
        return
    if final.is_symlink() or not final.is_dir():
        raise OutputExistsError(f"output {final} exists and is not a folder; remove it yourself or choose another output", path=final)
    raise OutputExistsError(
        f"output {final} exists and is not a lorasave output (no {MANIFEST_NAME}); --overwrite only replaces lorasave outputs, "
        "so remove it yourself or choose another folder",
        path=final,
    )


def _appeared(final: Path) -> OutputExistsError:
    return OutputExistsError(
        f"output {final} already exists (it appeared while this run was working); this run's output was discarded; "
        "pass --overwrite to replace a lorasave output",
        path=final,
    )


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``flock`` on ``folder`` itself (no lock file is left behind); a folder that cannot be opened is not locked."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def publish(staging: Path, final: Path, *, overwrite: bool, old: Path) -> None:
    """Move the complete folder ``staging`` to ``final``, re-checking ``final`` now.

    Args:
        staging: the finished output (same parent as ``final``).
        final: OUT.
        overwrite: replace a lorasave output or an empty folder found at OUT.
        old: a free name beside OUT for the replaced output (fallback path only; a run killed
            while it is there has it restored by the next run's sweep).

    Raises:
        OutputExistsError: something is at OUT and ``overwrite`` is False, or it is not
            replaceable; ``staging`` is left as it was (the caller discards it).
    """
    with folder_lock(final.parent):
        try:
            _publish_renameat2(staging, final, overwrite)
        except Unsupported:
            _publish_fallback(staging, final, overwrite, old)


def _publish_renameat2(staging: Path, final: Path, overwrite: bool) -> None:
    for _ in range(100):  # OUT may appear and vanish between the calls; a few turns settle it
        try:
            renameat2(staging, final, RENAME_NOREPLACE)
            return
        except OSError as e:
            if e.errno not in _TAKEN:
                raise
        if not overwrite:
            raise _appeared(final)
        check_replaceable(final)
        try:
            renameat2(staging, final, RENAME_EXCHANGE)
        except FileNotFoundError:
            continue  # OUT vanished meanwhile: try the plain move again
        # the previous OUT is now under the staging name: remove it only if it was ours to replace
        if not is_replaceable(staging):
            renameat2(staging, final, RENAME_EXCHANGE)  # put it back; the caller discards our output
            check_replaceable(final)
            raise _appeared(final)
        shutil.rmtree(staging, ignore_errors=True)
        return
    raise _appeared(final)


def _publish_fallback(staging: Path, final: Path, overwrite: bool, old: Path) -> None:
    if os.path.lexists(final):
        if not overwrite:
            raise _appeared(final)
        check_replaceable(final)
        os.rename(final, old)
        try:
            os.rename(staging, final)
        except OSError as e:
            if not os.path.lexists(final):
                os.rename(old, final)
            if e.errno in _TAKEN:
                raise _appeared(final) from None
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(staging, final)  # fails onto a non-empty folder or a file that appeared just now
    except OSError as e:
        if e.errno in _TAKEN:
            raise _appeared(final) from None
        raise


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status``; else set and restored)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give a file written with a private mode (``mkstemp``'s 0600) the mode a plain ``open`` would: 0666 less the umask."""
    os.chmod(path, 0o666 & ~current_umask())
