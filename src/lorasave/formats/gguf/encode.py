"""Fast encoders of float32 values into GGUF tensor data, byte for byte those of ``gguf.quants``.

gguf-py's numpy quantizers (``gguf/quants.py``: ``Q8_0.quantize_blocks`` ..., ``BF16``) reduce over
32-element blocks with numpy's short-axis reductions and copy every group of rows through
``np.concatenate``; they cost about 5 ns per element. Here the same float32 arithmetic runs in
torch on chunks of :data:`CHUNK_BLOCKS` blocks (about 1 MiB of float32, cache-resident):

* block maxima by a halving tree of ``torch.maximum`` instead of a reduction over 32 elements;
* the per-block scalars (``d``, ``id``, the F16 scale bytes) with gguf-py's own numpy expressions,
  on arrays 32x smaller;
* ``np_roundf`` (round half away from zero) as ``sign(x) * trunc(|x| * id + C)`` with
  ``C = 0.5 - 2**-25``, the largest float32 below one half: for ``0 <= v < 2**23`` the float32 sum
  ``v + C`` reaches the next integer exactly when ``frac(v) >= 0.5`` (``v = n + 0.5`` gives
  ``n + 1 - 2**-25``, which rounds up to ``n + 1``; the float32 below ``n + 0.5`` stays below),
  and ``|x * id| = |x| * id`` exactly;
* the conversion to int8 / uint8 by ``Tensor.copy_`` straight into the interleaved output.

A chunk holding NaN or Inf (and a Q8_0 block whose scale is so small that ``1 / d`` overflows)
goes through ``gguf.quants`` itself: numpy's conversions of non-finite values are kept as they are.
``tests/test_gguf_speedups.py`` compares every type's bytes against ``gguf.quants``.
"""

from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np
import torch

Q = gguf.GGMLQuantizationType

#: Blocks of 32 values per chunk: 1 MiB of float32, which stays in the L2 cache.
CHUNK_BLOCKS = 8192
#: 0.5 - 2**-25: ``trunc(v + _HALF_DOWN)`` is ``np_roundf(v)`` for float32 ``0 <= v < 2**23``.
_HALF_DOWN = float(np.nextafter(np.float32(0.5), np.float32(0)))


def _tree_max(a: torch.Tensor) -> torch.Tensor:
    """Row maxima of ``a`` ``(n, 2**k)`` by halving: ``(n,)``. Equal to ``a.amax(1)`` for NaN-free input."""
    while a.shape[1] > 1:
        h = a.shape[1] // 2
        a = torch.maximum(a[:, :h], a[:, h:])  # (n, 2**k) -> (n, 2**(k-1))
    return a[:, 0]


def _tree_min(a: torch.Tensor) -> torch.Tensor:
    """Row minima of ``a`` ``(n, 2**k)``: ``(n,)``."""
    while a.shape[1] > 1:
        h = a.shape[1] // 2
        a = torch.minimum(a[:, :h], a[:, h:])
    return a[:, 0]


def _f16_bytes(v: np.ndarray) -> torch.Tensor:
    """float32 ``(n, 1)`` -> its float16 bytes ``(n, 2)`` uint8 (numpy's conversion, as gguf-py)."""
    return torch.from_numpy(v.astype(np.float16).view(np.uint8))


def _recip(d: np.ndarray) -> np.ndarray:
    """gguf-py's ``np.where(d == 0, 0, 1 / d)`` (float32)."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, 0, 1 / d)


def _signed_absmax(x: torch.Tensor, a: torch.Tensor) -> np.ndarray:
    """Per block, the value of largest magnitude, the first one on ties (``argmax`` in gguf-py).

    Args:
        x: float32 ``(n, 32)``; a: ``x.abs()``.

    Returns:
        float32 ``(n, 1)``.
    """
    amax = _tree_max(a)  # (n,)
    mx, mn = _tree_max(x), _tree_min(x)
    out = torch.where(mx == amax, amax, -amax)
    out = torch.where(amax == 0, x[:, 0], out)  # all zeros: the first, whose sign reaches d's bytes
    tie = ((mx == amax) & (mn == -amax) & (amax != 0)).nonzero().reshape(-1)
    if tie.numel():  # +m and -m both present: the first one decides, as in np.argmax
        first = a[tie].argmax(dim=1, keepdim=True)
        out[tie] = x[tie].gather(1, first).reshape(-1)
    return out.numpy()[:, None]


def _q8_0(x: torch.Tensor, o: torch.Tensor) -> bool:
    """``Q8_0.quantize_blocks``: ``x`` float32 ``(n, 32)`` -> ``o`` uint8 ``(n, 34)`` (f16 d, 32 int8)."""
    a = x.abs()
    amax = _tree_max(a).numpy()[:, None]  # (n, 1)
    d = amax / 127
    inv = _recip(d)
    if not (np.isfinite(inv).all() and np.isfinite(amax).all()):
        return False
    z = a * torch.from_numpy(inv)
    z.add_(_HALF_DOWN).mul_(x.sign())  # round half away from zero, the sign applied last (exact)
    o.view(torch.int8)[:, 2:].copy_(z)  # truncates toward zero
    o[:, :2] = _f16_bytes(d)
    return True


def _q4_0_q5_0(x: torch.Tensor, o: torch.Tensor, bits: int) -> bool:
    """``Q4_0`` / ``Q5_0.quantize_blocks``: ``x`` float32 ``(n, 32)`` -> ``o`` uint8 ``(n, 18)`` / ``(n, 22)``."""
    a = x.abs()
    mx = _signed_absmax(x, a)  # (n, 1)
    half = 1 << (bits - 1)
    d = mx / -half
    inv = _recip(d)
    if not (np.isfinite(inv).all() and np.isfinite(mx).all()):
        return False
    q = (x * torch.from_numpy(inv)).add_(half + 0.5).to(torch.uint8).clamp_(0, 2 * half - 1)  # (n, 32)
    _pack(q, o, d, None, bits)
    return True


def _q4_1_q5_1(x: torch.Tensor, o: torch.Tensor, bits: int) -> bool:
    """``Q4_1`` / ``Q5_1.quantize_blocks``: ``x`` float32 ``(n, 32)`` -> ``o`` uint8 ``(n, 20)`` / ``(n, 24)``."""
    mxt, mnt = _tree_max(x), _tree_min(x)  # (n,)
    zero = (mxt == 0) | (mnt == 0)
    if zero.any() and (torch.signbit(x[zero]) & (x[zero] == 0)).any():
        return False  # which signed zero numpy's min / max returns reaches m's bytes
    mx, mn = mxt.numpy()[:, None], mnt.numpy()[:, None]  # (n, 1)
    levels = (1 << bits) - 1
    d = (mx - mn) / levels
    inv = _recip(d)
    if not (np.isfinite(inv).all() and np.isfinite(d).all()):
        return False
    q = (x - torch.from_numpy(mn)).mul_(torch.from_numpy(inv)).add_(0.5).to(torch.uint8).clamp_(0, levels)  # (n, 32)
    _pack(q, o, d, mn, bits)
    return True


def _pack(q: torch.Tensor, o: torch.Tensor, d: np.ndarray, m: np.ndarray | None, bits: int) -> None:
    """Write ``d`` (f16), ``m`` (f16, the ``_1`` types), the high bits (5-bit types) and the nibbles."""
    o[:, :2] = _f16_bytes(d)
    k = 2
    if m is not None:
        o[:, 2:4] = _f16_bytes(m)
        k = 4
    if bits == 5:  # packbits(q >> 4, bitorder="little"): bit i of a little-endian uint32 is q[i] >> 4
        weights = torch.tensor([1 << (i % 8) for i in range(32)], dtype=torch.int32).reshape(1, 4, 8)
        qh = ((q >> 4).to(torch.int32).reshape(-1, 4, 8) * weights).sum(dim=2)  # (n, 4) bytes
        o[:, k : k + 4] = qh.to(torch.uint8)
        k += 4
    lo = q[:, :16] & 0x0F if bits == 5 else q[:, :16]
    o[:, k:] = lo | (q[:, 16:] << 4)


def _bf16(x: torch.Tensor, o: torch.Tensor) -> bool:
    """``BF16.quantize_blocks`` (round to nearest even): float32 ``(n, b)`` -> bytes ``(n, 2 b)``."""
    if not torch.isfinite(x.sum()):
        return False
    o.view(torch.bfloat16).copy_(x)
    return True


def _f16(x: torch.Tensor, o: torch.Tensor) -> bool:
    """numpy ``astype(np.float16)``: float32 ``(n, b)`` -> bytes ``(n, 2 b)``."""
    if not torch.isfinite(x.sum()):
        return False
    o.view(torch.float16).copy_(x)
    return True


def _f32(x: torch.Tensor, o: torch.Tensor) -> bool:
    o.view(torch.float32).copy_(x)
    return True


_ENCODERS: dict[gguf.GGMLQuantizationType, Callable[[torch.Tensor, torch.Tensor], bool]] = {
    Q.F32: _f32,
    Q.F16: _f16,
    Q.BF16: _bf16,
    Q.Q8_0: _q8_0,
    Q.Q4_0: lambda x, o: _q4_0_q5_0(x, o, 4),
    Q.Q5_0: lambda x, o: _q4_0_q5_0(x, o, 5),
    Q.Q4_1: lambda x, o: _q4_1_q5_1(x, o, 4),
    Q.Q5_1: lambda x, o: _q4_1_q5_1(x, o, 5),
}
#: GGML types this module encodes.
ENCODABLE: frozenset[gguf.GGMLQuantizationType] = frozenset(_ENCODERS)


def _reference(x: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> torch.Tensor:
    """``gguf.quants.quantize`` of ``x`` ``(n, block)`` as bytes ``(n, type_size)``."""
    if qtype is Q.F16:
        return torch.from_numpy(x.numpy().astype(np.float16).view(np.uint8))
    return torch.from_numpy(gguf.quants.quantize(x.numpy(), qtype)).view(torch.uint8)


def encode_into(x: torch.Tensor, qtype: gguf.GGMLQuantizationType, out: torch.Tensor) -> None:
    """Encode float32 values as ``qtype`` into ``out``.

    Args:
        x: float32, contiguous, any shape; ``x.numel()`` a multiple of the block size (32 for the
            block types, 1 for the float types), blocks taken in memory order (rows of ggml).
        qtype: one of :data:`ENCODABLE`.
        out: uint8, contiguous, ``x.numel() // block * type_size`` bytes; written.

    Raises:
        ValueError: ``qtype`` not encodable, or sizes that do not match.
    """
    if qtype not in _ENCODERS:
        raise ValueError(f"no encoder for {qtype.name}")
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if block == 1:  # float types: 32 values a row of the chunk, or one when fewer
        block = 32 if x.numel() % 32 == 0 else 1
        size *= block
    n = x.numel() // block
    if n * block != x.numel() or out.numel() != n * size:
        raise ValueError(f"{x.numel()} values do not fill {out.numel()} bytes of {qtype.name}")
    xb = x.reshape(n, block)  # (blocks, block)
    ob = out.reshape(n, size)  # (blocks, bytes per block)
    fn = _ENCODERS[qtype]
    for i in range(0, n, CHUNK_BLOCKS):
        xc, oc = xb[i : i + CHUNK_BLOCKS], ob[i : i + CHUNK_BLOCKS]
        if not fn(xc, oc):
            oc.copy_(_reference(xc, qtype).reshape(oc.shape))


def encode_tensor(x: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> torch.Tensor:
    """``encode_into`` a new uint8 tensor of ``x.numel() // block * type_size`` bytes (1-D)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = torch.empty(x.numel() // block * size, dtype=torch.uint8)
    encode_into(x.contiguous(), qtype, out)
    return out
