"""Quantized base checkpoints lorasave reads exactly: which ``quant_method``, which tensors, their float32 values.

A quantized base's weights appear in ``Checkpoint.tensors`` once each, as a ``QuantizedWeight`` standing
for the dequantized tensor (its codes and scales folded in); the merge reads it whole, dequantized to
float32, adds the delta and rounds once to the output dtype:

================  =====================================  ==============================================
``quant_method``  layout                                 dequantized by
================  =====================================  ==============================================
bitsandbytes      NF4/FP4 (double quant), LLM.int8       bitsandbytes itself (``formats.bnb``)
fp8               FP8 + ``_scale_inv`` (block, tensor,   transformers' ``Fp8Dequantize`` arithmetic
                  channel)                               (``formats.fp8``)
compressed-       ``float-quantized`` FP8 +              the same product in float32
tensors           ``weight_scale`` (``FP8_DYNAMIC``,     (``formats.fp8_compressed``)
                  ``FP8_BLOCK``, ``FP8`` presets)
mxfp4             gpt-oss experts ``_blocks`` /          transformers' ``convert_moe_packed_tensors``
                  ``_scales``                            arithmetic (``formats.mxfp4``)
================  =====================================  ==============================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lorasave.errors import CheckpointFormatError, UnsupportedModelError
from lorasave.formats import bnb
from lorasave.formats.bnb import Bnb4bitWeight, Int8Weight, quantization_config
from lorasave.formats.fp8 import Fp8Weight, compute_dtype, group_fp8
from lorasave.formats.fp8_compressed import SCALE_SUFFIX as CT_SCALE_SUFFIX
from lorasave.formats.fp8_compressed import describe_format, fp8_layout
from lorasave.formats.mxfp4 import Mxfp4Weight, group_mxfp4
from lorasave.formats.safetensors.header import TensorEntry

#: ``quant_method`` values lorasave does not read, with what to call them.
UNSUPPORTED_METHODS = {
    "gptq": "GPTQ",
    "awq": "AWQ",
    "hqq": "HQQ",
    "fbgemm_fp8": "FBGEMM FP8",
    "compressed-tensors": "compressed-tensors",
    "aqlm": "AQLM",
    "eetq": "EETQ",
    "quanto": "quanto",
    "torchao": "torchao",
    "higgs": "HIGGS",
    "vptq": "VPTQ",
    "bitnet": "BitNet",
    "gguf": "GGUF",
}

QuantizedWeight = Bnb4bitWeight | Int8Weight | Fp8Weight | Mxfp4Weight
#: The classes of :data:`QuantizedWeight`, for ``isinstance``.
QUANTIZED_TYPES: tuple[type, ...] = (Bnb4bitWeight, Int8Weight, Fp8Weight, Mxfp4Weight)


def check_quant_method(config: dict[str, Any], where: str) -> str | None:
    """The base's quantization method if lorasave reads it (``"bitsandbytes"``, ``"fp8"``, ``"mxfp4"``, ``"compressed-tensors"``
    for FP8 ones), None when not quantized.

    Raises:
        UnsupportedModelError: a method lorasave does not read (GPTQ, AWQ, HQQ, compressed-tensors...).
    """
    qc = quantization_config(config)
    if qc is None:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method == "bitsandbytes" or qc.get("load_in_4bit") or qc.get("load_in_8bit"):
        return "bitsandbytes"
    if method in ("fp8", "mxfp4"):
        return method
    if method == "compressed-tensors" and fp8_layout(qc) is not None:
        return method
    name = UNSUPPORTED_METHODS.get(method, method or "unknown")
    if method == "compressed-tensors":
        name = f"compressed-tensors ({describe_format(qc)}; lorasave reads its FP8 float-quantized checkpoints only)"
    raise UnsupportedModelError(
        f"{where} is quantized with {name} (quant_method {method!r}), which lorasave cannot dequantize; "
        "merge into the original 16-bit checkpoint instead (with --merge-into dequantized if the adapter was trained on a 4-bit base)",
    )


def group_quantized(method: str, config: dict[str, Any], tensors: dict[str, TensorEntry], read_bytes: Any, where: Path) -> tuple[dict[str, Any], set[str]]:
    """Find the quantized weights of a base whose ``quant_method`` is ``method``.

    Args:
        method: what :func:`check_quant_method` returned.
        config: parsed config.json.
        tensors: every entry of the checkpoint by name.
        read_bytes: ``entry -> bytes`` (bitsandbytes' small quant-state blobs).
        where: config.json, named in errors.

    Returns:
        ``(weights by name, names of every entry they consume)``: the checkpoint's logical tensors are
        the weights plus every entry not consumed.

    Raises:
        CheckpointFormatError: a bitsandbytes config with no quantized weight.
        QuantizedBaseError: an FP8 layout lorasave does not read (``formats.fp8``).
    """
    if method == "bitsandbytes":
        weights, used = bnb.group_quantized(tensors, read_bytes)
        if not weights:
            raise CheckpointFormatError(f"{where} declares bitsandbytes quantization but no quantized weights were found", path=where)
        return dict(weights), used
    if method == "mxfp4":
        mx, used = group_mxfp4(tensors, compute_dtype(config), where)
        return dict(mx), used
    qc = quantization_config(config) or {}
    if method == "compressed-tensors":
        layout = fp8_layout(qc)
        assert layout is not None
        fp8, used = group_fp8(tensors, layout, compute_dtype(config), where, CT_SCALE_SUFFIX)
        return dict(fp8), used
    fp8, used = group_fp8(tensors, qc, compute_dtype(config), where)
    return dict(fp8), used


def dequantize(weight: Any, read: Any) -> torch.Tensor:
    """A quantized base weight's value in float32 (``read``: ``entry -> tensor`` reading a whole entry)."""
    if isinstance(weight, (Bnb4bitWeight, Int8Weight)):
        return bnb.dequantize(weight, read)
    result: torch.Tensor = weight.dequantize(read)
    return result


def label(weight: Any) -> str:
    """Short name of a quantized weight's format (``lorasave inspect``)."""
    if isinstance(weight, Bnb4bitWeight):
        return "NF4/FP4"
    if isinstance(weight, Int8Weight):
        return "INT8"
    return "MXFP4" if isinstance(weight, Mxfp4Weight) else "FP8"
