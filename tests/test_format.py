"""The safetensors format layer: golden bytes against safetensors itself, header validation, index safety, HF cache ids."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from lorasave.errors import CheckpointFormatError, LorasaveError, SourceNotFoundError, UnsafePathError
from lorasave.formats.safetensors import SafetensorsShardWriter
from lorasave.formats.safetensors.header import layout, read_header, serialize_header
from lorasave.sources.checkpoint import TensorReader, open_checkpoint, resolve_source
from lorasave.util.dtypes import st_dtype
from lorasave.util.sizes import parse_size

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


def _random_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    n = int(torch.randint(1, 12, (1,), generator=g))
    for i in range(n):
        dt = DTYPES[int(torch.randint(0, len(DTYPES), (1,), generator=g))]
        ndim = int(torch.randint(0, 4, (1,), generator=g))
        shape = [int(d) for d in torch.randint(0, 5, (ndim,), generator=g)]
        name = f"{'abcxyz'[i % 6]}.layer{int(torch.randint(0, 20, (1,), generator=g))}.w{i}"
        out[name] = (torch.randn(shape, generator=g) * 3).to(dt)
    return out


def _write_with_lorasave(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    lay = layout((k, st_dtype(t.dtype), tuple(t.shape)) for k, t in tensors.items())
    w = SafetensorsShardWriter(path, serialize_header(lay, metadata), lay)
    w.begin()
    for e in lay:
        t = tensors[e.name].contiguous()
        data = memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")
        half = len(data) // 2  # two writes per tensor: the writer must accept slices
        w.write(e.name, data[:half])
        w.write(e.name, data[half:])
    w.end()


@pytest.mark.parametrize("seed", range(25))
def test_writer_bytes_equal_safetensors(tmp_path: Path, seed: int) -> None:
    tensors = _random_state(seed)
    ours = tmp_path / "ours.safetensors"
    _write_with_lorasave(ours, tensors, {"format": "pt"})
    theirs = tmp_path / "theirs.safetensors"
    save_file(tensors, theirs, metadata={"format": "pt"})
    assert ours.read_bytes() == theirs.read_bytes()


def test_writer_without_metadata_and_unicode_names(tmp_path: Path) -> None:
    tensors = {"é.weight": torch.ones(3), 'q"uote': torch.zeros(2, dtype=torch.int8), "a\\b": torch.ones(1, dtype=torch.float16)}
    ours = tmp_path / "ours.safetensors"
    _write_with_lorasave(ours, tensors, None)
    assert ours.read_bytes() == save(tensors)


def test_reader_reads_row_slices(tmp_path: Path) -> None:
    t = torch.randn(7, 5).to(torch.bfloat16)
    save_file({"t": t, "s": torch.tensor(3.0)}, tmp_path / "x.safetensors")
    h = read_header(tmp_path / "x.safetensors")
    with TensorReader() as r:
        assert torch.equal(r.read(h.tensors["t"], 2, 6), t[2:6])
        assert torch.equal(r.read(h.tensors["t"]), t)
        assert r.read(h.tensors["s"]).item() == 3.0


def _corrupt(tmp_path: Path, mutate) -> Path:  # type: ignore[no-untyped-def]
    raw = save({"a": torch.ones(4), "b": torch.zeros(2, 2)}, metadata={"format": "pt"})
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    header, data, hlen = mutate(header, data)
    hb = json.dumps(header).encode()
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", hlen if hlen is not None else len(hb)) + hb + data)
    return p


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda h, d: (h, d[:-3], None), "truncated"),
        (lambda h, d: (h, d, 10**12), "exceeds"),
        (lambda h, d: (h, d, 10**6), "larger than the file"),
        (lambda h, d: ({**h, "b": {**h["b"], "data_offsets": [0, 16]}}, d, None), "overlaps"),
        (lambda h, d: ({**h, "a": {**h["a"], "dtype": "F16"}}, d, None), "need"),
        (lambda h, d: ({**h, "a": {**h["a"], "dtype": "Q9"}}, d, None), "unknown dtype"),
        (lambda h, d: ({**h, "a": {**h["a"], "data_offsets": [0, 10**9]}}, d, None), "truncated"),
        (lambda h, d: ({**h, "a": {**h["a"], "shape": [-1]}}, d, None), "invalid shape"),
        (lambda h, d: (h, d + b"xx", None), "cover"),
    ],
)
def test_malformed_safetensors_named(tmp_path: Path, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    p = _corrupt(tmp_path, mutate)
    with pytest.raises(CheckpointFormatError) as e:
        read_header(p)
    assert message in str(e.value)
    assert str(p) in str(e.value)


def test_not_json_header(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}")
    with pytest.raises(CheckpointFormatError, match="not UTF-8 JSON"):
        read_header(p)


def _sharded_base(tmp_path: Path, weight_map: dict[str, str]) -> Path:
    root = tmp_path / "base"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"a": torch.ones(2)}, root / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


@pytest.mark.parametrize("bad", ["../model-00001-of-00001.safetensors", "/etc/passwd", "sub/x.safetensors", ".."])
def test_index_paths_outside_folder_refused(tmp_path: Path, bad: str) -> None:
    root = _sharded_base(tmp_path, {"a": bad})
    with pytest.raises(UnsafePathError, match="not a plain file name"):
        open_checkpoint(root)


def test_index_missing_shard_and_missing_tensor(tmp_path: Path) -> None:
    root = _sharded_base(tmp_path, {"a": "model-00002-of-00002.safetensors"})
    with pytest.raises(CheckpointFormatError, match="missing"):
        open_checkpoint(root)
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"zz": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(CheckpointFormatError, match="does not contain"):
        open_checkpoint(root)


def test_index_symlinked_shard_followed(tmp_path: Path) -> None:
    """Plain names that are symlinks into the same Hugging Face cache repo's blobs/ are followed
    (a link anywhere else is refused: tests/test_trust_paths.py)."""
    (tmp_path / "models--org--tiny" / "snapshots").mkdir(parents=True)
    root = _sharded_base(tmp_path / "models--org--tiny" / "snapshots", {"a": "model-00001-of-00001.safetensors"})  # snapshots/base
    blobs = tmp_path / "models--org--tiny" / "blobs"
    blobs.mkdir()
    (root / "model-00001-of-00001.safetensors").rename(blobs / "sha")
    (root / "model-00001-of-00001.safetensors").symlink_to(Path("..") / ".." / "blobs" / "sha")
    ck = open_checkpoint(root)
    assert list(ck.tensors) == ["a"]


def test_hub_id_resolved_from_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hub id is found in the local HF cache layout without any network call."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (snap / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"a": torch.ones(2)}, snap / "model.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    folder, hub_id = resolve_source("org/tiny", "base")
    assert hub_id == "org/tiny"
    assert folder.resolve() == snap.resolve()
    with pytest.raises(SourceNotFoundError, match="not a Hub id in the local Hugging Face cache"):
        resolve_source("org/absent", "base")


@pytest.mark.parametrize(
    ("text", "value"), [("5GB", 5 * 10**9), ("200KB", 200_000), ("4.5GB", 4_500_000_000), ("5Gb", 5 * 10**9), (1234, 1234), ("2MiB", 2 * 2**20)]
)
def test_parse_size(text: str | int, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["five", "5XB", "-1", "0", ""])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(LorasaveError):
        parse_size(text)
