"""Choices of the merge: ``save_method`` and ``merge_into``, and the quantization they use.

Names follow Unsloth's ``save_method`` (``merged_16bit``, ``merged_4bit``, ``lora``, and the
compressed-tensors schemes ``fp8_dynamic``, ``w4a16``...) and transformers' ``BitsAndBytesConfig``
(``bnb_4bit_quant_type``, ``bnb_4bit_use_double_quant``).
"""

from __future__ import annotations

import enum
import os
from pathlib import Path

import torch

from lorasave.errors import InvalidOptionError, SourceNotFoundError
from lorasave.formats.bnb import Bnb4bitSpec, quantization_config
from lorasave.formats.compressed import SAVE_METHODS, CompressedSpec, import_compressed_tensors
from lorasave.formats.mxfp4 import Mxfp4Spec
from lorasave.util.jsonio import read_json


class SaveMethod(enum.Enum):
    """What ``merge`` writes."""

    MERGED_16BIT = "merged_16bit"  # plain checkpoint in --dtype
    MERGED_4BIT = "merged_4bit"  # Linear weights as bitsandbytes 4-bit
    # compressed-tensors (vLLM / SGLang), data-free presets: formats.compressed
    FP8_DYNAMIC = "fp8_dynamic"
    FP8_BLOCK = "fp8_block"
    W8A16 = "w8a16"
    W4A16 = "w4a16"
    W8A8 = "w8a8"
    NVFP4A16 = "nvfp4a16"
    MXFP4A16 = "mxfp4a16"
    MXFP4 = "mxfp4"  # gpt-oss's own MXFP4 experts (formats.mxfp4), the rest 16-bit

    @property
    def compressed(self) -> bool:
        """A compressed-tensors scheme (``formats.compressed.SAVE_METHODS``)."""
        return self.value in SAVE_METHODS

    @property
    def quantized(self) -> bool:
        """Any save method but ``merged_16bit``: the output's weights are re-quantized."""
        return self is not SaveMethod.MERGED_16BIT


class MergeInto(enum.Enum):
    """Which W0 the delta is added to."""

    BASE = "base"  # the weights in BASE as they are
    DEQUANTIZED = "dequantized"  # BASE's weights round-tripped through the 4-bit quantization QLoRA trained on


def parse_enum(cls: type[enum.Enum], value: object, option: str) -> enum.Enum:
    """``cls(value)`` with an error that lists the choices.

    Raises:
        InvalidOptionError: not one of the values.
    """
    if isinstance(value, cls):
        return value
    try:
        return cls(str(value).lower())
    except ValueError:
        choices = ", ".join(m.value for m in cls)  # type: ignore[attr-defined]
        raise InvalidOptionError(f"invalid {option} {value!r}; use one of {choices}") from None


def bnb_spec(
    *,
    quant_type: str,
    blocksize: int,
    double_quant: bool,
    quant_input_dtype: str | torch.dtype,
    quantization_from: str | os.PathLike[str] | None,
) -> Bnb4bitSpec:
    """The 4-bit quantization from the flags, or from a 4-bit checkpoint's ``quantization_config``.

    Raises:
        InvalidOptionError: unknown quant_type / blocksize / dtype, or a ``quantization_from``
            folder that is not a bitsandbytes 4-bit checkpoint.
        SourceNotFoundError: ``quantization_from`` has no config.json.
    """
    if quantization_from is not None:
        cfg_path = Path(quantization_from) / "config.json"
        if not cfg_path.is_file():
            raise SourceNotFoundError(f"--quantization-from {quantization_from}: no config.json there; give the 4-bit checkpoint's folder", path=cfg_path)
        qc = quantization_config(read_json(cfg_path))
        if not qc or not qc.get("load_in_4bit"):
            raise InvalidOptionError(f"{cfg_path} has no bitsandbytes 4-bit quantization_config to copy; give a 4-bit checkpoint folder")
        from lorasave.formats.bnb import Bnb4bitWeight
        from lorasave.sources.checkpoint import open_checkpoint

        states = [w.state for w in open_checkpoint(Path(quantization_from)).tensors.values() if isinstance(w, Bnb4bitWeight)]
        return Bnb4bitSpec.from_quantization_config(qc, states[0] if states else None)
    if quant_type not in ("nf4", "fp4"):
        raise InvalidOptionError(f"invalid quant_type {quant_type!r}; use nf4 or fp4")
    if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise InvalidOptionError(f"invalid blocksize {blocksize}; bitsandbytes takes a power of two from 32 to 4096")
    dt = quant_input_dtype if isinstance(quant_input_dtype, torch.dtype) else getattr(torch, str(quant_input_dtype).removeprefix("torch."), None)
    if dt not in (torch.float16, torch.bfloat16, torch.float32):
        raise InvalidOptionError(f"invalid quant_input_dtype {quant_input_dtype!r}; use bfloat16, float16 or float32")
    return Bnb4bitSpec(quant_type, blocksize, double_quant, dt)


#: What ``merge`` quantizes its output with, if anything.
OutputQuantizer = Bnb4bitSpec | CompressedSpec | Mxfp4Spec


def output_quantizer(method: SaveMethod, spec: Bnb4bitSpec | None) -> OutputQuantizer | None:
    """The output quantization of ``method``: ``spec`` for ``merged_4bit``, a compressed-tensors scheme, or None.

    Raises:
        UnsupportedModelError: a compressed-tensors method without the compressed-tensors package.
    """
    if method is SaveMethod.MERGED_4BIT:
        return spec
    if method is SaveMethod.MXFP4:
        return Mxfp4Spec()
    if method.compressed:
        import_compressed_tensors()
        return CompressedSpec(method.value)
    return None
