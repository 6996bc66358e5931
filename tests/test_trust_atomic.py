"""Issue 11, points 1, 4 and 14: OUT re-checked at commit, sources changing under a run, the umask.

1. The final rename is atomic against OUT appearing while a run works: concurrent runs into one
   OUT (2, 3 and 6 CLI processes held at a barrier just before their commit, so every one has
   passed the up-front check), and a user's folder, file or empty folder appearing at OUT mid-run
   (a hook on ``StagedOutput.commit`` creates it just before the real commit). Each case runs with
   ``renameat2`` and with the lock-and-rename fallback.
4. A base shard or adapter file truncated, replaced, rewritten or deleted during a run stops it
   with ``SourceChangedError`` naming the file; an I/O error names the file too.
14. Output files and folders follow the umask (022 and 077) for merge, GGUF f16 and GGUF q4_k_m
    (llama.cpp's quantizer writes through ``mkstemp``, 0600).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import lorasave
from lorasave.cli.main import main
from lorasave.errors import CheckpointFormatError, LorasaveError, OutputExistsError
from lorasave.formats.gguf.export import export_gguf
from lorasave.pipeline import output
from lorasave.runtimes.llama_cpp import lib as llama_cpp
from lorasave.verify.run import verify

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _llama import need_llama_cpp

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_BASE = REPO / "examples" / "tiny-llama"
EXAMPLE_LORA = REPO / "examples" / "tiny-llama-lora"

# A CLI run whose commit waits until N runs have reached theirs (a folder of pid files is the barrier).
_BARRIER_RUN = textwrap.dedent(
    """
    import os, pathlib, sys, time
    import lorasave.pipeline.output as o
    if os.environ.get("T_FALLBACK"):
        import lorasave.pipeline.rename as r
        r.RENAMEAT2 = None
    real = o.StagedOutput.commit
    def commit(self):
        d = pathlib.Path(os.environ["T_BARRIER"])
        (d / str(os.getpid())).touch()
        end = time.monotonic() + 300
        while len(list(d.iterdir())) < int(os.environ["T_N"]) and time.monotonic() < end:
            time.sleep(0.01)
        real(self)
    o.StagedOutput.commit = commit
    sys.argv = ["lorasave", *sys.argv[1:]]
    from lorasave.cli.main import run
    run()
    """
)


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.lorasave-"))


def _concurrent(out: Path, n: int, tmp: Path, *, overwrite: bool, fallback: bool) -> list[tuple[int, str]]:
    barrier = tmp / f"barrier-{n}-{overwrite}"
    barrier.mkdir()
    env = _env(T_BARRIER=str(barrier), T_N=str(n), **({"T_FALLBACK": "1"} if fallback else {}))
    cmd = [sys.executable, "-c", _BARRIER_RUN, "merge", str(EXAMPLE_BASE), str(EXAMPLE_LORA), "-o", str(out), *(["--overwrite"] if overwrite else [])]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(n)]
    results = []
    for p in procs:
        _, err = p.communicate(timeout=600)
        results.append((p.returncode, err))
    return results


@pytest.mark.parametrize(("n", "fallback"), [(2, False), (3, False), (6, False), (3, True)], ids=["2-renameat2", "3-renameat2", "6-renameat2", "3-fallback"])
def test_concurrent_runs_into_one_out(tmp_path: Path, n: int, fallback: bool) -> None:
    """Without --overwrite exactly one run wins and the others exit 3 with their work discarded; with it all succeed."""
    out = tmp_path / "out"
    results = _concurrent(out, n, tmp_path, overwrite=False, fallback=fallback)
    codes = sorted(rc for rc, _ in results)
    assert codes == [0] + [3] * (n - 1), results
    for rc, err in results:
        if rc == 3:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"error: output {out} already exists"), err
    assert verify(out, level="files").ok
    assert _leftovers(out) == []

    first = json.loads((out / "lorasave.json").read_text())
    results = _concurrent(out, n, tmp_path, overwrite=True, fallback=fallback)
    assert [rc for rc, _ in results] == [0] * n, results
    assert verify(out, level="files").ok
    assert json.loads((out / "lorasave.json").read_text())["files"] == first["files"]
    assert _leftovers(out) == []
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("barrier")) == ["out"]


# --------------------------------------------------------------------------- something appears at OUT mid-run


@pytest.fixture(params=["renameat2", "fallback"])
def mechanism(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "fallback":
        from lorasave.pipeline import rename

        monkeypatch.setattr(rename, "RENAMEAT2", None)
    return str(request.param)


def _at_commit(monkeypatch: pytest.MonkeyPatch, action: Callable[[Path], None]) -> None:
    """Run ``action(OUT)`` just before the real commit (the run has done all its work)."""
    real = output.StagedOutput.commit

    def commit(self: output.StagedOutput) -> None:
        action(self.final)
        real(self)

    monkeypatch.setattr(output.StagedOutput, "commit", commit)


def _user_folder(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    (out / "thesis.txt").write_text("years of work")


def test_user_folder_appearing_mid_run_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mechanism: str) -> None:
    out = tmp_path / "out"
    _at_commit(monkeypatch, _user_folder)
    with pytest.raises(OutputExistsError, match="already exists") as e:
        lorasave.merge(EXAMPLE_BASE, EXAMPLE_LORA, out)
    assert e.value.exit_code == 3
    assert sorted(p.name for p in out.iterdir()) == ["thesis.txt"] and (out / "thesis.txt").read_text() == "years of work"
    assert _leftovers(out) == []


def test_user_folder_replacing_old_output_mid_run_is_kept_with_overwrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mechanism: str) -> None:
    out = tmp_path / "out"
    lorasave.merge(EXAMPLE_BASE, EXAMPLE_LORA, out)
    _at_commit(monkeypatch, _user_folder)
    with pytest.raises(OutputExistsError, match="not a lorasave output"):
        lorasave.merge(EXAMPLE_BASE, EXAMPLE_LORA, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["thesis.txt"]
    assert _leftovers(out) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_file_appearing_at_out_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mechanism: str, overwrite: bool) -> None:
    out = tmp_path / "out"
    _at_commit(monkeypatch, lambda p: p.write_text("notes"))
    with pytest.raises(OutputExistsError):
        lorasave.merge(EXAMPLE_BASE, EXAMPLE_LORA, out, overwrite=overwrite)
    assert out.is_file() and out.read_text() == "notes"
    assert _leftovers(out) == []


def test_empty_folder_appearing_at_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mechanism: str) -> None:
    """Without --overwrite an empty folder that appeared is kept (exit 3); with it, it is replaced."""
    out = tmp_path / "out"
    _at_commit(monkeypatch, lambda p: p.mkdir())
    with pytest.raises(OutputExistsError):
        lorasave.merge(EXAMPLE_BASE, EXAMPLE_LORA, out)
    assert out.is_dir() and not any(out.iterdir())
    out.rmdir()
    lorasave.merge(EXAMPLE_BASE, EXAMPLE_LORA, out, overwrite=True)
    assert verify(out, level="files").ok and _leftovers(out) == []


def test_user_folder_slipped_in_before_the_exchange_is_swapped_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OUT was a lorasave output at the check, a user folder by the time of the exchange: it is put back, the run refused."""
    from lorasave.pipeline import rename

    if rename.RENAMEAT2 is None:
        pytest.skip("no renameat2 here")
    out = tmp_path / "out"
    lorasave.merge(EXAMPLE_BASE, EXAMPLE_LORA, out)
    real = rename.renameat2
    calls: list[int] = []

    def racing(src: Path, dst: Path, flags: int) -> None:
        if flags == rename.RENAME_EXCHANGE and rename.RENAME_EXCHANGE not in calls:
            _user_folder(dst)
        calls.append(flags)
        real(src, dst, flags)

    monkeypatch.setattr(rename, "renameat2", racing)
    with pytest.raises(OutputExistsError):
        lorasave.merge(EXAMPLE_BASE, EXAMPLE_LORA, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["thesis.txt"]
    assert _leftovers(out) == []


def test_overwrite_from_gguf_and_adapter_share_the_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every output kind goes through the same commit: a user folder appearing is kept for gguf and adapter saves too."""
    _at_commit(monkeypatch, _user_folder)
    for kind, save in (
        ("gguf", lambda o: export_gguf(EXAMPLE_BASE, EXAMPLE_LORA, o, type="f16")),
        ("adapter", lambda o: lorasave.save_adapter(EXAMPLE_LORA, o)),
    ):
        out = tmp_path / kind
        with pytest.raises(OutputExistsError):
            save(out)
        assert sorted(p.name for p in out.iterdir()) == ["thesis.txt"], kind


# --------------------------------------------------------------------------- sources changing mid-run


@pytest.fixture
def sources(tmp_path: Path) -> tuple[Path, Path]:
    base, lora = tmp_path / "base", tmp_path / "lora"
    shutil.copytree(EXAMPLE_BASE, base)
    shutil.copytree(EXAMPLE_LORA, lora)
    return base, lora


def _truncate(p: Path) -> None:
    os.truncate(p, p.stat().st_size // 2)


def _replace(p: Path) -> None:
    tmp = p.with_suffix(".new")
    shutil.copyfile(p, tmp)  # same bytes, another file
    os.replace(tmp, p)


def _rewrite(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-8:] = bytes(8)  # same size, different bytes, in place
    with open(p, "r+b") as f:
        f.write(data)


CHANGES: dict[str, Callable[[Path], None]] = {"truncated": _truncate, "replaced": _replace, "rewritten": _rewrite, "deleted": os.unlink}


def _during_run(monkeypatch: pytest.MonkeyPatch, action: Callable[[], None]) -> None:
    """Run ``action`` right after the staging folder is made, before any tensor data is read."""
    real = output.StagedOutput.__enter__

    def enter(self: output.StagedOutput) -> output.StagedOutput:
        stage = real(self)
        action()
        return stage

    monkeypatch.setattr(output.StagedOutput, "__enter__", enter)


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_base_shard_changing_mid_run_names_the_file(sources: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    base, lora = sources
    shard = base / "model.safetensors"
    _during_run(monkeypatch, lambda: CHANGES[change](shard))
    out = tmp_path / "out"
    with pytest.raises(CheckpointFormatError) as e:
        lorasave.merge(base, lora, out)
    assert type(e.value).__name__ == "SourceChangedError"
    assert str(shard) in str(e.value) and "changed during the run" in str(e.value)
    assert not out.exists() and _leftovers(out) == []


@pytest.mark.parametrize("kind", ["merge", "gguf"])
@pytest.mark.parametrize("change", ["rewritten", "replaced"])
def test_adapter_changing_after_it_was_read_is_caught_at_commit(
    sources: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, change: str
) -> None:
    base, lora = sources
    target = lora / "adapter_model.safetensors"
    _at_commit(monkeypatch, lambda _out: CHANGES[change](target))
    out = tmp_path / "out"
    with pytest.raises(CheckpointFormatError, match="changed during the run") as e:
        if kind == "merge":
            lorasave.merge(base, lora, out)
        else:
            export_gguf(base, lora, out, type="f16")
    assert str(target) in str(e.value)
    assert not out.exists() and _leftovers(out) == []


def test_changed_source_cli_one_line(sources: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, lora = sources
    shard = base / "model.safetensors"
    _during_run(monkeypatch, lambda: _truncate(shard))
    res = CliRunner().invoke(main, ["merge", str(base), str(lora), "-o", str(tmp_path / "out")])
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert lines[-1].startswith(f"error: {shard} changed during the run"), res.output
    assert not any("internal error" in line for line in lines)


def test_read_error_names_the_file(sources: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, lora = sources

    def eio(*args: object) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    _during_run(monkeypatch, lambda: monkeypatch.setattr(os, "preadv", eio))
    with pytest.raises(LorasaveError) as e:
        lorasave.merge(base, lora, tmp_path / "out")
    assert str(base / "model.safetensors") in str(e.value) and os.strerror(errno.EIO) in str(e.value)


# --------------------------------------------------------------------------- umask


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _check_modes(out: Path, mask: int) -> None:
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in out.iterdir()}
    assert oct(stat.S_IMODE(out.stat().st_mode)) == oct(0o777 & ~mask), out
    assert set(modes.values()) == {oct(0o666 & ~mask)}, (out.name, oct(mask), modes)


def test_outputs_follow_the_umask(tmp_path: Path) -> None:
    """Umask 022 then 077: files 0666 & ~umask, folders 0777 & ~umask, for merge, GGUF f16 and GGUF q4_k_m (llama.cpp's quantizer)."""
    kinds: dict[str, Callable[[Path], Path]] = {
        "merge": lambda o: lorasave.merge(EXAMPLE_BASE, EXAMPLE_LORA, o).output,
        "f16": lambda o: export_gguf(EXAMPLE_BASE, EXAMPLE_LORA, o, type="f16").output,
    }
    if llama_cpp.available():
        kinds["q4_k_m"] = lambda o: export_gguf(EXAMPLE_BASE, EXAMPLE_LORA, o, type="q4_k_m").output
    for mask in (0o022, 0o077):
        for kind, save in kinds.items():
            with _umask(mask):
                out = save(tmp_path / f"{kind}-{mask:03o}")
            _check_modes(out, mask)
    need_llama_cpp()  # merge and f16 were checked; q4_k_m needs the runtime
