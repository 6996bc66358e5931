"""Fuzzing the readers of untrusted files: only ``LorasaveError`` subclasses may come out.

Covers the safetensors header reader (random bytes, mutated headers, mutated valid files), the
index reader (``open_checkpoint`` with a random or mutated ``model.safetensors.index.json``), the
adapter config reader (``load_adapter`` with random JSON values for r, lora_alpha, target_modules,
rank_pattern, alpha_pattern, peft_type) and the GGUF reader (``inspect_path`` on mutated small GGUF
files). Runs are deterministic (``derandomize``) and bounded; set ``LORASAVE_FUZZ_EXAMPLES`` to
fuzz longer, ``LORASAVE_FUZZ_RANDOM=1`` for fresh random examples on each run.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorasave.errors import LorasaveError
from lorasave.formats.safetensors.header import read_header
from lorasave.sources.adapter import load_adapter
from lorasave.sources.checkpoint import open_checkpoint
from lorasave.verify.inspect import inspect_path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BASE_SRC = EXAMPLES / "tiny-llama"
ADAPTER_SRC = EXAMPLES / "tiny-llama-lora"

FUZZ = settings(
    max_examples=int(os.environ.get("LORASAVE_FUZZ_EXAMPLES", "150")),
    deadline=None,
    derandomize=not os.environ.get("LORASAVE_FUZZ_RANDOM"),
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def only_lorasave_errors(fn: Callable[[], object]) -> None:
    """Run ``fn``; success or a LorasaveError with a one-line message is fine, anything else fails."""
    try:
        fn()
    except LorasaveError as e:
        msg = str(e)
        assert msg and "\n" not in msg, f"{type(e).__name__} message is not one line: {msg!r}"
    except Exception as e:  # pragma: no cover - what the fuzzer is looking for
        raise AssertionError(f"{type(e).__name__} escaped: {e}") from e


# --------------------------------------------------------------------- strategies

NASTY_NUMBERS = st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64 + 1, 10**400, -(10**400), 0.5, -0.0, 1e308, float("inf"), float("-inf"), float("nan")])
SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12) | NASTY_NUMBERS
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)


def pack_header(obj: Any) -> bytes:
    text = json.dumps(obj).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def st_split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


@st.composite
def mutated_bytes(draw: st.DrawFn, raw: bytes) -> bytes:
    """Flip, overwrite, cut or insert bytes of ``raw`` (positions biased to the start, where headers live)."""
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "int", "cut", "insert", "truncate"]))
        limit = len(data) if draw(st.booleans()) else min(len(data), 512)
        if not data:
            break
        i = draw(st.integers(0, max(0, limit - 1)))
        if kind == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[i : i + len(chunk)] = chunk
        elif kind == "int":  # a length, count or offset field made absurd
            value = draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1))
            data[i : i + 8] = struct.pack("<Q", value)
            del data[i : i + draw(st.integers(1, 16))]
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[i:]
    return bytes(data)


# --------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def adapter_bytes() -> bytes:
    return (ADAPTER_SRC / "adapter_model.safetensors").read_bytes()


# --------------------------------------------------------------------- safetensors header


@FUZZ
@given(raw=st.binary(max_size=300))
def test_read_header_random_bytes(work: Path, raw: bytes) -> None:
    p = work / "random.safetensors"
    p.write_bytes(raw)
    only_lorasave_errors(lambda: read_header(p))


@FUZZ
@given(header=JSON, data=st.binary(max_size=64))
def test_read_header_random_json(work: Path, header: Any, data: bytes) -> None:
    p = work / "json.safetensors"
    p.write_bytes(pack_header(header) + data)
    only_lorasave_errors(lambda: read_header(p))


@FUZZ
@given(data=st.data())
def test_read_header_mutated_entries(work: Path, adapter_bytes: bytes, data: st.DataObject) -> None:
    """A valid header with one or more fields of its entries replaced by random JSON values."""
    header, buf = st_split(adapter_bytes)
    names = sorted(header)
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(names))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "__whole__"]))
        value = data.draw(JSON | st.sampled_from(["F32", "BF16", "F8_E4M3", "I64", "BOOL", "F4"]) | st.lists(st.integers(-5, 2**40), max_size=3))
        if field == "__whole__" or not isinstance(header[name], dict):
            header[name] = value
        else:
            header[name][field] = value
    p = work / "entries.safetensors"
    p.write_bytes(pack_header(header) + buf)
    only_lorasave_errors(lambda: read_header(p))


@FUZZ
@given(data=st.data())
def test_read_header_mutated_file(work: Path, adapter_bytes: bytes, data: st.DataObject) -> None:
    p = work / "mutated.safetensors"
    p.write_bytes(data.draw(mutated_bytes(adapter_bytes)))
    only_lorasave_errors(lambda: read_header(p))


HUGE_DIMS = st.lists(st.sampled_from([0, 1, 7, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64, 10**30]) | st.integers(0, 2**70), max_size=5)
ALL_DTYPES = st.sampled_from(["BOOL", "F4", "F6_E2M3", "F8_E4M3", "U8", "I16", "BF16", "F32", "C64", "F64", "I64"])


@FUZZ
@given(shape=HUGE_DIMS, dtype=ALL_DTYPES, nbytes=st.sampled_from([0, 1, 2, 8, 64]))
def test_read_header_huge_shapes(work: Path, shape: list[int], dtype: str, nbytes: int) -> None:
    """Shapes with huge and zero dimensions: refused, or an element count torch can index (no overflow, no hang)."""
    p = work / "shapes.safetensors"
    p.write_bytes(pack_header({"t": {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}) + b"\0" * nbytes)
    try:
        header = read_header(p)
    except LorasaveError as e:
        assert "\n" not in str(e)
        return
    count = 1
    for d in header.tensors["t"].shape:
        count *= max(d, 1)
    assert count <= 2**63 - 1


def _nested(draw: st.DrawFn, depth: int) -> str:
    opens = draw(st.lists(st.sampled_from(["[", '{"k":']), min_size=depth, max_size=depth))
    return "".join(opens) + "0" + "".join("]" if o == "[" else "}" for o in reversed(opens))


@FUZZ
@given(data=st.data())
def test_deep_json_documents(sharded_base: Path, adapter_dir: Path, data: st.DataObject) -> None:
    """Config, index and adapter config nested 1 to 5,000 deep, or with long integers: only LorasaveErrors."""
    depth = data.draw(st.integers(1, 5000))
    member = _nested(data.draw, depth) if data.draw(st.booleans()) else "9" * data.draw(st.integers(1, 6000))
    target = data.draw(st.sampled_from(["config.json", "model.safetensors.index.json", "adapter_config.json"]))
    folder = adapter_dir if target == "adapter_config.json" else sharded_base
    source = (ADAPTER_SRC if target == "adapter_config.json" else BASE_SRC) / target
    original = source.read_text() if source.is_file() else json.dumps({"weight_map": _weight_map(sharded_base)})
    (folder / target).write_text(original.rstrip()[:-1] + f', "x": {member}}}')
    try:
        only_lorasave_errors(lambda: open_checkpoint(sharded_base) if folder is sharded_base else load_adapter(adapter_dir))
    finally:
        if source.is_file():
            shutil.copy(source, folder / target)
        else:
            (folder / target).unlink()


# --------------------------------------------------------------------- index


@pytest.fixture(scope="module")
def sharded_base(work: Path) -> Path:
    base = work / "base"
    shutil.copytree(BASE_SRC, base)
    return base


def _weight_map(base: Path) -> dict[str, str]:
    return {k: "model.safetensors" for k in read_header(base / "model.safetensors").tensors}


FILE_NAMES = st.sampled_from(["model.safetensors", "config.json", "..", ".", "/etc/passwd", "sub/x", "", "missing.safetensors", "a\x00b", "x" * 300, "\\x"])


@FUZZ
@given(index=JSON)
def test_open_checkpoint_random_index(sharded_base: Path, index: Any) -> None:
    (sharded_base / "model.safetensors.index.json").write_text(json.dumps(index))
    only_lorasave_errors(lambda: open_checkpoint(sharded_base))


@FUZZ
@given(data=st.data())
def test_open_checkpoint_mutated_index(sharded_base: Path, data: st.DataObject) -> None:
    wm: dict[str, Any] = _weight_map(sharded_base)
    names = sorted(wm)
    for _ in range(data.draw(st.integers(1, 3))):
        what = data.draw(st.sampled_from(["value", "key", "drop"]))
        name = data.draw(st.sampled_from(names))
        if what == "value":
            wm[name] = data.draw(FILE_NAMES | JSON)
        elif what == "key":
            wm[data.draw(st.text(max_size=20))] = data.draw(FILE_NAMES)
        else:
            wm.pop(name, None)
    index = {"metadata": data.draw(JSON), "weight_map": wm}
    text = json.dumps(index)
    if data.draw(st.booleans()):
        text = data.draw(mutated_bytes(text.encode())).decode("utf-8", "surrogateescape")
    (sharded_base / "model.safetensors.index.json").write_text(text, encoding="utf-8", errors="surrogateescape")
    only_lorasave_errors(lambda: open_checkpoint(sharded_base))


# --------------------------------------------------------------------- adapter config


@pytest.fixture(scope="module")
def adapter_dir(work: Path) -> Path:
    ad = work / "adapter"
    shutil.copytree(ADAPTER_SRC, ad)
    return ad


PATTERN_KEYS = st.sampled_from(["q_proj", "layers.0.mlp.down_proj", ".*", "q_proj[", "(", "layers.1.self_attn.v_proj", "*", "a{1000000000}"])
PATTERN_KEYS |= st.text(max_size=10)
PATTERNS = st.dictionaries(PATTERN_KEYS, st.just(8) | st.integers(-2, 16) | SCALARS, max_size=3) | JSON
PEFT_TYPES = st.sampled_from(["LORA", "lora", "LOHA", "LOKR", "IA3", "TRAINABLE_TOKENS", "VERA", "PROMPT_TUNING", "ADALORA", ""]) | JSON


@FUZZ
@given(
    fields=st.fixed_dictionaries(
        {},
        optional={
            "r": st.just(8) | st.integers(-1, 16) | SCALARS,
            "lora_alpha": st.integers(-4, 64) | SCALARS,
            "alpha": SCALARS,
            "target_modules": st.lists(st.sampled_from(["q_proj", "v_proj", "lm_head"]) | st.text(max_size=6), max_size=3) | JSON,
            "rank_pattern": PATTERNS,
            "alpha_pattern": PATTERNS,
            "peft_type": PEFT_TYPES,
            "use_rslora": SCALARS,
            "target_parameters": JSON,
        },
    ),
    drop=st.lists(st.sampled_from(["r", "lora_alpha", "peft_type", "target_modules"]), max_size=2),
)
def test_load_adapter_random_config(adapter_dir: Path, fields: dict[str, Any], drop: list[str]) -> None:
    cfg = json.loads((ADAPTER_SRC / "adapter_config.json").read_text())
    cfg.update(fields)
    for k in drop:
        cfg.pop(k, None)
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg))
    only_lorasave_errors(lambda: load_adapter(adapter_dir))


@FUZZ
@given(cfg=JSON)
def test_load_adapter_random_config_document(adapter_dir: Path, cfg: Any) -> None:
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg))
    only_lorasave_errors(lambda: load_adapter(adapter_dir))


# --------------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def gguf_bytes(work: Path) -> bytes:
    gguf = pytest.importorskip("gguf")
    path = work / "small.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_name("tiny")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.arange(16, dtype=np.float16).reshape(4, 4))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert inspect_path(path).architecture == "llama"
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_inspect_mutated_gguf(work: Path, gguf_bytes: bytes, data: st.DataObject) -> None:
    p = work / "mutated.gguf"
    p.write_bytes(data.draw(mutated_bytes(gguf_bytes)))
    only_lorasave_errors(lambda: inspect_path(p))


@FUZZ
@given(raw=st.binary(max_size=200))
def test_inspect_random_gguf(work: Path, raw: bytes) -> None:
    p = work / "random.gguf"
    p.write_bytes(b"GGUF" + raw if raw[:1] != b"\0" else raw)
    only_lorasave_errors(lambda: inspect_path(p))


def test_gguf_huge_array_length_fails_fast(work: Path, gguf_bytes: bytes) -> None:
    """Regression: gguf-py loops 2**40 times over a corrupted uint8 array length, reading nothing; it must fail at once."""
    key = b"tokenizer.ggml.tokens"
    at = gguf_bytes.index(key) + len(key) + 4  # after the value type (ARRAY): item type u32, then the u64 length
    assert struct.unpack("<IQ", gguf_bytes[at : at + 12]) == (8, 3)  # an array of 3 strings
    p = work / "huge-array.gguf"
    p.write_bytes(gguf_bytes[:at] + struct.pack("<IQ", 0, 2**40) + gguf_bytes[at + 12 :])  # 2**40 uint8
    with pytest.raises(LorasaveError, match=r"not a readable GGUF file.*run past the end of the file"):
        inspect_path(p)
