"""FP8 base checkpoints (transformers' fine-grained FP8, ``quant_method: "fp8"``): detect and dequantize to float32.

Layout (transformers ``integrations/finegrained_fp8.py``: ``FP8Linear``, ``FP8Experts``, ``Fp8Quantize``;
the DeepSeek-V3 / Qwen3-FP8 releases): a quantized tensor ``N`` is float8_e4m3fn ``(..., out, in)``
with ``N + "_scale_inv"`` beside it (``<module>.weight`` -> ``<module>.weight_scale_inv``; fused
experts ``gate_up_proj`` -> ``gate_up_proj_scale_inv``), a multiplier despite its name:

- block scales ``(..., ceil(out/bm), ceil(in/bn))`` with ``weight_block_size: [bm, bn]`` (float32, or
  with ``scale_fmt: "ue8m0"`` power-of-two exponents stored as float8_e8m0fnu or uint8);
  partial blocks at the edges are allowed (DeepSeek-V3's ``kv_a_proj_with_mqa`` has 576 rows);
- one scale for the whole tensor (``weight_block_size: null``: ``FP8Linear`` holds a 0-d scale);
- any other grid that tiles the tensor evenly, e.g. one scale per output channel ``(out, 1)``,
  read as transformers' load-time dequantization reads it (the block is ``rows // scale_rows``);
- ``<module>.activation_scale`` / ``input_scale`` (static activation scheme): belong to the FP8
  matmul and are dropped from a 16-bit output.

Anything else (a scale of another shape or dtype, an FP8 tensor without a scale, a scale without an
FP8 tensor) is refused with one line naming the tensor (:class:`~lorasave.errors.QuantizedBaseError`).

Dequantization is transformers' ``Fp8Dequantize._dequantize_one`` (what ``from_pretrained`` runs on a
CPU, where FP8 models are always dequantized): FP8 values and scales upcast to float32 and multiplied,
one float32 product per element (ue8m0 bytes are ``2 ** (b - 127)``). transformers derives the block
from the grid, which equals ``weight_block_size`` whenever the blocks tile the tensor; on partial edge
blocks it would stretch them, so lorasave takes the config's block there, as DeepSeek-V3's own
``weight_dequant`` kernel and transformers' ``_dequantize_fp8_weight`` (its FP8 backward pass) do.
The formula is restated here rather than imported: the merge path does not import transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorasave.errors import QuantizedBaseError
from lorasave.formats.safetensors.header import TensorEntry
from lorasave.util.dtypes import ST_DTYPES, StDtype

#: safetensors dtypes of FP8 values.
FP8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2"})
#: safetensors dtypes a scale may have (U8 / F8_E8M0 only as ue8m0 exponents).
SCALE_DTYPES = frozenset({"F32", "BF16", "F16", "F8_E8M0", "U8"})
SCALE_SUFFIX = "_scale_inv"
#: Activation scales of the static scheme (transformers ``activation_scale``; ``input_scale`` in some exports).
ACTIVATION_SUFFIXES = ("activation_scale", "input_scale", "input_zero_point")


@dataclass
class Fp8Weight:
    """An FP8 tensor of a checkpoint with its scales, standing for its dequantized value.

    Attributes:
        name: the tensor's name (``<module>.weight``, or a fused experts parameter).
        weight: the FP8 values.
        scale: the ``_scale_inv`` tensor.
        block: elements each scale covers along the last two dimensions ``(rows, cols)``.
        out_dtype: the 16-bit dtype the model computes in (config.json's ``dtype``).
        extra: activation scales of the same module, dropped from 16-bit outputs.
    """

    name: str
    weight: TensorEntry
    scale: TensorEntry
    block: tuple[int, int]
    out_dtype: StDtype
    extra: list[TensorEntry] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the tensor (the FP8 values' shape)."""
        return self.weight.shape

    @property
    def dtype(self) -> StDtype:
        """The dtype the model computes in (what a 16-bit output keeps)."""
        return self.out_dtype

    @property
    def nbytes(self) -> int:
        """Bytes in the checkpoint (values, scales, activation scales)."""
        return sum(e.nbytes for e in self.entries())

    @property
    def per_tensor(self) -> bool:
        """One scale for the whole tensor."""
        return math.prod(self.scale.shape) == 1

    def entries(self) -> list[TensorEntry]:
        """Every checkpoint entry of this tensor."""
        return [self.weight, self.scale, *self.extra]

    def dequantize(self, read: Any) -> torch.Tensor:
        """float32 values: ``read`` is ``entry -> tensor`` reading a whole entry."""
        return dequantize_fp8(read(self.weight), read(self.scale), self.block)


def scale_float32(scale: torch.Tensor) -> torch.Tensor:
    """Scales as float32: ue8m0 bytes (uint8) are ``2 ** (b - 127)``, as transformers reads them."""
    if scale.dtype == torch.uint8:
        return (scale.to(torch.float32) - 127.0).exp2()
    return scale.to(torch.float32)


def dequantize_fp8(values: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``values * scale`` in float32, each scale applied to its ``block`` of the last two dimensions.

    Args:
        values: FP8 ``(..., rows, cols)``.
        scale: one element, or ``(..., ceil(rows / block[0]), ceil(cols / block[1]))``.
        block: elements per scale along rows and columns (partial blocks at the edges).

    Returns:
        float32 tensor shaped like ``values``.
    """
    q = values.to(torch.float32)
    s = scale_float32(scale)
    if s.numel() == 1:
        return q.mul_(s.reshape(()))
    rows, cols = q.shape[-2:]
    s = s.repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)[..., :cols]
    return q.mul_(s)


def _where(e: TensorEntry) -> Path:
    return Path(e.file)


def scale_grid(weight: TensorEntry, scale: TensorEntry, block_size: tuple[int, int] | None) -> tuple[int, int]:
    """The block each element of ``scale`` covers in ``weight`` (see the module docstring).

    Raises:
        QuantizedBaseError: a shape that is no scale layout lorasave reads.
    """
    shape, sshape = weight.shape, scale.shape
    if len(shape) >= 2:
        rows, cols = shape[-2:]
        if math.prod(sshape) == 1:
            return rows, cols
        if len(sshape) == len(shape) and tuple(sshape[:-2]) == tuple(shape[:-2]):
            a, b = sshape[-2:]
            if block_size is not None and (a, b) == (-(-rows // block_size[0]), -(-cols // block_size[1])):
                return block_size
            if a and b and rows % a == 0 and cols % b == 0:
                return rows // a, cols // b
    blocks = f"weight_block_size {list(block_size)}" if block_size else "no weight_block_size"
    raise QuantizedBaseError(
        f"{_where(scale)}: scale tensor {scale.name!r} has shape {list(sshape)} for {weight.name!r} of shape {list(shape)} ({blocks}); "
        "lorasave reads one scale per tensor, per block of weight_block_size, or a grid that tiles the tensor evenly: "
        "re-export the checkpoint, or merge into its 16-bit original",
        path=_where(scale),
        tensor=scale.name,
    )


def _block_size(qc: dict[str, Any], where: Path) -> tuple[int, int] | None:
    bs = qc.get("weight_block_size")
    if bs is None:
        return None
    if not isinstance(bs, (list, tuple)) or len(bs) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in bs):
        raise QuantizedBaseError(f"{where}: quantization_config.weight_block_size is {bs!r}; expected two positive integers such as [128, 128]", path=where)
    return int(bs[0]), int(bs[1])


def group_fp8(
    tensors: dict[str, TensorEntry], qc: dict[str, Any], out_dtype: StDtype, where: Path, suffix: str = SCALE_SUFFIX
) -> tuple[dict[str, Fp8Weight], set[str]]:
    """Find the FP8 tensors of a ``quant_method: "fp8"`` checkpoint with their scales.

    Args:
        tensors: every entry of the checkpoint by name.
        qc: config.json's ``quantization_config`` (``weight_block_size``, ``scale_fmt``; for a
            compressed-tensors base, its FP8 layout as ``formats.fp8_compressed`` normalizes it).
        out_dtype: the dtype the model computes in.
        where: config.json (named in errors about the config).
        suffix: the scale's name is the FP8 tensor's plus this (``_scale_inv``; ``_scale`` for compressed-tensors).

    Returns:
        ``(FP8 tensors by name, names of every entry they consume)``; orphan activation scales are
        consumed too (they mean nothing without an FP8 matmul).

    Raises:
        QuantizedBaseError: an FP8 tensor without its ``_scale_inv``, a scale of an unknown shape or
            dtype, a ``_scale_inv`` with no FP8 tensor, or no FP8 tensor at all.
    """
    block_size = _block_size(qc, where)
    ue8m0 = qc.get("scale_fmt") == "ue8m0"
    weights: dict[str, Fp8Weight] = {}
    used: set[str] = set()
    for name, e in tensors.items():
        if e.dtype.name not in FP8_DTYPES:
            continue
        skey = name + suffix
        s = tensors.get(skey)
        if s is None:
            raise QuantizedBaseError(
                f"{_where(e)}: tensor {name!r} is stored as {e.dtype.name} but has no {skey!r} beside it; lorasave reads FP8 tensors only "
                "with their scales: re-export the checkpoint, or merge into its 16-bit original",
                path=_where(e),
                tensor=name,
            )
        if s.dtype.name not in SCALE_DTYPES or (s.dtype.name == "U8" and not ue8m0):
            raise QuantizedBaseError(
                f"{_where(s)}: scale tensor {skey!r} is stored as {s.dtype.name}; lorasave reads FP8 scales stored as F32, BF16, F16, "
                "or ue8m0 exponents (F8_E8M0, or U8 with scale_fmt 'ue8m0')",
                path=_where(s),
                tensor=skey,
            )
        block = scale_grid(e, s, block_size)
        stem = name.removesuffix("weight") if name.endswith(".weight") else name + "_"
        extra = [tensors[x] for x in (*(stem + a for a in ACTIVATION_SUFFIXES), name + "_zero_point") if x in tensors]
        weights[name] = Fp8Weight(name, e, s, block, out_dtype, extra)
        used |= {name, skey, *(x.name for x in extra)}
    for name, e in tensors.items():
        if name.endswith(suffix) and not name.endswith(ACTIVATION_SUFFIXES) and name not in used:
            target = name.removesuffix(suffix)
            raise QuantizedBaseError(
                f"{_where(e)}: scale tensor {name!r} has no FP8 tensor {target!r} beside it"
                f"{f' ({target!r} is stored as ' + tensors[target].dtype.name + ')' if target in tensors else ''}; "
                "lorasave will not guess what it scales: re-export the checkpoint, or merge into its 16-bit original",
                path=_where(e),
                tensor=name,
            )
        if name.endswith(ACTIVATION_SUFFIXES) and e.dtype.name in ("F32", "BF16", "F16") and len(e.shape) <= 1:
            used.add(name)
    if not weights:
        raise QuantizedBaseError(
            f"{where} declares FP8 quantization (quant_method {qc.get('quant_method', 'fp8')!r}), but no tensor of the checkpoint is FP8 with a {suffix} scale "
            "beside it; fix config.json or re-download the model",
            path=where,
        )
    return weights, used


def compute_dtype(config: dict[str, Any]) -> StDtype:
    """The 16-bit dtype a quantized model computes in: config.json's ``dtype`` / ``torch_dtype``, else bfloat16."""
    name = config.get("dtype") or config.get("torch_dtype")
    if not isinstance(name, str) and isinstance(config.get("text_config"), dict):
        name = config["text_config"].get("dtype") or config["text_config"].get("torch_dtype")
    st = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(str(name).removeprefix("torch."), "BF16")
    return ST_DTYPES[st]


@dataclass(frozen=True)
class Fp8BlockSpec:
    """``--save-method fp8_block`` on a block-scaled FP8 base: its own layout kept.

    Tensors no adapter changes are copied as they are (FP8 values and ``_scale_inv``, byte for byte);
    a merged one is re-quantized the way ``formats.compressed``'s ``fp8_block`` quantizes a 16-bit weight
    (llm-compressor's ``oneshot`` with the ``FP8_BLOCK`` preset: the merge rounded to the output dtype,
    min-max over each block, compressed-tensors' ``calculate_qparams`` and compressor), with the base's
    block size, its scale written as ``<name>_scale_inv`` in the base's scale dtype (float32: exact).
    ``config.json`` keeps the base's ``quantization_config``.

    Attributes:
        block: the base's ``weight_block_size``.
        scale_dtype: safetensors dtype of the base's scales.
        quantization: the base's ``quantization_config`` (JSON).
    """

    block: tuple[int, int]
    scale_dtype: str
    quantization: str
    scale_suffix: str = SCALE_SUFFIX
    base_layout = True

    def _scheme_spec(self) -> Any:
        from lorasave.formats.compressed import CompressedSpec

        spec = CompressedSpec("fp8_block")
        scheme = spec.scheme
        weights = scheme.weights.model_copy(update={"block_structure": list(self.block)})
        spec.__dict__["scheme"] = scheme.model_copy(update={"weights": weights})  # the cached_property, with the base's block
        return spec

    def serialized(self, name: str, w: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The merged float32 tensor ``(..., out, in)`` as FP8 values ``name`` and block scales ``name_scale_inv``."""
        spec = self._scheme_spec()
        flat = w.reshape(-1, *w.shape[-2:])
        values, scales = [], []
        for m in flat:  # one 2-D weight at a time (fused experts: each expert)
            out = spec.serialized("w.weight", m, dtype)
            values.append(out["w.weight"])
            scales.append(out["w.weight_scale"])
        sdt = ST_DTYPES[self.scale_dtype].torch_dtype
        v = torch.stack(values).reshape(w.shape)
        s = torch.stack(scales).reshape(*w.shape[:-2], *scales[0].shape).to(sdt)
        return {name: v.contiguous(), name + self.scale_suffix: s.contiguous()}

    def planned_shapes(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, tuple[StDtype, tuple[int, ...]]]:
        """Names, dtypes and shapes :meth:`serialized` produces."""
        grid = (-(-shape[-2] // self.block[0]), -(-shape[-1] // self.block[1]))
        return {name: (ST_DTYPES["F8_E4M3"], tuple(shape)), name + self.scale_suffix: (ST_DTYPES[self.scale_dtype], (*shape[:-2], *grid))}

    def quantization_config(self, compute_dtype: torch.dtype) -> dict[str, Any]:
        """The base's ``quantization_config``."""
        import json

        return dict(json.loads(self.quantization))

    def describe(self) -> dict[str, Any]:
        """JSON form for the manifest."""
        return {"format": "fp8 (the base's layout)", "weight_block_size": list(self.block), "scale_dtype": self.scale_dtype}

    @property
    def label(self) -> str:
        """Short description."""
        return f"FP8 {self.block[0]}x{self.block[1]} blocks (the base's layout)"


def fp8_block_spec(weights: dict[str, Any], qc: dict[str, Any], where: Path, layout: dict[str, Any] | None = None) -> tuple[Fp8BlockSpec, set[str]]:
    """The ``fp8_block`` output of an FP8 base, and the names of the tensors it writes as FP8.

    Raises:
        QuantizedBaseError: the base is not block-scaled (``weight_block_size`` null), its activation
            scales are static (they would need calibration again), or its scales differ in dtype.

    ``layout``: a compressed-tensors base's FP8 layout (``formats.fp8_compressed``); ``qc`` is then written back as it is.
    """
    import json

    src = layout if layout is not None else qc
    block = _block_size(src, where)
    if block is None:
        raise QuantizedBaseError(
            f"{where}: --save-method fp8_block keeps a block-scaled FP8 base's layout, and this base has no weight_block_size "
            "(per-tensor or per-channel scales); use merged_16bit, or fp8_dynamic for per-channel compressed-tensors weights",
            path=where,
        )
    if str(src.get("activation_scheme", "dynamic")).lower() != "dynamic":
        raise QuantizedBaseError(
            f"{where}: the base's FP8 activation scales are static (activation_scheme {src.get('activation_scheme')!r}); they would have to be "
            "calibrated again for the merged model, which lorasave does not do: use merged_16bit",
            path=where,
        )
    bh, bw = block
    chosen = {n for n, w in weights.items() if isinstance(w, Fp8Weight) and tuple(w.scale.shape[-2:]) == (-(-w.shape[-2] // bh), -(-w.shape[-1] // bw))}
    dtypes = {weights[n].scale.dtype.name for n in chosen}
    if len(dtypes) > 1 or dtypes & {"U8", "F8_E8M0"}:
        raise QuantizedBaseError(
            f"{where}: the base's FP8 scales are {', '.join(sorted(dtypes))}; --save-method fp8_block re-quantizes with float scales only: use merged_16bit",
            path=where,
        )
    suffix = str(src.get("scale_suffix", SCALE_SUFFIX))
    return Fp8BlockSpec(block, dtypes.pop() if dtypes else "F32", json.dumps(qc, sort_keys=True), suffix), chosen
