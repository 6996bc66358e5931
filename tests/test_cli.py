"""The command line, through real subprocesses (each costs an interpreter + torch import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import _models as M


def _run(*args: str | Path, exe: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    cmd = (exe or [sys.executable, "-m", "lorasave"]) + [str(a) for a in args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, check=False)


def _assert_clean_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:"), lines[0]
    return lines[0]


def test_cli_merge_matches_api(get_merged: Callable[[str], M.Merged], llama_base: Path, llama_plain: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _run("merge", llama_base, llama_plain, "-o", out, "--max-shard-size", M.SHARD)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), "a summary is expected on stdout"
    api = get_merged("llama_fp32").out
    weights = {p.name for p in api.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".index.json")}
    assert weights == {p.name for p in out.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".index.json")}
    for f in weights | {"config.json"}:
        assert (out / f).read_bytes() == (api / f).read_bytes(), f


def test_cli_merge_json_and_options(llama_base: Path, adapter_with_tokenizer: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _run("merge", llama_base, adapter_with_tokenizer, "-o", out, "--dtype", "bfloat16", "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert isinstance(data, dict)
    assert Path(data["output"]).resolve() == out.resolve()
    assert set(data["files"]) <= {p.name for p in out.iterdir()}
    assert "model.safetensors" in data["files"]
    assert M.read_json(out / "config.json")["dtype"] == "bfloat16"
    assert {t.dtype for t in M.read_tensors(out).values()} == {torch.bfloat16}
    assert (out / "tokenizer.json").read_bytes() == (adapter_with_tokenizer / "tokenizer.json").read_bytes()


def test_cli_errors_are_one_line(llama_base: Path, llama_plain: Path, tmp_path: Path) -> None:
    missing = _run("merge", tmp_path / "no_such_base", llama_plain, "-o", tmp_path / "o1")
    _assert_clean_error(missing)
    assert not (tmp_path / "o1").exists()

    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    proc = _run("merge", llama_base, llama_plain, "-o", existing)
    _assert_clean_error(proc)
    assert (existing / "keep.txt").exists()

    debug = _run("merge", tmp_path / "no_such_base", llama_plain, "-o", tmp_path / "o2", "--debug")
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr


def test_cli_adapter(llama_plain: Path, tmp_path: Path) -> None:
    out = tmp_path / "ad"
    proc = _run("adapter", llama_plain, "-o", out, "--dtype", "float16")
    assert proc.returncode == 0, proc.stderr
    got = M.read_file_tensors(out / "adapter_model.safetensors")
    want = M.read_file_tensors(llama_plain / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    assert all(got[k].dtype == torch.float16 and torch.equal(got[k], want[k].half()) for k in want)


def test_console_script_installed() -> None:
    script = Path(sys.executable).with_name("lorasave")
    if not script.exists():
        pytest.fail(f"console script not found at {script} (pip install -e . ?)")
    proc = _run("--help", exe=[str(script)])
    assert proc.returncode == 0, proc.stderr
    assert "merge" in proc.stdout and "adapter" in proc.stdout
