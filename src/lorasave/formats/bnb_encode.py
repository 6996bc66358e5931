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
The double quantization of ``absmax`` stays bitsandbytes' own (``quantize_blockwise``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch

from lorasave.errors import InvalidOptionError

#: block sizes ``bitsandbytes.functional.quantize_4bit`` accepts
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: elements per chunk (a multiple of the block size): 1 MiB of float32, cache-resident
CHUNK = 1 << 18
_UNSURE = 255  # table entry: the interval holds a midpoint (or NaN / Inf): bucket exactly
_ONE, _TINY, _ZERO = np.float32(1.0), np.float32(1e-38), np.float32(0.0)


@lru_cache(maxsize=4)
def _tables(quant_type: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(lookup uint8 (65536,), midpoints float32 (15,), order uint8 (16,))`` for ``quant_type``.

    ``lookup[h]`` is the (order-remapped) code of every float32 whose top 16 bits are ``h``
    (unsigned), or ``_UNSURE``.
    """
    from lorasave.formats.bnb import import_bnb

    import_bnb()
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds  # the reference's own midpoints

    bounds, order = _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))
    top = torch.arange(1 << 16, dtype=torch.int32) << 16
    lo, hi = top.view(torch.float32), (top | 0xFFFF).view(torch.float32)

    def code(v: torch.Tensor) -> torch.Tensor:
        return order[torch.bucketize(torch.clamp(v, -1, 1), bounds)]

    a, b = code(lo), code(hi)
    odd = lo.isnan() | hi.isnan() | lo.isinf() | hi.isinf()
    table = torch.where((a == b) & ~odd, a, _UNSURE).to(torch.uint8)
    return table.numpy(), bounds.numpy().astype(np.float32), order.to(torch.uint8).numpy()


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
