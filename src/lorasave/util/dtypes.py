"""dtype names: safetensors header strings, torch dtypes, and the ``--dtype`` option.

The safetensors names and their sort order come from the format's Rust ``Dtype`` enum
(huggingface/safetensors, ``safetensors/src/tensor.rs``): ``serialize`` lays tensors out by
dtype in *descending* enum order, then by name, and lorasave's writer reproduces that order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorasave.errors import InvalidOptionError


@dataclass(frozen=True)
class StDtype:
    """One safetensors dtype.

    Attributes:
        name: header string, e.g. ``"BF16"``.
        torch_dtype: the matching torch dtype, or None when torch has none.
        bits: bits per element (4 for ``F4``).
        rank: position in the Rust enum; larger ranks are laid out first.
    """

    name: str
    torch_dtype: torch.dtype | None
    bits: int
    rank: int


_ENUM_ORDER: list[tuple[str, str | None, int]] = [
    ("BOOL", "bool", 8),
    ("F4", "float4_e2m1fn_x2", 4),
    ("F6_E2M3", None, 6),
    ("F6_E3M2", None, 6),
    ("U8", "uint8", 8),
    ("I8", "int8", 8),
    ("F8_E5M2", "float8_e5m2", 8),
    ("F8_E4M3", "float8_e4m3fn", 8),
    ("F8_E8M0", "float8_e8m0fnu", 8),
    ("I16", "int16", 16),
    ("U16", "uint16", 16),
    ("F16", "float16", 16),
    ("BF16", "bfloat16", 16),
    ("I32", "int32", 32),
    ("U32", "uint32", 32),
    ("F32", "float32", 32),
    ("C64", "complex64", 64),
    ("F64", "float64", 64),
    ("I64", "int64", 64),
    ("U64", "uint64", 64),
]

ST_DTYPES: dict[str, StDtype] = {
    name: StDtype(name, getattr(torch, tname, None) if tname else None, bits, rank) for rank, (name, tname, bits) in enumerate(_ENUM_ORDER)
}
_BY_TORCH: dict[torch.dtype, StDtype] = {d.torch_dtype: d for d in ST_DTYPES.values() if d.torch_dtype is not None}

#: dtypes lorasave treats as floating weights (the ones ``--dtype`` converts).
FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})

#: ``--dtype`` choices besides ``auto``.
OUTPUT_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def st_dtype(torch_dtype: torch.dtype) -> StDtype:
    """The safetensors dtype of a torch dtype.

    Raises:
        InvalidOptionError: safetensors has no name for it.
    """
    try:
        return _BY_TORCH[torch_dtype]
    except KeyError:
        raise InvalidOptionError(f"dtype {torch_dtype} cannot be stored in safetensors") from None


def nbytes(dtype: StDtype, shape: tuple[int, ...]) -> int:
    """Bytes taken by a tensor of ``shape`` in ``dtype`` (sub-byte types packed)."""
    n = 1
    for d in shape:
        n *= d
    return (n * dtype.bits + 7) // 8


def parse_output_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """Parse a ``--dtype`` value: ``auto``/None (keep the base's), ``bfloat16``, ``float16``, ``float32``.

    Returns:
        The torch dtype, or None for ``auto``.

    Raises:
        InvalidOptionError: any other value.
    """
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        if value not in OUTPUT_DTYPES.values():
            raise InvalidOptionError(f"dtype {value} is not an output dtype; use one of auto, {', '.join(OUTPUT_DTYPES)}")
        return value
    key = str(value).strip().lower().removeprefix("torch.")
    key = _ALIASES.get(key, key)
    if key == "auto":
        return None
    if key not in OUTPUT_DTYPES:
        raise InvalidOptionError(f"unknown dtype {value!r}; use one of auto, {', '.join(OUTPUT_DTYPES)}")
    return OUTPUT_DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling transformers writes in config.json)."""
    return str(dtype).removeprefix("torch.")
