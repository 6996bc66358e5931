"""llama.cpp's own quantizer, ``ggml_quantize_chunk``, from the pinned runtime's libggml-base.

The GGUF writer encodes the k-quant files with it, row block by row block, and ``verify`` uses it
as the reference for the GGML types gguf-py cannot encode: ``llama_model_quantize`` converts each
tensor of its input to float32 and calls ``ggml_quantize_chunk(type, src, dst, start, nrows,
n_per_row, imatrix)`` on slabs of whole rows (``src/llama-quant.cpp``); every row is encoded on its
own (the importance matrix, when given, weighs its columns), so slabs of any size give the same bytes.
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

_lock = threading.Lock()
_base: Any = None
_initialized: set[int] = set()


def available() -> bool:
    """Whether the llama.cpp runtime (and so libggml-base) is installed."""
    from lorasave.runtimes.llama_cpp import lib as llama_cpp

    return llama_cpp.available()


def ggml_base() -> Any:
    """The loaded ``libggml-base`` of the installed runtime, with ``ggml_quantize_chunk`` typed.

    Raises:
        LlamaCppNotInstalledError: the runtime is not installed.
        LlamaCppError: the library does not load.
    """
    global _base
    from lorasave.errors import LlamaCppError
    from lorasave.runtimes.llama_cpp import lib as llama_cpp
    from lorasave.runtimes.llama_cpp.install import REQUIRED_FILES

    llama_cpp.require()
    with _lock:
        if _base is None:
            path = llama_cpp.runtime_dir() / REQUIRED_FILES[0]
            try:
                lib = ctypes.CDLL(str(path), mode=getattr(os, "RTLD_NOW", 2) | getattr(os, "RTLD_LOCAL", 0))
                fn = lib.ggml_quantize_chunk
            except (OSError, AttributeError) as e:
                raise LlamaCppError(f"could not load {path} ({e}); reinstall it with {llama_cpp.INSTALL_COMMAND} --force", path=path) from e
            # size_t ggml_quantize_chunk(enum ggml_type, const float *src, void *dst, int64_t start, int64_t nrows, int64_t n_per_row, const float *imatrix)
            fn.restype = ctypes.c_size_t
            fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
            # void ggml_quantize_init(enum ggml_type): the i-quants' grids (iq3xs_init_impl...), once per type
            lib.ggml_quantize_init.restype = None
            lib.ggml_quantize_init.argtypes = [ctypes.c_int]
            # bool ggml_quantize_requires_imatrix(enum ggml_type): ggml_quantize_chunk asserts on a NULL imatrix for these
            lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
            lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
            _base = lib
        return _base


def requires_imatrix(qtype: Any) -> bool:
    """``ggml_quantize_requires_imatrix``: ``ggml_quantize_chunk`` aborts the process without an importance matrix for ``qtype``.

    Raises:
        LlamaCppNotInstalledError, LlamaCppError: as :func:`ggml_base`.
    """
    return bool(ggml_base().ggml_quantize_requires_imatrix(int(qtype)))


def quantize(x: np.ndarray, qtype: Any, imatrix: np.ndarray | None = None) -> np.ndarray:
    """``ggml_quantize_chunk`` of float32 rows ``x`` ``(..., n_per_row)`` as ``qtype`` (a ``gguf.GGMLQuantizationType``).

    Returns:
        uint8 ``(..., n_per_row // block * type_size)``.

    Raises:
        LlamaCppNotInstalledError, LlamaCppError: as :func:`ggml_base`.
        ValueError: a row is not a whole number of blocks.
    """
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_per_row = int(x.shape[-1]) if x.ndim else 1
    out = np.empty((*x.shape[:-1], n_per_row // block * size), dtype=np.uint8)
    quantize_into(x, qtype, out, imatrix=imatrix)
    return out


def quantize_into(x: np.ndarray, qtype: Any, out: np.ndarray, threads: int = 1, imatrix: np.ndarray | None = None) -> None:
    """:func:`quantize` into ``out`` (uint8, C-contiguous, ``x.size // block * type_size`` bytes).

    ``x`` is float32, C-contiguous, rows of ``x.shape[-1]`` values. The call releases the GIL; with
    ``threads`` > 1 the rows are cut into that many runs quantized at once, each its own
    ``ggml_quantize_chunk(start=first row * n_per_row)``, as ``llama_model_quantize``'s workers do
    (``llama_tensor_quantize_impl``): rows are independent (an importance matrix weighs the columns
    of every row alike), so the bytes are the same.

    Args:
        imatrix: float32 ``(n_per_row,)``: the importance of each column for every row (one expert's
            slice of ``formats.gguf.imatrix.Imatrix.importance``), or None.

    Raises:
        LlamaCppNotInstalledError, LlamaCppError: as :func:`ggml_base`.
        ValueError: a row is not a whole number of blocks, ``out`` has the wrong size, ``imatrix``
            is not ``n_per_row`` float32 values, or ``qtype`` needs one and none is given
            (``ggml_quantize_requires_imatrix``; ggml would abort the process).
    """
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if x.dtype != np.float32 or not x.flags.c_contiguous or not out.flags.c_contiguous or out.dtype != np.uint8:
        raise ValueError("quantize_into takes C-contiguous float32 values and a C-contiguous uint8 output")
    n_per_row = int(x.shape[-1]) if x.ndim else 1
    if n_per_row % block:
        raise ValueError(f"rows of {n_per_row} values are not a multiple of the {qtype.name} block ({block})")
    nrows = x.size // n_per_row
    if out.size != nrows * (n_per_row // block) * size:
        raise ValueError(f"{out.size} bytes cannot hold {nrows} rows of {n_per_row} values as {qtype.name}")
    if nrows == 0:
        return
    lib = ggml_base()
    if imatrix is not None:
        if imatrix.dtype != np.float32 or imatrix.shape != (n_per_row,) or not imatrix.flags.c_contiguous:
            raise ValueError(f"an importance matrix for rows of {n_per_row} values must be that many float32 values, not {imatrix.dtype} {imatrix.shape}")
    elif requires_imatrix(qtype):
        raise ValueError(f"{qtype.name} cannot be encoded without an importance matrix (ggml_quantize_requires_imatrix)")
    weights = None if imatrix is None else imatrix.ctypes.data
    init(qtype)
    parts = max(1, min(threads, nrows // 16))  # at least 16 rows a run: fewer are not worth a thread

    def run(k: int) -> int:
        r0, r1 = nrows * k // parts, nrows * (k + 1) // parts
        return int(lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, r0 * n_per_row, r1 - r0, n_per_row, weights))

    written = run(0) if parts == 1 else sum(_pool(parts).map(run, range(parts)))
    if written != out.size:
        raise ValueError(f"ggml_quantize_chunk wrote {written} bytes of {qtype.name}, expected {out.size}")


def init(qtype: Any) -> None:
    """``ggml_quantize_init(qtype)`` once per type, before its first block (the i-quants' lookup
    grids; a no-op for the other types). ``ggml_quantize_chunk`` would do it too, under ggml's
    critical section; doing it first keeps the threads of :func:`quantize_into` from waiting on it."""
    if int(qtype) in _initialized:
        return
    lib = ggml_base()
    with _lock:
        if int(qtype) not in _initialized:
            lib.ggml_quantize_init(int(qtype))
            _initialized.add(int(qtype))


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(n: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``n`` threads for :func:`quantize_into` (made once per size)."""
    if n not in _POOLS:
        _POOLS[n] = ThreadPoolExecutor(n, thread_name_prefix="lorasave-ggml")
    return _POOLS[n]
