"""bitsandbytes weights as transformers serializes them: detect, dequantize to float32, quantize.

4-bit (``Linear4bit``), per quantized weight ``P = <module>.weight`` (transformers
``quantizers/quantizer_bnb_4bit.py``; bitsandbytes ``QuantState.as_dict(packed=True)``):
``P`` packed codes (uint8 ``(ceil(n/2), 1)``, or the same bytes viewed as ``bnb_4bit_quant_storage``),
``P.absmax`` (float32, or uint8 with double quant), ``P.quant_map`` (float32 ``(16,)``),
``P.nested_absmax`` / ``P.nested_quant_map`` (double quant only) and
``P.quant_state.bitsandbytes__nf4`` (or ``__fp4``): uint8 bytes of a JSON dict with
``quant_type``, ``blocksize``, ``dtype``, ``shape`` and the nested fields.

8-bit (LLM.int8, ``Linear8bitLt``): ``<module>.weight`` int8 ``(out, in)``, ``<module>.SCB`` float32
``(out,)`` row absmax, optional ``<module>.weight_format``.

Dequantization is bitsandbytes' own (``dequantize_4bit`` with the quant state's dtype set to
float32; ``int8_vectorwise_dequant``), which runs on CPU, so the float32 values are exactly
the reference's. bitsandbytes is imported only when a quantized base is read or a weight is
round-tripped through 4-bit (``merge_into=dequantized``); writing 4-bit does not import it
(``bnb_encode``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from lorasave.errors import CheckpointFormatError, UnsupportedModelError
from lorasave.formats.safetensors.header import TensorEntry
from lorasave.util.dtypes import ST_DTYPES, StDtype, nbytes
from lorasave.util.jsonio import decode_json

logger = logging.getLogger(__name__)

QUANT_STATE_RE = re.compile(r"^(?P<weight>.+)\.quant_state\.bitsandbytes__(?P<type>nf4|fp4)$")
AUX_4BIT = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
BNB_MISSING = "this needs bitsandbytes (it runs on CPU): pip install 'lorasave[bnb]' or pip install bitsandbytes"


def import_bnb() -> Any:
    """Import bitsandbytes (:func:`preload_bnb`), or explain how to get it.

    Raises:
        UnsupportedModelError: bitsandbytes is not installed.
    """
    bnb = preload_bnb()
    if bnb is None:
        raise UnsupportedModelError(BNB_MISSING)
    return bnb


def require_bnb() -> None:
    """Check that bitsandbytes is installed, without importing it (its import takes seconds).

    Raises:
        UnsupportedModelError: bitsandbytes is not installed.
    """
    if "bitsandbytes" not in sys.modules and importlib.util.find_spec("bitsandbytes") is None:
        raise UnsupportedModelError(BNB_MISSING)


def preload_bnb() -> Any | None:
    """Import bitsandbytes, if installed, with the ``kernels`` package hidden; None when it is not installed.

    bitsandbytes' CPU backend (0.50, on CPUs with AVX-512 BF16) calls ``kernels.get_kernel`` at import
    to download and load a compiled kernel from the Hugging Face Hub, and ``kernels`` is installed with
    transformers >= 5.25: lorasave never runs code it did not ship, so the import sees no ``kernels``
    (bitsandbytes then keeps its own CPU code, the reference lorasave is compared with). Called before
    anything that may import bitsandbytes first (transformers and PEFT loads); once imported, the
    module is reused.
    """
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    missing = object()
    saved = sys.modules.get("kernels", missing)
    sys.modules["kernels"] = None  # type: ignore[assignment]  # `from kernels import ...` raises ImportError
    try:
        import bitsandbytes
    except ImportError:
        return None
    finally:
        if saved is missing:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = saved  # type: ignore[assignment]
    return bitsandbytes


def quantization_config(config: dict[str, Any]) -> dict[str, Any] | None:
    """The ``quantization_config`` of a config.json, also when nested (``text_config``...)."""
    qc = config.get("quantization_config")
    if isinstance(qc, dict):
        return qc
    for v in config.values():
        if isinstance(v, dict) and isinstance(v.get("quantization_config"), dict):
            return v["quantization_config"]
    return None


@dataclass
class Bnb4bitWeight:
    """A 4-bit weight in a checkpoint: its entries and decoded quant state.

    Attributes:
        name: the weight's name (``<module>.weight``).
        packed: the entry of the packed codes.
        aux: entries of ``absmax``, ``quant_map``, ``nested_*`` and the quant-state blob, by suffix.
        state: the decoded quant-state JSON.
    """

    name: str
    packed: TensorEntry
    aux: dict[str, TensorEntry]
    state: dict[str, Any]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the dequantized weight."""
        return tuple(self.state["shape"])

    @property
    def dtype(self) -> StDtype:
        """dtype the weight had before quantization (the quant state's ``dtype``)."""
        return ST_DTYPES.get({"float16": "F16", "bfloat16": "BF16", "float32": "F32"}.get(self.state.get("dtype", ""), "BF16"), ST_DTYPES["BF16"])

    @property
    def nbytes(self) -> int:
        """Bytes the weight takes in the checkpoint (codes + statistics)."""
        return self.packed.nbytes + sum(e.nbytes for e in self.aux.values())

    def entries(self) -> list[TensorEntry]:
        """Every checkpoint entry of this weight."""
        return [self.packed, *self.aux.values()]


@dataclass
class Int8Weight:
    """An LLM.int8 weight: int8 codes and the row scales ``SCB``."""

    name: str
    codes: TensorEntry
    scb: TensorEntry
    extra: list[TensorEntry] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the weight."""
        return self.codes.shape

    @property
    def dtype(self) -> StDtype:
        """LLM.int8 weights dequantize to float16 in bitsandbytes' layers."""
        return ST_DTYPES["F16"]

    @property
    def nbytes(self) -> int:
        """Bytes in the checkpoint."""
        return self.codes.nbytes + self.scb.nbytes + sum(e.nbytes for e in self.extra)

    def entries(self) -> list[TensorEntry]:
        """Every checkpoint entry of this weight."""
        return [self.codes, self.scb, *self.extra]


QuantizedWeight = Bnb4bitWeight | Int8Weight


def group_quantized(tensors: dict[str, TensorEntry], read_bytes: Any) -> tuple[dict[str, QuantizedWeight], set[str]]:
    """Find bitsandbytes weights among a checkpoint's entries.

    Args:
        tensors: every entry of the checkpoint by name.
        read_bytes: ``entry -> bytes`` (used for the small quant-state JSON blobs).

    Returns:
        ``(weights by name, names of every entry they consume)``.

    Raises:
        CheckpointFormatError: a quant-state blob that is not a JSON object (``jsonio`` bounds).
    """
    weights: dict[str, QuantizedWeight] = {}
    used: set[str] = set()
    for key, entry in tensors.items():
        m = QUANT_STATE_RE.match(key)
        if not m or m["weight"] not in tensors:
            continue
        name = m["weight"]
        state = decode_json(bytes(read_bytes(entry)), f"{entry.file}: {key}", hint="re-download or re-quantize the model")
        if not isinstance(state, dict):
            raise CheckpointFormatError(f"{entry.file}: {key} is not a JSON object; re-download or re-quantize the model", path=entry.file)
        aux = {s: tensors[f"{name}.{s}"] for s in AUX_4BIT if f"{name}.{s}" in tensors}
        aux[f"quant_state.bitsandbytes__{m['type']}"] = entry
        weights[name] = Bnb4bitWeight(name, tensors[name], aux, state)
        used |= {name, *(e.name for e in aux.values())}
    for key, entry in tensors.items():
        if key.endswith(".SCB") and entry.dtype.name == "F32":
            module = key[: -len(".SCB")]
            name = f"{module}.weight"
            if name in tensors and tensors[name].dtype.name == "I8":
                extra = [tensors[f"{module}.weight_format"]] if f"{module}.weight_format" in tensors else []
                weights[name] = Int8Weight(name, tensors[name], entry, extra)
                used |= {name, key, *(e.name for e in extra)}
    return weights, used


def dequantize(weight: QuantizedWeight, read: Any) -> torch.Tensor:
    """Dequantize a bitsandbytes weight to float32 with bitsandbytes itself.

    Args:
        weight: the weight.
        read: ``entry -> tensor`` reading a whole entry.

    Returns:
        float32 tensor of ``weight.shape``: 4-bit ``dequantize_4bit`` with the quant state's
        dtype set to float32; 8-bit ``int8_vectorwise_dequant(CB, SCB)`` (``CB * SCB / 127``).
    """
    bnb = import_bnb()
    F = bnb.functional
    if isinstance(weight, Int8Weight):
        return F.int8_vectorwise_dequant(read(weight.codes), read(weight.scb)).to(torch.float32)
    qs_dict = {k: read(e) for k, e in weight.aux.items()}
    qs = F.QuantState.from_dict(qs_dict, device=torch.device("cpu"))
    qs.dtype = torch.float32
    packed = read(weight.packed).view(torch.uint8)  # quant_storage other than uint8 is a view of the same bytes
    return F.dequantize_4bit(packed, qs).reshape(weight.shape)


@dataclass(frozen=True)
class Bnb4bitSpec:
    """A 4-bit quantization: ``quant_type`` (nf4/fp4), ``blocksize`` (elements), double quant, input dtype.

    Source: bitsandbytes ``functional.quantize_4bit``; QLoRA (Dettmers et al. 2023, arXiv:2305.14314)
    defaults are nf4, blocksize 64, double quant, bfloat16 input.
    """

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    input_dtype: torch.dtype = torch.bfloat16

    @classmethod
    def from_quantization_config(cls, qc: dict[str, Any], state: dict[str, Any] | None = None) -> Bnb4bitSpec:
        """Read a transformers ``BitsAndBytesConfig`` dict (as saved in config.json).

        Args:
            qc: the ``quantization_config``.
            state: a quant-state JSON of one of the checkpoint's weights, when available: its
                ``dtype`` (what the weights were quantized from) and ``blocksize`` are the truth;
                ``bnb_4bit_compute_dtype`` is only the fallback for the input dtype.

        Raises:
            InvalidOptionError: an unknown dtype name.
        """
        from lorasave.errors import InvalidOptionError

        state = state or {}
        name = str(state.get("dtype") or qc.get("bnb_4bit_compute_dtype") or "bfloat16").removeprefix("torch.")
        dt = getattr(torch, name, None)
        if dt not in (torch.float16, torch.bfloat16, torch.float32):
            raise InvalidOptionError(f"quantization_config names dtype {name!r}; expected bfloat16, float16 or float32")
        return cls(
            quant_type=str(state.get("quant_type") or qc.get("bnb_4bit_quant_type", "nf4")),
            blocksize=int(state.get("blocksize") or qc.get("bnb_4bit_blocksize", 64) or 64),
            double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)),
            input_dtype=dt,
        )

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """``quantize_4bit`` of ``w`` as given (no dtype change): ``(packed uint8 (n/2, 1), QuantState)``.

        Bit-identical to bitsandbytes' ``functional.quantize_4bit`` on CPU, through lorasave's
        faster encoder (:func:`lorasave.formats.bnb_encode.quantize_4bit_state`).
        """
        from lorasave.formats.bnb_encode import quantize_4bit_state

        return quantize_4bit_state(w, self.blocksize, self.quant_type, self.double_quant)

    def roundtrip(self, w: torch.Tensor) -> torch.Tensor:
        """What a weight looked like to an adapter trained on its 4-bit version, in float32.

        ``dequantize_4bit(quantize_4bit(w.to(input_dtype)))`` with the state's dtype float32.
        """
        F = import_bnb().functional
        packed, qs = self.quantize(w.to(self.input_dtype).contiguous())
        qs.dtype = torch.float32
        return F.dequantize_4bit(packed, qs).reshape(w.shape)

    def serialized(self, name: str, w: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Quantize a float32 weight once and return the tensors transformers saves for it.

        Bit-identical to bitsandbytes' ``quantize_4bit`` + ``QuantState.as_dict(packed=True)``, without
        importing bitsandbytes (:func:`lorasave.formats.bnb_encode.serialize_4bit`).

        Args:
            name: the weight's name (``<module>.weight``).
            w: float32 weight ``(out, in)``.
            dtype: the dtype recorded in the quant state (what the layer dequantizes to).

        Returns:
            ``{name: packed uint8, name + ".absmax": ..., name + ".quant_state.bitsandbytes__nf4": ...}``.
        """
        from lorasave.formats.bnb_encode import serialize_4bit

        tensors = serialize_4bit(w.contiguous(), self.blocksize, self.quant_type, self.double_quant, dtype)
        return {f"{name}.{k}" if k else name: v for k, v in tensors.items()}

    def planned_shapes(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, tuple[StDtype, tuple[int, ...]]]:
        """Names, dtypes and shapes ``serialized`` will produce, known before quantizing.

        The quant-state blob's length depends on the float ``nested_offset``; it is estimated
        here, so shard sizes in the plan are exact up to a few bytes per weight.
        """
        n = 1
        for d in shape:
            n *= d
        blocks = -(-n // self.blocksize)
        out: dict[str, tuple[StDtype, tuple[int, ...]]] = {name: (ST_DTYPES["U8"], (-(-n // 2), 1))}
        out[f"{name}.absmax"] = (ST_DTYPES["U8"] if self.double_quant else ST_DTYPES["F32"], (blocks,))
        out[f"{name}.quant_map"] = (ST_DTYPES["F32"], (16,))
        state: dict[str, Any] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": str(dtype).removeprefix("torch."),
            "shape": list(shape),
        }
        if self.double_quant:
            out[f"{name}.nested_absmax"] = (ST_DTYPES["F32"], (-(-blocks // 256),))
            out[f"{name}.nested_quant_map"] = (ST_DTYPES["F32"], (256,))
            state.update(nested_blocksize=256, nested_dtype="float32", nested_offset=0.012345678901234567)
        out[f"{name}.quant_state.bitsandbytes__{self.quant_type}"] = (ST_DTYPES["U8"], (len(json.dumps(state)),))
        return out

    def quantization_config(self, compute_dtype: torch.dtype) -> dict[str, Any]:
        """``config.json``'s ``quantization_config`` as transformers writes it for this spec.

        ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=..., bnb_4bit_use_double_quant=...,
        bnb_4bit_compute_dtype=...).to_dict()``, spelled out so that writing does not import
        transformers (seconds); the tests compare it with transformers' own.
        """
        return {
            "quant_method": "bitsandbytes",
            "_load_in_8bit": False,
            "_load_in_4bit": True,
            "llm_int8_threshold": 6.0,
            "llm_int8_skip_modules": None,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "bnb_4bit_quant_type": self.quant_type,
            "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": str(compute_dtype).split(".")[1],
            "bnb_4bit_quant_storage": "uint8",
            "load_in_4bit": True,
            "load_in_8bit": False,
        }

    @property
    def label(self) -> str:
        """Short description, e.g. ``"nf4 4-bit"``."""
        return f"{self.quant_type} 4-bit"

    def describe(self) -> dict[str, Any]:
        """JSON form for the manifest."""
        return {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "double_quant": self.double_quant,
            "input_dtype": str(self.input_dtype).removeprefix("torch."),
        }


def nbytes_of(dtype: StDtype, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor (re-exported for planners)."""
    return nbytes(dtype, shape)
