"""lorasave's 4-bit encoder against bitsandbytes' own CPU ``quantize_4bit``, bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorasave.errors import InvalidOptionError
from lorasave.formats.bnb import Bnb4bitSpec, preload_bnb
from lorasave.formats.bnb_encode import BLOCKSIZES, CHUNK, code_4bit, dynamic_map, quantize_4bit, serialize_4bit

bnb = preload_bnb()
pytestmark = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed")
QUANT_TYPES = ("nf4", "fp4")
REPO = Path(__file__).resolve().parents[1]
EXAMPLE_BASE, EXAMPLE_LORA = REPO / "examples" / "tiny-llama", REPO / "examples" / "tiny-llama-lora"


def reference(a: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' kernel (the CPU dispatch of ``bitsandbytes::quantize_4bit``)."""
    return torch.ops.bitsandbytes.quantize_4bit.default(a, blocksize, quant_type, torch.uint8)


def assert_same(a: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    ref_packed, ref_absmax = reference(a, blocksize, quant_type)
    packed, absmax = quantize_4bit(a, blocksize, quant_type)
    assert packed.dtype == torch.uint8 and packed.shape == ref_packed.shape
    assert torch.equal(packed, ref_packed), f"codes differ at {(packed != ref_packed).nonzero()[:5].tolist()}"
    assert absmax.dtype == torch.float32 and absmax.shape == ref_absmax.shape
    assert torch.equal(absmax.view(torch.int32), ref_absmax.view(torch.int32))  # bits, -0.0 and NaN included
    return packed, absmax


def codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Unpacked codes ``(n,)``: the even element in the high nibble."""
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 15], dim=1).reshape(-1)[:n]


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_random_every_blocksize(blocksize: int, quant_type: str) -> None:
    g = torch.Generator().manual_seed(blocksize)
    for shape in ((96, 130), (3 * blocksize + 17,), (1, 5)):  # whole blocks and a shorter last one, odd counts
        w = torch.randn(shape, generator=g) * 0.02
        assert_same(w, blocksize, quant_type)
        assert_same(w.to(torch.bfloat16), blocksize, quant_type)
        assert_same(w.to(torch.float16), blocksize, quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_odd_sizes_and_chunks(quant_type: str) -> None:
    g = torch.Generator().manual_seed(1)
    for n in (1, 2, 3, 63, 64, 65, 127, CHUNK - 1, CHUNK + 1, 2 * CHUNK + 4097):
        w = torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 4  # wide range of block scales
        assert_same(w, 64, quant_type)
    assert_same(torch.randn(CHUNK + 4097, generator=g), 4096, quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_ties_on_midpoints(quant_type: str) -> None:
    """Scaled values exactly on a midpoint between two codes (and one ulp either side)."""
    code = bnb.functional.get_4bit_type(quant_type, device="cpu")
    s, _ = torch.sort(code)
    mid = (s[:-1] + s[1:]) / 2
    vals = torch.cat([mid, torch.nextafter(mid, torch.full_like(mid, 2.0)), torch.nextafter(mid, torch.full_like(mid, -2.0)), s])
    for scale in (1.0, 2.0, 0.25):  # powers of two: x * (1 / absmax) is exact
        block = torch.cat([vals, torch.tensor([1.0])]) * scale  # absmax = scale
        block = torch.cat([block, torch.zeros(64 - block.numel() % 64)])
        packed, _ = assert_same(block, 64, quant_type)
        got = codes(packed, mid.numel())
        lower = torch.bucketize(mid, mid)  # a midpoint goes to the lower of its two codes
        order = torch.argsort(code)
        assert torch.equal(got.long(), order[lower])
        assert_same(block[: 64 + 5], 64, quant_type)  # ties in the shorter last block (divided, not multiplied)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_zeros_and_tiny(quant_type: str) -> None:
    assert_same(torch.zeros(64 * 3 + 7), 64, quant_type)  # absmax 0 stored as 0, the last block's as 1e-38
    assert_same(-torch.zeros(130), 64, quant_type)
    w = torch.randn(256)
    w[64:128] = 0.0
    w[128:192] = torch.randn(64) * 1e-39  # subnormal blocks: absmax below the 1e-38 clamp
    w[200:] = 0.0
    assert_same(w, 64, quant_type)
    assert_same(w[:250], 64, quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_nan_and_inf(quant_type: str) -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64 * 4 + 9, generator=g)
    w[3] = float("nan")
    w[70] = float("inf")
    w[140] = float("-inf")
    w[200], w[201] = float("inf"), float("-inf")
    w[64 * 4 + 2] = float("nan")  # in the shorter last block
    packed, absmax = assert_same(w, 64, quant_type)
    last = int(torch.argsort(bnb.functional.get_4bit_type(quant_type, device="cpu"))[15])  # bucketize sends NaN to the end
    got = codes(packed, w.numel())
    assert absmax[0].isnan() and absmax[1].isinf()
    assert int(got[3]) == last and int(got[70]) == last and int(got[140]) == last  # Inf * (1 / Inf) is NaN
    tail = torch.randn(64 + 3, generator=g)
    tail[66] = float("inf")
    assert_same(tail, 64, quant_type)
    tail[66] = float("-inf")
    assert_same(tail, 64, quant_type)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_serialized_matches_bitsandbytes(quant_type: str, double_quant: bool) -> None:
    """Every tensor ``merged_4bit`` writes for a weight equals bitsandbytes' ``quantize_4bit`` + ``as_dict``."""
    w = torch.randn(300, 72, generator=torch.Generator().manual_seed(3)) * 0.05
    spec = Bnb4bitSpec(quant_type=quant_type, blocksize=64, double_quant=double_quant)
    ours = spec.serialized("m.weight", w, torch.bfloat16)
    packed, qs = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    qs.dtype = torch.bfloat16
    ref = {"m.weight": packed, **{f"m.weight.{k}": v for k, v in qs.as_dict(packed=True).items()}}
    assert ours.keys() == ref.keys()
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), k


def test_format_constants_are_bitsandbytes() -> None:
    """The codebooks written without importing bitsandbytes are its own, bit for bit."""
    F = bnb.functional
    for qt in QUANT_TYPES:
        ref = F.get_4bit_type(qt, device="cpu")
        assert torch.equal(torch.from_numpy(code_4bit(qt).copy()).view(torch.int32), ref.view(torch.int32)), qt
    assert torch.equal(torch.from_numpy(dynamic_map().copy()).view(torch.int32), F.create_dynamic_map(signed=True).view(torch.int32))


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_serialize_every_blocksize_dtype_and_odd_shape(quant_type: str) -> None:
    """``serialize_4bit`` (the write path: no bitsandbytes import, its C kernel for the double quant)
    equals ``quantize_4bit`` + ``as_dict(packed=True)``: every tensor and the JSON bytes."""
    g = torch.Generator().manual_seed(4)
    F = bnb.functional
    for blocksize in BLOCKSIZES:
        for shape in ((40, 72), (3 * 256 * blocksize // 64 + 5,)):  # the nested absmax: a shorter last block of 256
            w = torch.randn(shape, generator=g) * torch.rand(shape, generator=g) ** 3
            w[0] = 0.0
            for dt, qs_dtype in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16), (torch.float16, torch.float32)):
                for double_quant in (True, False):
                    a = w.to(dt)
                    ours = serialize_4bit(a, blocksize, quant_type, double_quant, qs_dtype)
                    packed, qs = F.quantize_4bit(a, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
                    qs.dtype = qs_dtype
                    ref = {"": packed, **qs.as_dict(packed=True)}
                    assert list(ours) == list(ref)
                    for k in ref:
                        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape, (blocksize, k)
                        assert torch.equal(ours[k].view(torch.uint8), ref[k].view(torch.uint8)), (blocksize, dt, double_quant, k)


def test_quantization_config_is_transformers() -> None:
    """The ``quantization_config`` written without importing transformers is its ``BitsAndBytesConfig.to_dict()``."""
    from transformers import BitsAndBytesConfig

    for qt, dq, dt in (("nf4", True, torch.bfloat16), ("fp4", False, torch.float16), ("nf4", False, torch.float32)):
        ref = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qt, bnb_4bit_use_double_quant=dq, bnb_4bit_compute_dtype=dt).to_dict()
        assert Bnb4bitSpec(quant_type=qt, double_quant=dq).quantization_config(dt) == ref


def test_rejects_what_bitsandbytes_rejects() -> None:
    with pytest.raises(InvalidOptionError, match="block size"):
        quantize_4bit(torch.zeros(64), 16, "nf4")
    with pytest.raises(InvalidOptionError, match="quant type"):
        quantize_4bit(torch.zeros(64), 64, "int4")


def test_writing_4bit_imports_neither_bitsandbytes_nor_transformers(tmp_path: Path) -> None:
    """``merged_4bit`` writes without importing bitsandbytes (whose CPU backend compiles at import) or transformers.

    Run twice with one cache: the first run of a model reads its architecture through transformers
    (``sources.cache``); the second, what this checks, does not.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "LORASAVE_CACHE": str(tmp_path / "cache")}
    for run in ("o1", "o2"):
        code = (
            "import sys, lorasave\n"
            f"lorasave.merge({str(EXAMPLE_BASE)!r}, {str(EXAMPLE_LORA)!r}, {str(tmp_path / run)!r}, save_method='merged_4bit')\n"
            "print(sorted(m for m in ('bitsandbytes', 'transformers', 'torch._dynamo') if m in sys.modules))\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
    written = load_file(tmp_path / "o2" / "model.safetensors")
    assert any(k.endswith(".quant_state.bitsandbytes__nf4") for k in written)
