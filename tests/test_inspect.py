"""``lorasave inspect``: readable summaries and tested ``--json`` for each kind of input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lorasave.errors import LorasaveError
from lorasave.verify.inspect import inspect_path

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "examples" / "tiny-llama"
LORA = REPO / "examples" / "tiny-llama-lora"


def test_checkpoint() -> None:
    ins = inspect_path(BASE)
    assert ins.kind == "checkpoint" and ins.architecture == "LlamaForCausalLM"
    assert ins.parameters == 106_816 and set(ins.dtype_bytes) == {"BF16"}
    assert "model.safetensors" in ins.files and ins.can


def test_adapter() -> None:
    ins = inspect_path(LORA)
    assert ins.kind == "adapter"
    assert ins.lora["r"] == 8 and ins.lora["lora_alpha"] == 16 and ins.lora["modules"] == 14


def test_safetensors_file() -> None:
    ins = inspect_path(BASE / "model.safetensors")
    assert ins.kind == "safetensors" and ins.parameters == 106_816


def test_gguf(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ins = inspect_path(path)
    assert ins.kind == "gguf" and ins.architecture == "llama" and ins.parameters == 32
    assert inspect_path(tmp_path).parameters == 32  # a folder holding one .gguf file: that file


def test_gguf_output_folder(tmp_path: Path) -> None:
    from lorasave.formats.gguf.export import export_gguf

    res = export_gguf(Path(__file__).parent.parent / "examples" / "tiny-llama", [], tmp_path / "g", type="q8_0")
    ins = inspect_path(res.output)
    assert ins.kind == "gguf" and ins.architecture == "llama" and set(ins.files) == {res.gguf_file.name, "README.md", "lorasave.json"}
    assert any("a lorasave output (gguf" in n for n in ins.notes)


def test_missing_and_garbage(tmp_path: Path) -> None:
    with pytest.raises(LorasaveError):
        inspect_path(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(LorasaveError):
        inspect_path(tmp_path / "x.txt")


def test_cli_json() -> None:
    proc = subprocess.run([sys.executable, "-m", "lorasave", "inspect", str(LORA), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    data = json.loads(proc.stdout)
    assert data["kind"] == "adapter" and data["lora"]["peft_type"] == "LORA"
    human = subprocess.run([sys.executable, "-m", "lorasave", "inspect", str(BASE)], capture_output=True, text=True, timeout=120)
    assert human.returncode == 0 and "LlamaForCausalLM" in human.stdout and "parameters: 106,816" in human.stdout
