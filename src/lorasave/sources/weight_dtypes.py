"""Which base tensors lorasave may copy or merge into, by dtype.

A merge computes ``W0 + ΔW`` in float32 and casts back to the weight's dtype, which is only
meaningful for floating-point weights stored as themselves. Three kinds of base are refused
before any byte is written, each with one line naming the tensor:

- sub-byte floats (``F4``, ``F6_E2M3``, ``F6_E3M2``; MXFP4/NVFP4-style checkpoints): packed
  values lorasave does not read;
- FP8 weights (``F8_E4M3``/``F8_E5M2``) with a ``weight_scale`` or ``weight_scale_inv`` tensor
  beside them and no ``quantization_config`` in config.json: block-scaled values whose meaning
  lives in the scales (reading FP8 bases exactly is future work), so neither the raw FP8 values
  nor the scales are ever merged or written into a 16-bit output;
- a weight an adapter changes that is not F16, BF16, F32 or F64 (integers, bool, complex, FP8).

A scale tensor (``*.weight_scale``, ``*.weight_scale_inv``, ``*.input_scale``) that a plan keeps
is never cast to the output's 16-bit dtype: it keeps its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lorasave.errors import Fp8WeightsError, UnsupportedDtypeError
from lorasave.util.dtypes import ST_DTYPES, StDtype

#: dtypes a weight may have for an adapter to be merged into it.
MERGEABLE = frozenset(ST_DTYPES[n] for n in ("F16", "BF16", "F32", "F64"))
FP8 = frozenset(ST_DTYPES[n] for n in ("F8_E4M3", "F8_E5M2"))
SCALE_SUFFIXES = ("_scale", "_scale_inv")
_SCALE_NAMES = (".weight_scale", "_scale_inv", ".input_scale", ".activation_scale")


def is_scale(name: str) -> bool:
    """Whether ``name`` is a quantization scale tensor (kept in its own dtype, never cast to 16 bits)."""
    return name.endswith(_SCALE_NAMES)


def _where(entry: Any, default: Path) -> Path:
    file = getattr(entry, "file", None)
    return Path(file) if file is not None else default


def check_base_dtypes(root: Path, tensors: Mapping[str, Any], quantization_config: object) -> None:
    """Refuse a base holding sub-byte floats, or FP8 weights with scales but no quantization_config.

    Args:
        root: the base folder (named when a tensor has no file).
        tensors: the base's entries by name (``Checkpoint.tensors``).
        quantization_config: config.json's ``quantization_config`` (None when absent).

    Raises:
        UnsupportedDtypeError: a tensor stored as F4 or F6_*.
        Fp8WeightsError: an F8_E4M3/F8_E5M2 ``*weight`` with ``*weight_scale(_inv)`` beside it and
            no ``quantization_config``.
    """
    for name, e in tensors.items():
        dt: StDtype | None = getattr(e, "dtype", None)
        if dt is not None and dt.bits < 8:
            raise UnsupportedDtypeError(
                f"{_where(e, root)}: tensor {name!r} is stored as {dt.name}, a {dt.bits}-bit float type lorasave does not read; "
                "merge into the original 16-bit checkpoint instead",
                path=_where(e, root),
                tensor=name,
                dtype=dt.name,
            )
    if quantization_config:
        return
    fp8 = [(name, scale) for name, e in tensors.items() if getattr(e, "dtype", None) in FP8 for scale in _scales(name, tensors)]
    if fp8:
        name, scale = fp8[0]
        e = tensors[name]
        more = f" (and {len(fp8) - 1} more)" if len(fp8) > 1 else ""
        raise Fp8WeightsError(
            f"{_where(e, root)}: tensor {name!r}{more} is stored as {e.dtype.name} with the scale {scale!r} beside it, but config.json has "
            "no quantization_config; lorasave does not read FP8 checkpoints yet and never merges into raw FP8 values: "
            "merge into the original 16-bit checkpoint instead",
            path=_where(e, root),
            tensor=name,
            dtype=e.dtype.name,
        )


def _scales(name: str, tensors: Mapping[str, Any]) -> Iterable[str]:
    return [name + s for s in SCALE_SUFFIXES if name.endswith("weight") and name + s in tensors][:1]


def check_mergeable(targets: Iterable[tuple[str, Any, Path]]) -> None:
    """Refuse to merge into a weight that is not stored as a float lorasave can compute with.

    Args:
        targets: ``(name, W0 source, folder)`` of every tensor an adapter changes; the folder
            (base or adapter) is named when the source has no file of its own.

    Raises:
        UnsupportedDtypeError: a target stored as an integer, bool, complex or FP8 type.
    """
    for name, src, root in targets:
        dt: StDtype = src.dtype
        if dt not in MERGEABLE:
            raise UnsupportedDtypeError(
                f"{_where(src, root)}: the adapter changes {name!r}, which is stored as {dt.name}; lorasave merges only into "
                "F16, BF16, F32 or F64 weights and will not merge into it: check that BASE is the model the adapter was trained on, "
                "or merge into its original floating-point checkpoint",
                path=_where(src, root),
                tensor=name,
                dtype=dt.name,
            )
