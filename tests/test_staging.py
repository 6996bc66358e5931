"""Staging folders: a killed run's leftovers are cleaned by the next run, a live run's are not; odd inputs refused."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import lorasave
from lorasave.errors import InvalidOptionError, SourceNotFoundError
from lorasave.pipeline.output import lock_path_for, sweep_dead_runs

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_BASE = REPO / "examples" / "tiny-llama"
EXAMPLE_LORA = REPO / "examples" / "tiny-llama-lora"


def _leftover(parent: Path, name: str, tag: str, locked: bool) -> tuple[Path, int | None]:
    d = parent / f".{name}.lorasave-tmp-{tag}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"half written")
    fd = os.open(lock_path_for(d), os.O_CREAT | os.O_RDWR)
    if locked:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return d, fd
    os.close(fd)
    return d, None


def test_sweep_removes_dead_keeps_live(tmp_path: Path) -> None:
    dead, _ = _leftover(tmp_path, "out", "dead0001", locked=False)
    live, fd = _leftover(tmp_path, "out", "live0001", locked=True)
    try:
        # the lock is held by an open file description; a second open + flock(LOCK_NB) must fail
        removed = sweep_dead_runs(tmp_path / "out")
        assert removed == [dead]
        assert not dead.exists() and live.exists()
    finally:
        assert fd is not None
        os.close(fd)
    assert sweep_dead_runs(tmp_path / "out") == [live]


def test_staging_folder_without_lock_file_is_dead(tmp_path: Path) -> None:
    """A run killed right after creating its folder: the lock file, made first, is gone or free."""
    d = tmp_path / ".out.lorasave-tmp-abcd1234"
    d.mkdir()
    assert sweep_dead_runs(tmp_path / "out") == [d]
    assert not d.exists()


def test_killed_run_leaves_nothing_under_final_name_and_next_run_cleans(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = (
        "import time, lorasave.pipeline.output as o, pathlib\n"
        f"s = o.StagedOutput(pathlib.Path({str(out)!r})).__enter__()\n"
        "(s.path / 'model.safetensors').write_bytes(b'x' * 1000)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    leftovers = list(tmp_path.glob(".out.lorasave-tmp-*"))
    assert leftovers and not out.exists()
    lorasave.merge(EXAMPLE_BASE, EXAMPLE_LORA, out)
    assert out.is_dir() and not list(tmp_path.glob(".out.lorasave-tmp-*"))


def test_interrupted_replace_restores_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    lorasave.merge(EXAMPLE_BASE, EXAMPLE_LORA, out)
    before = sorted(p.name for p in out.iterdir())
    os.replace(out, tmp_path / ".out.lorasave-old-deadbeef")  # killed between the two renames of a replace
    sweep_dead_runs(out)
    assert sorted(p.name for p in out.iterdir()) == before


def test_tokenizer_option_must_hold_a_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError, match="no tokenizer there"):
        lorasave.merge(EXAMPLE_BASE, EXAMPLE_LORA, tmp_path / "o", tokenizer=tmp_path / "nope")
    with pytest.raises(SourceNotFoundError, match="no tokenizer there"):
        lorasave.merge(EXAMPLE_BASE, EXAMPLE_LORA, tmp_path / "o", tokenizer=EXAMPLE_LORA)
    assert not (tmp_path / "o").exists()


def test_same_adapter_twice_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match="same adapter is given twice"):
        lorasave.merge(EXAMPLE_BASE, [EXAMPLE_LORA, EXAMPLE_LORA], tmp_path / "o")


@pytest.mark.parametrize("size", ["25KB", "45KB", "55KB", "70KB"])
def test_merged_4bit_any_shard_size(tmp_path: Path, size: str) -> None:
    """A 4-bit weight's statistics stay in its shard whatever max_shard_size is; the index is exact."""
    import json

    from safetensors import safe_open

    res = lorasave.merge(EXAMPLE_BASE, EXAMPLE_LORA, tmp_path / "o", save_method="merged_4bit", max_shard_size=size)
    index = json.loads((res.output / "model.safetensors.index.json").read_text())
    total = 0
    for f in sorted(set(index["weight_map"].values())):
        with safe_open(res.output / f, "pt") as h:
            for k in h.keys():
                assert index["weight_map"][k] == f
                t = h.get_tensor(k)
                total += t.numel() * t.element_size()
    assert index["metadata"]["total_size"] == total


def test_folder_named_like_a_staging_folder_is_not_swept(tmp_path: Path) -> None:
    """A folder that only has a staging or -old- name (no lock file lorasave made before it) is the user's: kept."""
    import lorasave

    examples = Path(__file__).resolve().parents[1] / "examples"
    for name in (".d.lorasave-tmp-mine", ".d.lorasave-old-mine"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("mine")
    lorasave.merge(examples / "tiny-llama", examples / "tiny-llama-lora", tmp_path / "d")
    for name in (".d.lorasave-tmp-mine", ".d.lorasave-old-mine"):
        assert (tmp_path / name / "notes.txt").read_text() == "mine"
    assert (tmp_path / "d" / "lorasave.json").is_file()
