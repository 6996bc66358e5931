"""A fast CPU encoder for bitsandbytes 4-bit (nf4 / fp4), bit-identical to ``quantize_4bit``.

The reference is bitsandbytes 0.50's ``bitsandbytes::quantize_4bit`` kernel on CPU
(``backends/default/ops.py``, the torch implementation the CPU backend uses): per block of
``blocksize`` elements of the flattened float32 input, ``absmax = max |x|`` and
``scaled = clamp(x * (1 / max(absmax, 1e-38)), -1, 1)``; a last, shorter block stores
``max(max |x|, 1e-38)`` and divides by it; ``torch.bucketize`` of ``scaled`` against the 15
midpoints between the sorted codebook entries (a value on a midpoint goes to the lower code;
NaN goes to the last) gives the code, remapped by the codebook's sort order for fp4; codes
are packed two a byte, the even element in the high nibble, an odd count padded with a 0.

Same arithmetic here, in numpy on row chunks that stay in cache, with the bucketing done as a
lookup: the top 16 bits of the float32 ``scaled`` value index a 65,536-entry table built with
bitsandbytes' own midpoints and ``torch.bucketize`` (each entry covers a contiguous interval
of floats, so the code is known whenever both ends of the interval get the same code); the
~1% of values whose interval holds a midpoint, and NaN / Inf patterns, are bucketed exactly
with ``numpy.searchsorted`` (``side="left"`` is ``bucketize(right=False)``; NaN sorts last).
The double quantization of ``absmax`` stays bitsandbytes' own: its C kernel
``cquantize_blockwise_cpu_fp32`` (what ``quantize_blockwise`` runs on CPU), called in the shared
library bitsandbytes ships.

Writing needs no ``import bitsandbytes`` (whose CPU backend wraps its kernels in ``torch.compile``
at import: seconds per run): the codebooks are the format's constants (:data:`NF4`, :data:`FP4`,
:func:`dynamic_map`, each tested equal to bitsandbytes'), the kernel is loaded from the package's
folder with ``ctypes`` (:func:`_native_blockwise`; where that fails, bitsandbytes is imported and
its ``quantize_blockwise`` used), and :func:`serialize_4bit` lays the tensors out as
``QuantState.as_dict(packed=True)`` does.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import platform
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorasave.errors import InvalidOptionError

#: block sizes ``bitsandbytes.functional.quantize_4bit`` accepts
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: elements per chunk (a multiple of the block size): 1 MiB of float32, cache-resident
CHUNK = 1 << 18
#: block size of the double quantization of the 4-bit block scales (``quantize_4bit(compress_statistics=True)``)
NESTED_BLOCKSIZE = 256
_UNSURE = 255  # table entry: the interval holds a midpoint (or NaN / Inf): bucket exactly
_ONE, _TINY, _ZERO = np.float32(1.0), np.float32(1e-38), np.float32(0.0)

#: NF4 (QLoRA, arXiv:2305.14314): the values of ``bitsandbytes.functional.get_4bit_type("nf4")``, code order
NF4 = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
#: FP4 (1 sign, 2 exponent, 1 mantissa bit) in code order, before ``get_4bit_type`` divides by the largest
#: magnitude; code 8 is +0.0 there too (bitsandbytes' list spells it as the integer ``-0``)
FP4 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


@lru_cache(maxsize=2)
def code_4bit(quant_type: str) -> np.ndarray:
    """The 16 code values (float32, code order) of ``quant_type``: ``get_4bit_type``'s ``quant_map``."""
    data = np.array(NF4 if quant_type == "nf4" else FP4, dtype=np.float32)
    data /= np.abs(data).max()  # as get_4bit_type: float32 division by the largest magnitude
    data.flags.writeable = False
    return data


@lru_cache(maxsize=1)
def dynamic_map() -> np.ndarray:
    """The signed 8-bit dynamic map (256 float32, sorted) of the double quantization's ``nested_quant_map``.

    The construction of ``bitsandbytes.functional.create_dynamic_map(signed=True, max_exponent_bits=7,
    total_bits=8)`` (Dettmers 2016, arXiv:1511.04561): for exponent ``i`` of 0..6, the midpoints of
    ``2 ** i + 1`` float32 ``linspace(0.1, 1)`` points scaled by ``10 ** (i - 6)``, both signs, then 0
    and 1, sorted. Checked equal to bitsandbytes' map by the tests.
    """
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (i - 6)) * means).tolist()
        data += (-(10 ** (i - 6)) * means).tolist()
    data += [0, 1.0]
    data += [0] * (256 - len(data))
    data.sort()
    out = torch.tensor(data, dtype=torch.float32).numpy()
    out.flags.writeable = False
    return out


@lru_cache(maxsize=4)
def _tables(quant_type: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(lookup uint8 (65536,), midpoints float32 (15,), order uint8 (16,))`` for ``quant_type``.

    The midpoints and order are bitsandbytes' ``_get_4bit_quantize_bounds``: the codebook sorted
    (``argsort``), ``(lower + upper) / 2`` in float32. ``lookup[h]`` is the (order-remapped) code
    of every float32 whose top 16 bits are ``h`` (unsigned), or ``_UNSURE``.
    """
    code = torch.from_numpy(code_4bit(quant_type).copy())
    order = torch.argsort(code)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    top = torch.arange(1 << 16, dtype=torch.int32) << 16
    lo, hi = top.view(torch.float32), (top | 0xFFFF).view(torch.float32)

    def bucket(v: torch.Tensor) -> torch.Tensor:
        return order[torch.bucketize(torch.clamp(v, -1, 1), bounds)]

    a, b = bucket(lo), bucket(hi)
    odd = lo.isnan() | hi.isnan() | lo.isinf() | hi.isinf()
    table = torch.where((a == b) & ~odd, a, _UNSURE).to(torch.uint8)
    return table.numpy(), bounds.numpy().astype(np.float32), order.to(torch.uint8).numpy()


_NATIVE_LOCK = threading.Lock()


@lru_cache(maxsize=1)
def _native_blockwise() -> Any | None:
    """bitsandbytes' ``cquantize_blockwise_cpu_fp32`` from its CPU library, loaded without importing the package; None where it is not there."""
    spec = importlib.util.find_spec("bitsandbytes")
    if spec is None or not spec.submodule_search_locations:
        return None
    suffix = {"Darwin": ".dylib", "Windows": ".dll"}.get(platform.system(), ".so")  # bitsandbytes' consts.DYNAMIC_LIBRARY_SUFFIX
    path = Path(next(iter(spec.submodule_search_locations))) / f"libbitsandbytes_cpu{suffix}"
    try:
        fn = ctypes.CDLL(str(path)).cquantize_blockwise_cpu_fp32
    except (OSError, AttributeError):
        return None
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong]
    return fn


def quantize_blockwise(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``bitsandbytes.functional.quantize_blockwise(a, blocksize=256)`` of a float32 vector: ``(uint8 codes, float32 absmax)``.

    bitsandbytes' own CPU kernel with the dynamic map (:func:`dynamic_map`); through the imported
    package where its library cannot be loaded directly.
    """
    a = a.to(torch.float32).contiguous()
    fn = _native_blockwise()
    if fn is None:
        from lorasave.formats.bnb import import_bnb

        q, state = import_bnb().functional.quantize_blockwise(a, blocksize=NESTED_BLOCKSIZE)
        return q, state.absmax
    n = a.numel()
    code = np.ascontiguousarray(dynamic_map())
    out = torch.empty(a.shape, dtype=torch.uint8)
    absmax = torch.empty(-(-n // NESTED_BLOCKSIZE), dtype=torch.float32)
    with _NATIVE_LOCK:  # one call at a time, as bitsandbytes' op
        fn(code.ctypes.data, a.data_ptr(), absmax.data_ptr(), out.data_ptr(), NESTED_BLOCKSIZE, n)
    return out, absmax


def quantize_4bit(a: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4") -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit codes and block absmax of ``a``, bit-identical to bitsandbytes' CPU ``quantize_4bit`` kernel.

    Args:
        a: float32, bfloat16 or float16 tensor of any shape (flattened in C order).
        blocksize: elements per block, one of :data:`BLOCKSIZES`.
        quant_type: ``"nf4"`` or ``"fp4"``.

    Returns:
        ``(packed, absmax)``: uint8 ``(ceil(n / 2), 1)`` codes (even element in the high nibble)
        and float32 ``(ceil(n / blocksize),)``, as ``torch.ops.bitsandbytes.quantize_4bit`` returns
        them with ``quant_storage=torch.uint8``.

    Raises:
        InvalidOptionError: a block size or quant type bitsandbytes does not accept.
    """
    if blocksize not in BLOCKSIZES:
        raise InvalidOptionError(f"4-bit block size {blocksize} is not one of {', '.join(map(str, BLOCKSIZES))}")
    if quant_type not in ("nf4", "fp4"):
        raise InvalidOptionError(f"4-bit quant type {quant_type!r} is not nf4 or fp4")
    table, bounds, order = _tables(quant_type)
    x = a.detach().reshape(-1).to(torch.float32).contiguous().numpy()
    n = x.size
    full = n - n % blocksize
    m = n + n % 2
    packed = np.empty(m // 2, dtype=np.uint8)
    absmax = np.empty(-(-n // blocksize), dtype=np.float32)
    step = max(CHUNK // blocksize, 1) * blocksize
    buf = np.empty(min(step, m), dtype=np.float32)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for start in range(0, m, step):
            stop = min(start + step, m)
            s = buf[: stop - start]
            end = min(stop, full)
            if end > start:  # whole blocks: x * (1 / max(absmax, 1e-38))
                blocks = x[start:end].reshape(-1, blocksize)
                am = absmax[start // blocksize : end // blocksize]
                np.abs(blocks).max(axis=1, out=am)
                np.multiply(blocks, (_ONE / np.maximum(am, _TINY))[:, None], out=s[: end - start].reshape(-1, blocksize))
            if stop > full and n > full:  # the shorter last block: x / max(absmax, 1e-38), stored clamped
                absmax[-1:] = torch.from_numpy(x[full:]).abs().max().clamp(min=1e-38).reshape(1).numpy()  # torch's, NaN bits included
                np.divide(x[full:], absmax[-1], out=s[full - start : n - start])
            if stop > n:
                s[-1] = _ZERO  # padding to an even count
            codes = np.take(table, s.view(np.uint16)[1::2], mode="clip")  # top halves (little-endian); clip: no bounds checks
            unsure = np.flatnonzero(codes == _UNSURE)
            if unsure.size:
                codes[unsure] = order[np.searchsorted(bounds, np.clip(s[unsure], -1, 1), side="left")]
            np.bitwise_or(codes[::2] << 4, codes[1::2], out=packed[start // 2 : stop // 2])
    return torch.from_numpy(packed).unsqueeze(1), torch.from_numpy(absmax)


def serialize_4bit(a: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors transformers saves for a 4-bit weight, as ``quantize_4bit`` + ``QuantState.as_dict(packed=True)``.

    Args:
        a: the weight (float32, bfloat16 or float16), quantized as given.
        blocksize, quant_type, double_quant: ``quantize_4bit``'s ``blocksize``, ``quant_type``,
            ``compress_statistics``.
        dtype: the dtype the quant state records (what the layer dequantizes to).

    Returns:
        ``{"": packed codes, "absmax": ..., "quant_map": ..., ["nested_absmax", "nested_quant_map",]
        "quant_state.bitsandbytes__<type>": JSON bytes}`` in ``as_dict``'s order (``""``: the
        weight itself). Double quant, as bitsandbytes: ``absmax - absmax.mean()`` through
        :func:`quantize_blockwise`, the mean kept as ``nested_offset``.

    Raises:
        InvalidOptionError: as :func:`quantize_4bit`.
    """
    packed, absmax = quantize_4bit(a, blocksize, quant_type)
    out: dict[str, torch.Tensor] = {"": packed}
    state: dict[str, Any] = {
        "quant_type": quant_type,
        "blocksize": blocksize,
        "dtype": str(dtype).strip("torch."),  # as_dict's own spelling
        "shape": tuple(a.shape),
    }
    if double_quant:
        offset = absmax.mean()
        qabsmax, nested = quantize_blockwise(absmax - offset)
        out["absmax"], out["quant_map"] = qabsmax, torch.from_numpy(code_4bit(quant_type).copy())
        out["nested_absmax"], out["nested_quant_map"] = nested, torch.from_numpy(dynamic_map().copy())
        state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=offset.item())
    else:
        out["absmax"], out["quant_map"] = absmax, torch.from_numpy(code_4bit(quant_type).copy())
    blob = json.dumps(state).encode("utf-8")  # bitsandbytes.utils.pack_dict_to_tensor
    out[f"quant_state.bitsandbytes__{quant_type}"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return out


def quantize_4bit_state(a: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool) -> tuple[torch.Tensor, Any]:
    """``bitsandbytes.functional.quantize_4bit(a, blocksize, compress_statistics=double_quant, quant_type)`` on CPU.

    The codes come from :func:`quantize_4bit`; the ``QuantState`` is built the way bitsandbytes
    builds it (double quant: ``absmax - absmax.mean()`` through ``quantize_blockwise`` with
    block size 256, the mean kept as ``offset``).

    Returns:
        ``(packed uint8 (ceil(n / 2), 1), QuantState)``.

    Raises:
        InvalidOptionError: as :func:`quantize_4bit`.
    """
    from lorasave.formats.bnb import import_bnb

    F = import_bnb().functional
    packed, absmax = quantize_4bit(a, blocksize, quant_type)
    code = F.get_4bit_type(quant_type, device=a.device)
    if not double_quant:
        return packed, F.QuantState(absmax=absmax, shape=a.shape, dtype=a.dtype, blocksize=blocksize, code=code, quant_type=quant_type)
    offset = absmax.mean()
    qabsmax, state2 = F.quantize_blockwise(absmax - offset, blocksize=256)
    state = F.QuantState(
        absmax=qabsmax,
        shape=a.shape,
        dtype=a.dtype,
        blocksize=blocksize,
        code=code,
        quant_type=quant_type,
        offset=offset,
        state2=state2,
    )
    return packed, state
