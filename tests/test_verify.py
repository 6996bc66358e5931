"""``lorasave verify``: passes a correct output, names the tensor behind a flipped byte or a wrong scaling."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lorasave
from lorasave.safetensors_format import read_header
from lorasave.verify import verify

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "examples" / "tiny-llama"
LORA = REPO / "examples" / "tiny-llama-lora"
TARGET = "model.layers.1.self_attn.v_proj.weight"


@pytest.fixture
def merged(tmp_path: Path) -> Path:
    return lorasave.merge(BASE, LORA, tmp_path / "out", max_shard_size="100KB").output


def _shard_of(out: Path, name: str) -> Path:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    return out / index["weight_map"][name]


def test_correct_output_verifies(merged: Path) -> None:
    report = verify(merged)
    assert report.ok, report.failures
    assert report.tensors_probed == 14 and report.tensors_exact == 7
    assert 0 < report.max_probe_error <= 1.0


@pytest.mark.parametrize("name", [TARGET, "model.norm.weight"])
def test_flipped_byte_named(merged: Path, name: str) -> None:
    shard = _shard_of(merged, name)
    entry = read_header(shard).tensors[name]
    data = bytearray(shard.read_bytes())
    data[entry.offset + 2 * 5 + 1] ^= 0x7F  # the high byte (sign, exponent) of the 6th bf16 element
    shard.write_bytes(bytes(data))
    files = verify(merged, level="files")
    assert not files.ok and files.failures[0][0] == shard.name
    tensors = verify(merged)
    assert any(n == name for n, _ in tensors.failures), tensors.failures


def test_wrong_scaling_named(merged: Path, tmp_path: Path) -> None:
    """A merge computed with another scaling (here: the adapter's alpha changed) fails the probe, per tensor."""
    wrong = tmp_path / "wrong-lora"
    shutil.copytree(LORA, wrong)
    cfg = json.loads((wrong / "adapter_config.json").read_text())
    cfg["lora_alpha"] = cfg["lora_alpha"] * 1.5
    (wrong / "adapter_config.json").write_text(json.dumps(cfg))
    report = verify(merged, adapters=[wrong])
    failed = {n for n, _ in report.failures}
    assert TARGET in failed and len(failed) == 14
    assert all("rounding bound" in why for _, why in report.failures)


def test_cli_exit_codes(merged: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "lorasave", "verify", str(merged)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("verified")
    (merged / "config.json").write_text("{}")
    bad = subprocess.run([sys.executable, "-m", "lorasave", "verify", str(merged), "--level", "files"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "config.json" in bad.stdout


def test_merge_with_verify_records_it(tmp_path: Path) -> None:
    res = lorasave.merge(BASE, LORA, tmp_path / "v", verify=True)
    assert res.verification and res.verification["ok"]
    assert res.summary().endswith("verified")
    manifest = json.loads((res.output / "lorasave.json").read_text())
    assert manifest["result"]["verification"]["ok"] is True
    assert "passed before the output was written" in (res.output / "README.md").read_text()
    assert verify(res.output).ok  # the card rewrite kept the manifest's sha256 right
