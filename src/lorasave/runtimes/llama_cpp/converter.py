"""llama.cpp's own converter (``convert_hf_to_gguf.py``) of the pinned runtime's version, in its own Python environment.

``lorasave install-llama-cpp --converter [--converter-dir D] [--force]``

The source is that of the runtime lorasave installs (llama.cpp ``v0.5.0``): the npm package
``node-llama-cpp@3.22.1`` (the package whose ``@node-llama-cpp/linux-x64`` sibling ships the
libraries, :mod:`.install`) carries llama.cpp's tree as a git bundle, ``llama/gitRelease.bundle``.
The installer downloads that tarball from the npm registry (``urllib``), checks its pinned
Subresource-Integrity hash (sha512, :data:`INTEGRITY`) before opening it, reads the bundle with
``git`` (or, without ``git``, the pure-Python ``dulwich``), and keeps only what the converter needs
(:data:`SOURCE_PATHS`: ``convert_hf_to_gguf.py``, ``conversion/``, ``gguf-py/``, ``requirements/``).
It then creates a virtual environment with the converter's own requirements file
(``requirements/requirements-convert_hf_to_gguf.txt``: torch 2.11.0, transformers 4.57.6,
numpy 2.2.x, sentencepiece, protobuf; pip takes torch's CPU build where its extra index is reachable,
else PyPI's) and the bundled ``gguf-py`` (the converter needs its own, not PyPI's ``gguf``). Nothing
is fetched from a branch: the tree is the bundle's one commit, recorded in the marker.

Where: ``--converter-dir``, else ``$LORASAVE_LLAMA_CPP_CONVERTER_DIR``, else
``<lorasave cache>/llama-cpp/3.22.1-converter`` (beside the runtime's ``<cache>/llama-cpp/3.22.1``).
The folder appears complete or not at all (staged beside it, renamed into place); running the
installer again is a quick no-op.

Running it (:meth:`Converter.convert`): the converter is started with no ``--remote`` and in
offline mode (``HF_HUB_OFFLINE``), and through :data:`GUARD`, which replaces transformers'
``get_class_from_dynamic_module`` (the only way ``trust_remote_code=True``, which several of the
converter's tokenizer loaders pass, reaches model code) with a function that raises: the converter
never imports code from the checkpoint. The checkpoints lorasave hands it hold no ``.py`` file and
no ``auto_map`` anyway (``formats.gguf.fallback``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorasave.errors import LlamaCppConverterError, LlamaCppConverterNotInstalledError, LlamaCppInstallError, OutputExistsError
from lorasave.runtimes.llama_cpp.install import LLAMA_CPP_TAG, PACKAGE_VERSION, check_integrity, download

logger = logging.getLogger(__name__)

NPM_PACKAGE = "node-llama-cpp"
TARBALL_URL = f"https://registry.npmjs.org/{NPM_PACKAGE}/-/{NPM_PACKAGE}-{PACKAGE_VERSION}.tgz"
#: ``npm view node-llama-cpp@3.22.1 dist.integrity``.
INTEGRITY = "sha512-bltIipuWmc123H7tMIgDGKSsSrhmhlQYeVUC48XTjVW7XGJJiJJyCdlTMzQ/LiWoPkGDpcL4FviDpgw7qfTiDw=="
BUNDLE_MEMBER = "package/llama/gitRelease.bundle"
#: What is kept of llama.cpp's tree: the converter, its per-family modules, its gguf-py, its requirements.
SOURCE_PATHS = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "requirements")
REQUIREMENTS = "requirements/requirements-convert_hf_to_gguf.txt"
MARKER = ".lorasave-converter.json"
ENV_DIR = "LORASAVE_LLAMA_CPP_CONVERTER_DIR"
INSTALL_COMMAND = "lorasave install-llama-cpp --converter"
#: The output types ``convert_hf_to_gguf.py --outtype`` writes (the rest are llama-quantize's).
OUTTYPES = ("f32", "f16", "bf16", "q8_0")

#: Python that disables transformers' remote-code loader (argv[1]: the converter's folder, popped;
#: put first on sys.path). :data:`GUARD` is it followed by :data:`RUN_CONVERTER`.
GUARD_SETUP = """
import os, runpy, sys
here = sys.argv.pop(1)
sys.path.insert(0, here)
import transformers.dynamic_module_utils as dmu
def refuse(*args, **kwargs):
    raise RuntimeError("lorasave: the converter may not import code from the checkpoint (trust_remote_code)")
dmu.get_class_from_dynamic_module = refuse
for name in ("configuration_auto", "tokenization_auto", "auto_factory", "modeling_auto", "processing_auto", "feature_extraction_auto", "image_processing_auto"):
    try:
        module = __import__("transformers.models.auto." + name, fromlist=["x"])
    except Exception:
        continue
    if hasattr(module, "get_class_from_dynamic_module"):
        module.get_class_from_dynamic_module = refuse
"""
#: Runs ``convert_hf_to_gguf.py`` as ``__main__`` with the remaining argv.
RUN_CONVERTER = """
sys.argv[0] = os.path.join(here, "convert_hf_to_gguf.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""
GUARD = GUARD_SETUP + RUN_CONVERTER


def default_dir() -> Path:
    """The converter folder: ``$LORASAVE_LLAMA_CPP_CONVERTER_DIR``, else ``<cache>/llama-cpp/<version>-converter``."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env).expanduser()
    from lorasave.sources.cache import cache_dir

    root = cache_dir() or Path.home() / ".cache" / "lorasave"
    return root / "llama-cpp" / f"{PACKAGE_VERSION}-converter"


@dataclass(frozen=True)
class Converter:
    """A converter environment: its venv's python and the folder holding ``convert_hf_to_gguf.py``."""

    python: Path
    source: Path

    def command(self, model: Path, out: Path, outtype: str, *, prelude: str = GUARD, args: Sequence[str] = ()) -> list[str]:
        """The command line that converts ``model`` to ``out`` (``prelude`` runs the converter, :data:`GUARD` by default;
        ``args``: more of the converter's options, e.g. ``--no-mtp``)."""
        return [str(self.python), "-c", prelude, str(self.source), str(model), "--outtype", outtype, "--outfile", str(out), *args]

    def convert(
        self,
        model: str | os.PathLike[str],
        out: str | os.PathLike[str],
        outtype: str,
        *,
        env: dict[str, str] | None = None,
        prelude: str = GUARD,
        args: Sequence[str] = (),
    ) -> str:
        """Run ``convert_hf_to_gguf.py MODEL --outtype OUTTYPE --outfile OUT [ARGS]`` in the converter's environment.

        Args:
            model: a Hugging Face checkpoint folder (config.json, safetensors, tokenizer files).
            out: the GGUF file to write.
            outtype: one of :data:`OUTTYPES`.
            env: extra environment variables.
            prelude: the Python code that starts the converter (argv: source folder, then its own).
            args: more converter options (``--no-mtp``).

        Returns:
            The converter's stderr (its log).

        Raises:
            LlamaCppConverterError: the converter exited with an error (its last line quoted).
        """
        full = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
        full.pop("NO_LOCAL_GGUF", None)  # the converter then puts its own gguf-py first on sys.path
        full.pop("PYTHONPATH", None)
        cmd = self.command(Path(model), Path(out), outtype, prelude=prelude, args=args)
        logger.info("running llama.cpp's converter: %s", " ".join(cmd[3:]))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=full, check=False)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines() or [f"exit code {proc.returncode}"]
            raise LlamaCppConverterError(f"llama.cpp's convert_hf_to_gguf.py failed on {model}: {lines[-1]}", path=Path(model))
        return proc.stderr

    def versions(self) -> str:
        """``torch X, transformers Y, numpy Z`` of the environment."""
        code = "import torch, transformers, numpy; print(f'torch {torch.__version__}, transformers {transformers.__version__}, numpy {numpy.__version__}')"
        return subprocess.run([str(self.python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


@dataclass(frozen=True)
class ConverterInstall:
    """What :func:`install_converter` did (``installed`` False: it was there already)."""

    path: Path
    installed: bool
    commit: str
    seconds: float

    def summary(self) -> str:
        """One line for the command line."""
        what = f"llama.cpp's converter ({LLAMA_CPP_TAG}, {NPM_PACKAGE}@{PACKAGE_VERSION} commit {self.commit[:10]})"
        if not self.installed:
            return f"{what} already installed in {self.path}"
        return f"installed {what} and its Python environment in {self.path} in {self.seconds:.0f} s"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {"path": str(self.path), "installed": self.installed, "commit": self.commit, "seconds": self.seconds, "version": PACKAGE_VERSION}


def _marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("integrity") == INTEGRITY else None


def find_converter(path: str | os.PathLike[str] | None = None) -> Converter:
    """The installed converter in ``path`` (default :func:`default_dir`).

    Raises:
        LlamaCppConverterNotInstalledError: not installed there (the message says how to install it).
    """
    folder = Path(path).expanduser() if path is not None else default_dir()
    python, source = folder / "venv" / "bin" / "python", folder / "src"
    if _marker(folder) is None or not python.is_file() or not (source / "convert_hf_to_gguf.py").is_file():
        raise LlamaCppConverterNotInstalledError(
            f"llama.cpp's converter ({LLAMA_CPP_TAG}) is not installed in {folder}; install it with `{INSTALL_COMMAND}` "
            "(a Python environment of ~1-5 GB with torch, once)"
        )
    return Converter(python, source)


def is_installed(path: str | os.PathLike[str] | None = None) -> bool:
    """True when :func:`find_converter` finds a complete install."""
    try:
        find_converter(path)
    except LlamaCppConverterNotInstalledError:
        return False
    return True


def _run(cmd: list[str], what: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        raise LlamaCppInstallError(f"{what} failed: {tail[0]}")
    return proc


def extract_bundle(tgz: Path, dest: Path) -> str:
    """Check out :data:`SOURCE_PATHS` of the git bundle inside the npm tarball ``tgz`` into ``dest``; return the commit.

    ``git`` when it is on PATH, else ``dulwich`` (pure Python). The bundle is the only member read.

    Raises:
        LlamaCppInstallError: the tarball has no bundle, or neither git nor dulwich is available.
    """
    work = dest.parent / (dest.name + ".bundle")
    work.mkdir(parents=True, exist_ok=True)
    bundle = work / "gitRelease.bundle"
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            member = tar.getmember(BUNDLE_MEMBER)
            if not member.isfile():
                raise KeyError(BUNDLE_MEMBER)
            src = tar.extractfile(member)
            assert src is not None
            with src, open(bundle, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    except (KeyError, tarfile.TarError, EOFError) as e:
        raise LlamaCppInstallError(f"{tgz} has no readable {BUNDLE_MEMBER}; it is not the {NPM_PACKAGE} package", path=tgz) from e
    try:
        if shutil.which("git"):
            repo = work / "repo"
            _run(["git", "clone", "--quiet", "--no-checkout", str(bundle), str(repo)], "git clone of the bundle")
            commit = _run(["git", "-C", str(repo), "rev-parse", "HEAD"], "git rev-parse").stdout.strip()
            _run(["git", "-C", str(repo), "--work-tree", str(dest), "checkout", "HEAD", "--", *SOURCE_PATHS], "git checkout")
        else:
            commit = _dulwich_checkout(bundle, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return commit


def _dulwich_checkout(bundle: Path, dest: Path) -> str:
    """:func:`extract_bundle` without git: the bundle's pack goes into a bare dulwich repository beside
    it; the wanted paths are written from the tip's tree.

    A v2/v3 git bundle is a header (signature, capabilities, ``<sha> <ref>`` lines) ended by an
    empty line, then a pack file (git's ``Documentation/gitformat-bundle.txt``).
    """
    try:
        from dulwich.repo import Repo
    except ImportError as e:
        raise LlamaCppInstallError("reading llama.cpp's git bundle needs `git` on PATH or the dulwich package (pip install dulwich)") from e
    refs: dict[bytes, bytes] = {}
    with open(bundle, "rb") as f:
        if not f.readline().startswith(b"# v"):
            raise LlamaCppInstallError(f"{bundle} is not a git bundle")
        while (line := f.readline()) not in (b"\n", b""):
            if not line.startswith((b"@", b"-")):
                sha, _, ref = line.strip().partition(b" ")
                refs[ref] = sha
        repo = Repo.init_bare(str(bundle.parent / "dulwich"), mkdir=True)
        out, commit, abort = repo.object_store.add_pack()
        try:
            shutil.copyfileobj(f, out, 1 << 20)
        except BaseException:
            abort()
            raise
        commit()
    if not refs:
        raise LlamaCppInstallError(f"{bundle} names no commit")
    sha = refs.get(b"HEAD") or next(iter(refs.values()))
    store = repo.object_store
    for path in SOURCE_PATHS:
        _dulwich_write(store, store[sha].tree, path.encode(), dest)  # type: ignore[attr-defined]
    return sha.decode()


def _dulwich_write(store: Any, tree_id: bytes, path: bytes, dest: Path) -> None:
    """Write ``path`` (a file or a folder, recursively) of the tree ``tree_id`` below ``dest``; links and submodules are skipped."""
    from dulwich.objects import Tree

    mode, sha = store[tree_id].lookup_path(store.__getitem__, path)
    obj = store[sha]
    target = dest / path.decode()
    if isinstance(obj, Tree):
        target.mkdir(parents=True, exist_ok=True)
        for entry in obj.iteritems():
            _dulwich_write(store, tree_id, path + b"/" + entry.path, dest)
    elif mode & 0o170000 == 0o100000:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(obj.data)


def _reachable(url: str, timeout: float = 10.0) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def requirements_file(source: Path) -> Path:
    """The converter's requirements file as pip gets it: :data:`REQUIREMENTS`, less an ``--extra-index-url``
    that does not answer within 10 s (pip would wait on it for every package: torch then comes from PyPI).

    Returns:
        :data:`REQUIREMENTS` itself, or a copy beside it (``requirements-lorasave.txt``, so that its
        relative ``-r`` includes still resolve).
    """
    requirements = source / REQUIREMENTS
    lines = requirements.read_text(encoding="utf-8").splitlines()
    keep = [ln for ln in lines if not (ln.startswith("--extra-index-url") and not _reachable(ln.split(maxsplit=1)[1].strip()))]
    if keep == lines:
        return requirements
    dropped = sorted(set(lines) - set(keep))
    logger.info("not reachable, left out of the converter's requirements: %s", "; ".join(dropped))
    copy = requirements.with_name("requirements-lorasave.txt")
    copy.write_text("\n".join(keep) + "\n", encoding="utf-8")
    return copy


def ensure_venv(source: Path, venv: Path, python: str = sys.executable) -> Converter:
    """Create ``venv`` with the pins of the converter's requirements file (:func:`requirements_file`) and ``source``'s own gguf-py.

    Raises:
        LlamaCppInstallError: venv creation or pip failed.
    """
    requirements = requirements_file(source)
    shutil.rmtree(venv, ignore_errors=True)
    _run([python, "-m", "venv", str(venv)], "creating the converter's venv")
    vpython = venv / "bin" / "python"
    install = [str(vpython), "-m", "pip", "install", "--quiet", "-r", str(requirements), str(source / "gguf-py")]
    logger.info("installing the converter's requirements (torch, transformers...): %s", " ".join(install))
    _run(install, "pip install of the converter's requirements", cwd=str(requirements.parent))
    return Converter(vpython, source)


def install_converter(
    path: str | os.PathLike[str] | None = None, *, force: bool = False, from_tgz: str | os.PathLike[str] | None = None, python: str = sys.executable
) -> ConverterInstall:
    """Install llama.cpp's converter and its environment into ``path`` (default :func:`default_dir`).

    Args:
        path: the target folder.
        force: reinstall even when installed.
        from_tgz: a downloaded ``node-llama-cpp-3.22.1.tgz`` (still integrity-checked); the
            environment's packages still come from pip's indexes.
        python: the interpreter that creates the venv.

    Raises:
        LlamaCppInstallError: download, integrity, bundle or pip failure.
        OutputExistsError: ``path`` exists and is not a converter lorasave installed.
        SourceNotFoundError: ``from_tgz`` does not exist.
    """
    from lorasave.errors import SourceNotFoundError

    start = time.perf_counter()
    target = (Path(path) if path is not None else default_dir()).expanduser().absolute()
    marker = _marker(target)
    if not force and marker is not None and is_installed(target):
        return ConverterInstall(target, False, str(marker.get("commit")), time.perf_counter() - start)
    if from_tgz is not None and not Path(from_tgz).is_file():
        raise SourceNotFoundError(f"{from_tgz} does not exist; give the path of {NPM_PACKAGE}-{PACKAGE_VERSION}.tgz", path=from_tgz)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / MARKER).is_file())):
        raise OutputExistsError(f"{target} exists and is not a converter lorasave installed; choose another folder (or ${ENV_DIR})", path=target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.lorasave-tmp-", dir=target.parent))
    old: Path | None = None
    try:
        tgz = Path(from_tgz) if from_tgz is not None else staging / "package.tgz"
        if from_tgz is None:
            download(TARBALL_URL, tgz)
        check_integrity(tgz, INTEGRITY)
        folder = staging / "converter"
        (folder / "src").mkdir(parents=True)
        commit = extract_bundle(tgz, folder / "src")
        ensure_venv(folder / "src", folder / "venv", python)  # lorasave runs only venv/bin/python: the folder may move
        marker = {"package": NPM_PACKAGE, "version": PACKAGE_VERSION, "llama_cpp": LLAMA_CPP_TAG, "integrity": INTEGRITY, "commit": commit}
        (folder / MARKER).write_text(json.dumps(marker))
        if target.exists():  # forced, or an incomplete earlier install: moved aside, removed below
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.lorasave-old-", dir=target.parent))
            os.replace(target, old / "x")
        os.rename(folder, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    logger.info("installed llama.cpp's converter into %s", target)
    return ConverterInstall(target, True, commit, time.perf_counter() - start)
