"""Issue 11, points 8 and 10: hostile JSON, shapes and dtypes get one line (exit 1 or 2), never exit 70, a traceback or a hang.

- JSON nested 100,000 deep or holding a 10,000-digit integer, in a safetensors header, config.json,
  the index, adapter_config.json, tokenizer.json, lorasave.json and the cache: one
  CheckpointFormatError naming the file (the cache: ignored).
- Tensor shapes whose element count overflows int64, or a zero dimension beside a huge one.
- Sub-byte dtypes (F4, F6_*) in a base; a targeted weight stored as an integer, bool or complex
  dtype: refused, never merged into.
- FP8 weights with ``weight_scale``/``weight_scale_inv`` beside them and no quantization_config:
  refused naming the tensor; scale tensors never cast into a 16-bit output.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorasave
from lorasave import errors as E
from lorasave.formats.safetensors.header import read_header
from lorasave.sources import cache
from lorasave.verify.run import verify

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BASE_SRC = EXAMPLES / "tiny-llama"
ADAPTER_SRC = EXAMPLES / "tiny-llama-lora"
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"

DEEP = "[" * 100_000 + "]" * 100_000
BIG_INT = "7" * 10_000


@pytest.fixture
def src(tmp_path: Path) -> tuple[Path, Path, Path]:
    base = Path(shutil.copytree(BASE_SRC, tmp_path / "base"))
    adapter = Path(shutil.copytree(ADAPTER_SRC, tmp_path / "adapter"))
    return base, adapter, tmp_path / "out"


def st_split(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def st_join(path: Path, text: str, data: bytes) -> None:
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def with_member(text: str, member: str) -> str:
    """A JSON object's text with one more member, ``"hostile": <member>``, spliced in as raw text."""
    text = text.rstrip()
    assert text.endswith("}")
    return text[:-1] + f', "hostile": {member}}}'


def add_empty_tensor(path: Path, dtype: str, shape: list[int]) -> None:
    """Give a safetensors file one more zero-byte tensor with the given header shape."""
    header, data = st_split(path)
    header["zz.hostile"] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data)]}
    st_join(path, json.dumps(header), data)


def cli(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", LORASAVE_CACHE="off")
    return subprocess.run([sys.executable, "-m", "lorasave", *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


def one_line(proc: subprocess.CompletedProcess[str], *needles: str | Path) -> str:
    assert proc.returncode in (1, 2), (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def refused(call: Callable[[], object], exc: type[E.LorasaveError], *needles: str | Path) -> str:
    with pytest.raises(Exception) as info:
        call()
    err = info.value
    assert isinstance(err, exc), f"expected {exc.__name__}, got {type(err).__name__}: {str(err)[:300]}"
    msg = str(err)
    assert msg and "\n" not in msg and len(msg) < 600, msg[:600]
    for n in needles:
        assert str(n) in msg, (n, msg)
    return msg


# ------------------------------------------------------------------ JSON bombs


def _config(base: Path, adapter: Path, member: str) -> Path:
    p = base / "config.json"
    p.write_text(with_member(p.read_text(), member))
    return p


def _index(base: Path, adapter: Path, member: str) -> Path:
    header, _ = st_split(base / "model.safetensors")
    wm = {k: "model.safetensors" for k in header if k != "__metadata__"}
    p = base / "model.safetensors.index.json"
    p.write_text(with_member(json.dumps({"metadata": {}, "weight_map": wm}), member))
    return p


def _adapter_config(base: Path, adapter: Path, member: str) -> Path:
    p = adapter / "adapter_config.json"
    p.write_text(with_member(p.read_text(), member))
    return p


def _st_header(base: Path, adapter: Path, member: str) -> Path:
    p = base / "model.safetensors"
    header, data = st_split(p)
    st_join(p, with_member(json.dumps(header), member), data)
    return p


def _adapter_st_header(base: Path, adapter: Path, member: str) -> Path:
    p = adapter / "adapter_model.safetensors"
    header, data = st_split(p)
    st_join(p, with_member(json.dumps(header), member), data)
    return p


JSON_PLACES = {"config": _config, "index": _index, "adapter-config": _adapter_config, "st-header": _st_header, "adapter-st-header": _adapter_st_header}
BOMBS = {"deep": (DEEP, "nested deeper than 100 levels"), "bigint": (BIG_INT, "an integer with more than")}


@pytest.mark.parametrize("bomb", BOMBS)
@pytest.mark.parametrize("place", JSON_PLACES)
def test_json_bomb_merge_one_error(src: tuple[Path, Path, Path], place: str, bomb: str) -> None:
    """before: RecursionError / ValueError escaped (CLI exit 70 'internal error') / after: CheckpointFormatError naming the file."""
    base, adapter, out = src
    member, reason = BOMBS[bomb]
    path = JSON_PLACES[place](base, adapter, member)
    refused(lambda: lorasave.merge(base, adapter, out), E.CheckpointFormatError, path, reason)
    assert not out.exists()


def test_json_nested_past_bound_but_parseable(src: tuple[Path, Path, Path]) -> None:
    """500 levels parse in Python's json but break any recursive use later: refused at 100.
    before: merged (exit 0) / after: CheckpointFormatError."""
    base, adapter, out = src
    path = _config(base, adapter, "[" * 500 + "]" * 500)
    refused(lambda: lorasave.merge(base, adapter, out), E.CheckpointFormatError, path, "nested deeper than 100 levels")


@pytest.mark.parametrize("bomb", BOMBS)
def test_json_bomb_cli(src: tuple[Path, Path, Path], bomb: str) -> None:
    """before: exit 70 'internal error (RecursionError...)' / after: one line, exit 1."""
    base, adapter, out = src
    path = _adapter_config(base, adapter, BOMBS[bomb][0])
    one_line(cli("merge", base, adapter, "-o", out), path, BOMBS[bomb][1])


@pytest.mark.parametrize("bomb", BOMBS)
def test_json_bomb_tokenizer_gguf(src: tuple[Path, Path, Path], bomb: str) -> None:
    """tokenizer.json read for a GGUF vocabulary. before: exit 70 RecursionError / after: one line naming tokenizer.json."""
    pytest.importorskip("gguf")
    base, adapter, out = src
    tok = base / "tokenizer.json"
    tok.write_text(with_member(tok.read_text(), BOMBS[bomb][0]))
    one_line(cli("gguf", base, adapter, "-o", out), tok, BOMBS[bomb][1])


@pytest.mark.parametrize("bomb", BOMBS)
def test_json_bomb_verify_manifest(tmp_path: Path, bomb: str) -> None:
    """before: RecursionError / ValueError escaped from verify / after: CheckpointFormatError naming lorasave.json."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "lorasave.json").write_text('{"files": {}, "x": ' + BOMBS[bomb][0] + "}")
    refused(lambda: verify(out), E.CheckpointFormatError, out / "lorasave.json", "run the merge again")


def test_json_bomb_cache_file_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache file nested 100,000 deep is a cache miss. before: RecursionError escaped cache.get / after: None."""
    monkeypatch.setenv("LORASAVE_CACHE", str(tmp_path / "cache"))
    cache.put("arch", {"ok": 1}, "key")
    (path,) = (tmp_path / "cache" / "arch").glob("*.json")
    path.write_text('{"x": ' + DEEP + "}")
    assert cache.get("arch", "key") is None


def test_json_bomb_cache_merge_still_works(src: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every cache file replaced by a bomb: the merge recomputes. before: exit 70 RecursionError / after: merged."""
    base, adapter, out = src
    monkeypatch.setenv("LORASAVE_CACHE", str(tmp_path / "cache"))
    lorasave.merge(base, adapter, tmp_path / "first")
    files = list((tmp_path / "cache").rglob("*.json"))
    assert files
    for f in files:
        f.write_text(DEEP)
    assert lorasave.merge(base, adapter, out).n_merged == 14


# ------------------------------------------------------------------ shapes


SHAPES = {
    "2**63-by-0": ([2**63, 0], "past the int64 limit"),
    "0-by-2**62": ([0, 2**62], "zero dimension"),
    "2**40-2**40-0": ([2**40, 2**40, 0], "overflows int64"),
    "2**62-by-4-by-0": ([2**62, 4, 0], "overflows int64"),
}


@pytest.mark.parametrize("case", SHAPES)
def test_hostile_shape_read_header(src: tuple[Path, Path, Path], case: str) -> None:
    """before: accepted (then a hang, exit 70 'numel: integer multiplication overflow', or merged) / after: CheckpointFormatError."""
    base, _, _ = src
    shape, reason = SHAPES[case]
    add_empty_tensor(base / "model.safetensors", "BF16", [0, 64])  # a genuine empty tensor stays valid
    assert read_header(base / "model.safetensors").tensors["zz.hostile"].shape == (0, 64)
    add_empty_tensor(base / "model.safetensors", "BF16", shape)
    refused(lambda: read_header(base / "model.safetensors"), E.CheckpointFormatError, base / "model.safetensors", "zz.hostile", reason)


@pytest.mark.parametrize("case", ["2**63-by-0", "2**40-2**40-0"])
def test_hostile_shape_cli_no_hang(src: tuple[Path, Path, Path], case: str) -> None:
    """before: [2**63, 0] hung the merge, [2**40, 2**40, 0] exit 70 / after: one line, exit 1, in seconds."""
    base, adapter, out = src
    add_empty_tensor(base / "model.safetensors", "BF16", SHAPES[case][0])
    one_line(cli("merge", base, adapter, "-o", out, timeout=60), base / "model.safetensors", "zz.hostile")
    assert not out.exists()


# ------------------------------------------------------------------ dtypes


def _append_tensor(path: Path, name: str, dtype: str, shape: list[int], nbytes: int) -> None:
    header, data = st_split(path)
    header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + nbytes]}
    st_join(path, json.dumps(header), data + b"\0" * nbytes)


@pytest.mark.parametrize(("dtype", "nbytes"), [("F4", 32), ("F6_E2M3", 48), ("F6_E3M2", 48)])
def test_sub_byte_base_refused(src: tuple[Path, Path, Path], dtype: str, nbytes: int) -> None:
    """before: F4 'got more than its 32 bytes', F6 exit 70 AssertionError / after: UnsupportedDtypeError naming the tensor."""
    base, adapter, out = src
    _append_tensor(base / "model.safetensors", "model.extra.weight", dtype, [64], nbytes)
    refused(lambda: lorasave.merge(base, adapter, out), E.UnsupportedDtypeError, "model.extra.weight", dtype, base / "model.safetensors")
    assert not out.exists()


def _retype(base: Path, name: str, dtype: torch.dtype) -> None:
    t = load_file(base / "model.safetensors")
    w = t[name].float()
    t[name] = (w > 0) if dtype is torch.bool else (w * 100).to(dtype)
    save_file(t, base / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.uint8, torch.int64, torch.bool, torch.complex64, torch.float8_e4m3fn])
def test_targeted_non_float_weight_refused(src: tuple[Path, Path, Path], dtype: torch.dtype) -> None:
    """before: merged into the integer/bool/complex/FP8 values, exit 0 / after: UnsupportedDtypeError naming the tensor, nothing written."""
    base, adapter, out = src
    _retype(base, Q_PROJ, dtype)
    refused(lambda: lorasave.merge(base, adapter, out), E.UnsupportedDtypeError, Q_PROJ, "will not merge into it")
    assert not out.exists()


def test_targeted_int_weight_cli(src: tuple[Path, Path, Path]) -> None:
    """before: exit 0 with the weight merged as int32 / after: one line, exit 1."""
    base, adapter, out = src
    _retype(base, Q_PROJ, torch.int32)
    one_line(cli("merge", base, adapter, "-o", out), Q_PROJ, "I32")
    assert not out.exists()


# ------------------------------------------------------------------ FP8 (point 10)


def _fp8_base(base: Path, dtype: torch.dtype, suffix: str, names: list[str]) -> None:
    t = load_file(base / "model.safetensors")
    for name in names:
        t[name] = t[name].float().to(dtype)
        t[name + suffix] = torch.ones((1,), dtype=torch.float32)
    save_file(t, base / "model.safetensors", metadata={"format": "pt"})


PROJ = [f"model.layers.{i}.{m}.weight" for i in range(2) for m in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj")]


@pytest.mark.parametrize(
    ("dtype", "suffix", "targeted"),
    [
        (torch.float8_e4m3fn, "_scale_inv", True),
        (torch.float8_e5m2, "_scale", True),
        (torch.float8_e4m3fn, "_scale", False),
    ],
)
def test_fp8_with_scales_refused(src: tuple[Path, Path, Path], dtype: torch.dtype, suffix: str, targeted: bool) -> None:
    """before: exit 0, LoRA merged into raw FP8 values, the F32 scales cast to bfloat16 / after: Fp8WeightsError naming the tensor."""
    base, adapter, out = src
    names = PROJ if targeted else ["model.layers.0.self_attn.q_proj.weight"]
    if not targeted:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        cfg["target_modules"] = ["v_proj"]
        (adapter / "adapter_config.json").write_text(json.dumps(cfg))
        t = load_file(adapter / "adapter_model.safetensors")
        save_file({k: v for k, v in t.items() if "v_proj" in k}, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    _fp8_base(base, dtype, suffix, names)
    first = min(names, key=lambda n: n + suffix)  # the checkpoint's own (file) order
    msg = refused(lambda: lorasave.merge(base, adapter, out), E.Fp8WeightsError, first, first + suffix, "quantization_config", "FP8")
    assert isinstance(E.Fp8WeightsError("x", tensor="t", dtype="F8_E4M3"), E.UnsupportedDtypeError)
    assert not out.exists(), msg


def test_fp8_with_scales_cli_one_line(src: tuple[Path, Path, Path]) -> None:
    """before: exit 0 (merged into FP8) / after: one line, exit 1, naming the tensor."""
    base, adapter, out = src
    _fp8_base(base, torch.float8_e4m3fn, "_scale_inv", PROJ)
    one_line(cli("merge", base, adapter, "-o", out), "weight_scale_inv", "F8_E4M3")
    assert not out.exists()


def test_fp8_with_scales_gguf_refused(src: tuple[Path, Path, Path]) -> None:
    """The GGUF path plans the same way. before: a GGUF written from raw FP8 values / after: one line, exit 1."""
    pytest.importorskip("gguf")
    base, adapter, out = src
    _fp8_base(base, torch.float8_e5m2, "_scale", PROJ)
    one_line(cli("gguf", base, adapter, "-o", out), "weight_scale", "F8_E5M2")


def test_scale_tensors_never_cast_to_16_bit(src: tuple[Path, Path, Path]) -> None:
    """A float32 scale kept in a bfloat16 output stays float32 (and an untouched integer tensor is copied as it is).
    before: cast to BF16 / after: F32."""
    base, adapter, out = src
    t = load_file(base / "model.safetensors")
    t["model.layers.0.self_attn.o_proj.weight_scale"] = torch.tensor([1.000001], dtype=torch.float32)
    t["model.extra_ids"] = torch.arange(10, dtype=torch.int64)
    save_file(t, base / "model.safetensors", metadata={"format": "pt"})
    lorasave.merge(base, adapter, out)
    assert torch.equal(load_file(out / "model.safetensors")["model.extra_ids"], torch.arange(10, dtype=torch.int64))
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.0.self_attn.o_proj.weight_scale").get_dtype() == "F32"
        assert f.get_slice(Q_PROJ).get_dtype() == "BF16"
