"""``gguf_encode``: every streamed type's bytes against ``gguf.quants`` (the converter's own encoder).

Inputs: Gaussian weights at several scales, exact ties at ``n + 0.5`` after scaling (and the float32
values either side of them), zeros of both signs, constant blocks, ``+m`` / ``-m`` ties in a block,
denormals (and blocks small enough that Q8_0's ``1 / d`` overflows), values near the float32 and
float16 limits, NaN and Inf (which go through ``gguf.quants`` itself), and shapes with a partial
last chunk. Then the streamed writer: the sha256 it hashes while writing is the file's, and a
write error on its thread reaches the caller.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lorasave.errors import DiskFullError
from lorasave.formats.gguf import encode as gguf_encode
from lorasave.formats.gguf.export import export_gguf
from lorasave.formats.gguf.quant import encode

Q = gguf.GGMLQuantizationType
TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


def _reference(w: np.ndarray, qtype: gguf.GGMLQuantizationType) -> bytes:
    with np.errstate(all="ignore"):
        return gguf.quants.quantize(w, qtype).tobytes()


def _ours(w: np.ndarray, qtype: gguf.GGMLQuantizationType) -> bytes:
    with np.errstate(all="ignore"):
        return gguf_encode.encode_tensor(torch.from_numpy(w), qtype).numpy().tobytes()


def _ties(rng: np.random.Generator) -> np.ndarray:
    """Blocks of 32 whose scaled values (``x / d``, Q8_0) land on ``n + 0.5`` and next to it."""
    rows = []
    for n in range(0, 127):
        for v in (n + 0.5, np.nextafter(np.float32(n + 0.5), np.float32(0)), np.nextafter(np.float32(n + 0.5), np.float32(200))):
            block = rng.standard_normal(32).astype(np.float32) * 10
            block[0] = 127.0  # amax = 127: d = 1, id = 1, so the value is scaled by exactly 1
            block[1:4] = np.clip(block[1:4], -126, 126)
            block[4] = v
            block[5] = -v
            block[6] = np.float32(0.49999997)
            block[7] = -np.float32(0.5)
            rows.append(block)
    return np.stack(rows)  # (381, 32)


def _edges(rng: np.random.Generator) -> np.ndarray:
    """Rows of 64 (two blocks) with the awkward cases."""
    tiny = np.float32(1e-45)  # the smallest denormal
    rows = [
        np.zeros(64, np.float32),
        -np.zeros(64, np.float32),
        np.where(np.arange(64) % 2 == 0, 0.0, -0.0).astype(np.float32),
        np.full(64, 3.0, np.float32),
        np.full(64, -3.0, np.float32),
        np.tile(np.array([2.0, -2.0, 1.0, -1.0], np.float32), 16),  # +m first
        np.tile(np.array([-2.0, 2.0, 1.0, -1.0], np.float32), 16),  # -m first
        rng.standard_normal(64).astype(np.float32) * 1e-40,  # denormals: 1 / d overflows
        rng.standard_normal(64).astype(np.float32) * 1e-37,
        np.full(64, tiny, np.float32),
        rng.uniform(-3.4e38, 3.4e38, 64).astype(np.float32),  # near float32's limit
        rng.standard_normal(64).astype(np.float32) * 7e4,  # beyond float16's limit
        rng.standard_normal(64).astype(np.float32) * 6e-8,  # float16 denormals
        np.concatenate([np.array([-0.0, 0.0, 1.0], np.float32), rng.random(61).astype(np.float32)]),  # min is a signed zero
        np.concatenate([np.array([0.0, -0.0, -1.0], np.float32), -rng.random(61).astype(np.float32)]),  # max is a signed zero
    ]
    bits = rng.integers(0, 2**32, size=(4, 64), dtype=np.uint64).astype(np.uint32).view(np.float32)  # any bit pattern but NaN/Inf
    bits[~np.isfinite(bits)] = 1.0
    rows.extend(bits)
    return np.stack(rows)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_random_matches_gguf_quants(qtype: gguf.GGMLQuantizationType) -> None:
    rng = np.random.default_rng(0)
    # rows of 2048; 8200 blocks: one chunk of 8192 and a partial one
    for scale in (0.02, 1.0, 300.0):
        w = (rng.standard_normal((128, 2050 if qtype in (Q.F32, Q.F16, Q.BF16) else 2048)) * scale).astype(np.float32)
        assert _ours(w, qtype) == _reference(w, qtype)
    w = rng.standard_normal((8200, 32)).astype(np.float32)
    assert _ours(w, qtype) == _reference(w, qtype)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_ties_and_edges_match_gguf_quants(qtype: gguf.GGMLQuantizationType) -> None:
    rng = np.random.default_rng(1)
    for w in (_ties(rng), _edges(rng)):
        assert _ours(w, qtype) == _reference(w, qtype)
        for row in w.reshape(-1, 32):  # block by block too: an edge is not hidden by its chunk's fallback
            assert _ours(row[None], qtype) == _reference(row[None], qtype), row


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_non_finite_goes_through_gguf_quants(qtype: gguf.GGMLQuantizationType) -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 64)).astype(np.float32)
    w[0, 3], w[1, 40], w[2, 0] = np.inf, -np.inf, np.nan
    assert _ours(w, qtype) == _reference(w, qtype)


def test_q8_0_rounding_of_every_float_near_each_half() -> None:
    """``np_roundf`` of the 4096 float32 values either side of every ``n + 0.5`` up to 127.5."""
    centres = np.arange(128, dtype=np.float32) + np.float32(0.5)
    near = centres.view(np.int32)[:, None] + np.arange(-4096, 4096, dtype=np.int32)[None, :]
    vals = near.view(np.float32).reshape(-1)  # (128 * 8192,)
    vals = vals[np.abs(vals) < 127]
    blocks = np.zeros((vals.size // 31 + 1) * 31, np.float32)
    blocks[: vals.size] = vals
    w = np.concatenate([np.full((blocks.size // 31, 1), 127.0, np.float32), blocks.reshape(-1, 31)], axis=1)  # d = 1
    w[::2] *= -1
    assert _ours(w, Q.Q8_0) == _reference(w, Q.Q8_0)


def test_encode_keeps_its_result_types() -> None:
    """``gguf_quant.encode``: F32/F16 as float arrays, the rest as gguf.quants' byte arrays."""
    w = np.random.default_rng(3).standard_normal((3, 64)).astype(np.float32)
    for qtype in TYPES:
        got, want = encode(w, qtype), gguf.quants.quantize(w, qtype)
        assert got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()


# --------------------------------------------------------------------------- the streamed writer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_manifest_hash_is_the_files(tmp_path: Path) -> None:
    """The sha256 hashed while writing (header, metadata, padding, tensors) is the file's."""
    res = export_gguf(EXAMPLES / "tiny-llama", EXAMPLES / "tiny-llama-lora", tmp_path / "g", type="q8_0")
    entry = json.loads((res.output / "lorasave.json").read_text())["files"][res.gguf_file.name]
    data = res.gguf_file.read_bytes()
    assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def test_writer_error_reaches_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write failing on the writer thread is raised by ``export_gguf``, and nothing is left behind."""
    calls = []

    def fail(self: gguf.GGUFWriter, tensor: np.ndarray) -> None:
        calls.append(tensor.nbytes)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        original(self, tensor)

    original = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fail)
    with pytest.raises(DiskFullError, match="is full on the file system") as info:
        export_gguf(EXAMPLES / "tiny-llama", EXAMPLES / "tiny-llama-lora", tmp_path / "g", type="q8_0")
    assert isinstance(info.value, OSError) and "nothing was written" in str(info.value)
    assert len(calls) >= 3 and sorted(p.name for p in tmp_path.iterdir()) == []
