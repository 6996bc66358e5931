"""gpt-oss MXFP4 experts (``quant_method: "mxfp4"``): detect, dequantize to float32, quantize back.

Layout (OpenAI's gpt-oss releases; transformers ``integrations/mxfp4.py``): a fused experts parameter
``P`` (``mlp.experts.gate_up_proj`` (E, hidden, 2·inter) / ``down_proj`` (E, inter, hidden) at run time)
is stored as ``P_blocks`` uint8 ``(E, out, in/32, 16)`` (two FP4 E2M1 codes per byte, the low nibble
first: 32 values along the input dimension per row of blocks) and ``P_scales`` uint8 ``(E, out, in/32)``
(E8M0 exponents, value ``2 ** (s - 127)``): the OCP Microscaling (MX v1.0) MXFP4 format, blocks of 32
along the contraction dimension.

Dequantization is transformers' ``convert_moe_packed_tensors`` (what ``from_pretrained`` runs on CPU,
where MXFP4 is always dequantized) in float32: each code looked up in the E2M1 table, times
``2 ** (s - 127)`` (``ldexp``, exact), rows then transposed to the run-time ``(E, in, out)``.

Quantization (``--save-method mxfp4``) is the one transformers' ``Mxfp4Quantize`` calls,
``quantize_to_mxfp4``: the weight rounded to bfloat16, then triton_kernels'
``numerics_details.mxfp.downcast_to_mxfp_torch`` (its torch reference, default ``ROUND_UP``): per block
of 32 the scale is ``amax / 6`` rounded up to a power of two (on its float32 bits), each value times
the scale's reciprocal converted to E2M1 by its bit arithmetic, which rounds to nearest with ties away
from zero and saturates at 6. triton_kernels is fetched from the Hub at run time by transformers and
cannot be installed here, so that function is restated below (not imported) and cited; the tests
check it against an independent value-level statement of the same rules and against transformers'
dequantization.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorasave.errors import QuantizedBaseError
from lorasave.formats.safetensors.header import TensorEntry
from lorasave.util.dtypes import ST_DTYPES, StDtype

#: E2M1 values of codes 0..15 (sign in bit 3), transformers ``integrations.mxfp4.FP4_VALUES``.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32  # values per scale (OCP MX)
BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"
#: gpt-oss's own ``quantization_config`` (openai/gpt-oss-20b config.json).
GPT_OSS_QUANTIZATION = {
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    "quant_method": "mxfp4",
}


@dataclass
class Mxfp4Weight:
    """A fused experts parameter stored as MXFP4 blocks and scales, standing for its run-time value.

    Attributes:
        name: the run-time parameter (``...mlp.experts.gate_up_proj``).
        blocks: ``name + "_blocks"`` (E, out, in/32, 16) uint8.
        scales: ``name + "_scales"`` (E, out, in/32) uint8.
        out_dtype: the dtype the model computes in.
    """

    name: str
    blocks: TensorEntry
    scales: TensorEntry
    out_dtype: StDtype

    @property
    def shape(self) -> tuple[int, ...]:
        """Run-time shape ``(E, in, out)``."""
        e, out, groups, _ = self.blocks.shape
        return (e, groups * BLOCK, out)

    @property
    def dtype(self) -> StDtype:
        """The dtype the model computes in."""
        return self.out_dtype

    @property
    def nbytes(self) -> int:
        """Bytes in the checkpoint."""
        return self.blocks.nbytes + self.scales.nbytes

    def entries(self) -> list[TensorEntry]:
        """Every checkpoint entry of this parameter."""
        return [self.blocks, self.scales]

    def dequantize(self, read: Any) -> torch.Tensor:
        """float32 ``(E, in, out)``: ``read`` is ``entry -> tensor`` reading a whole entry."""
        return dequantize_mxfp4(read(self.blocks), read(self.scales))


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``(E, out, G, 16)`` codes and ``(E, out, G)`` exponents -> float32 ``(E, G*32, out)`` (transformers' layout)."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    b = blocks.view(torch.uint8)
    vals = torch.stack((lut[(b & 0x0F).long()], lut[(b >> 4).long()]), dim=-1)  # (E, out, G, 16, 2): low nibble first
    vals = vals.reshape(*b.shape[:-1], 2 * b.shape[-1])  # (E, out, G, 32)
    vals = torch.ldexp(vals, (scales.view(torch.uint8).to(torch.int32) - 127).unsqueeze(-1))
    return vals.reshape(*b.shape[:-2], -1).transpose(1, 2).contiguous()


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A run-time ``(E, in, out)`` parameter -> ``(blocks (E, out, in/32, 16), scales (E, out, in/32))`` uint8.

    ``quantize_to_mxfp4`` of transformers (``downcast_to_mxfp_torch(w.to(bfloat16), uint8, ...)``, ROUND_UP
    scales), restated: see the module docstring. ``in`` must be a multiple of 32.
    """
    x = w.to(torch.bfloat16).to(torch.float32).transpose(1, 2).contiguous()  # (E, out, in): blocks along `in`
    groups = x.unflatten(-1, (-1, BLOCK))  # (E, out, G, 32)
    amax = groups.abs().amax(dim=-1, keepdim=True)
    scale_bits = ((amax / 6.0).view(torch.int32) + 0x007FFFFF) & 0x7F800000  # amax/6 rounded up to a power of two
    scale = scale_bits.view(torch.float32)
    inv = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)
    q = (groups * inv).view(torch.int32)
    sign = (q >> 28) & 0x8  # the float's sign bit as bit 3 of the code
    exp = (q >> 23) & 0xFF
    man = q & 0x007FFFFF
    # below 1.0 the value is an E2M1 subnormal (or rounds to 0 / 0.5): align the mantissa with the implicit one
    shift = (126 - exp).clamp(min=0, max=31)
    man = torch.where(exp < 127, ((0x00400000 | (man >> 1)) >> shift), man)
    e2 = exp.clamp(min=126) - 126
    code = ((((e2 << 2) | (man >> 21)) + 1) >> 1).clamp(max=7) | sign
    code = code.to(torch.uint8).reshape(*x.shape[:-1], -1, BLOCK)  # (E, out, G, 32)
    packed = code[..., 0::2] | (code[..., 1::2] << 4)  # low nibble: even element
    return packed.contiguous(), (scale_bits >> 23).to(torch.uint8).squeeze(-1).contiguous()


def group_mxfp4(tensors: dict[str, TensorEntry], out_dtype: StDtype, where: Path) -> tuple[dict[str, Mxfp4Weight], set[str]]:
    """Find the ``_blocks`` / ``_scales`` pairs of an MXFP4 checkpoint.

    Raises:
        QuantizedBaseError: a ``_blocks`` without ``_scales`` (or the reverse), shapes or dtypes that are not
            gpt-oss's layout, or no pair at all.
    """
    weights: dict[str, Mxfp4Weight] = {}
    used: set[str] = set()
    for name, e in tensors.items():
        if not name.endswith((BLOCKS_SUFFIX, SCALES_SUFFIX)):
            continue
        param = name.removesuffix(BLOCKS_SUFFIX) if name.endswith(BLOCKS_SUFFIX) else name.removesuffix(SCALES_SUFFIX)
        b, s = tensors.get(param + BLOCKS_SUFFIX), tensors.get(param + SCALES_SUFFIX)
        if b is None or s is None:
            other = param + (SCALES_SUFFIX if b is not None else BLOCKS_SUFFIX)
            raise QuantizedBaseError(
                f"{e.file}: {name!r} has no {other!r} beside it; lorasave reads MXFP4 tensors only as gpt-oss stores them "
                "(_blocks and _scales): re-download the model, or merge into a 16-bit copy",
                path=e.file,
                tensor=name,
            )
        ok = b.dtype.name == "U8" and s.dtype.name == "U8" and len(b.shape) == 4 and b.shape[-1] == BLOCK // 2 and tuple(b.shape[:-1]) == tuple(s.shape)
        if not ok:
            raise QuantizedBaseError(
                f"{b.file}: {b.name!r} {b.dtype.name}{list(b.shape)} with {s.name!r} {s.dtype.name}{list(s.shape)} is not gpt-oss's MXFP4 layout "
                "(U8 (experts, out, in/32, 16) blocks with U8 (experts, out, in/32) scales); lorasave does not read it",
                path=b.file,
                tensor=b.name,
            )
        weights[param] = Mxfp4Weight(param, b, s, out_dtype)
        used |= {b.name, s.name}
    if not weights:
        raise QuantizedBaseError(
            f"{where} declares MXFP4 quantization (quant_method 'mxfp4'), but the checkpoint has no _blocks / _scales tensors; "
            "fix config.json (a 16-bit gpt-oss needs no quantization_config) or re-download the model",
            path=where,
        )
    return weights, used


@dataclass(frozen=True)
class Mxfp4Spec:
    """``--save-method mxfp4``: gpt-oss's fused experts written as MXFP4 ``_blocks`` / ``_scales``, the rest 16-bit.

    Attributes:
        quantization: the output's ``quantization_config`` (the base's, or gpt-oss's own).
    """

    quantization: str = json.dumps(GPT_OSS_QUANTIZATION, sort_keys=True)
    base_layout = True

    def serialized(self, name: str, w: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The merged float32 run-time parameter ``(E, in, out)`` as ``name_blocks`` / ``name_scales``."""
        blocks, scales = quantize_mxfp4(w)
        return {name + BLOCKS_SUFFIX: blocks, name + SCALES_SUFFIX: scales}

    def planned_shapes(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, tuple[StDtype, tuple[int, ...]]]:
        """Names, dtypes and shapes :meth:`serialized` produces for a ``(E, in, out)`` parameter."""
        e, n_in, out = shape
        u8 = ST_DTYPES["U8"]
        return {name + BLOCKS_SUFFIX: (u8, (e, out, n_in // BLOCK, BLOCK // 2)), name + SCALES_SUFFIX: (u8, (e, out, n_in // BLOCK))}

    @staticmethod
    def quantizable(name: str, shape: tuple[int, ...]) -> bool:
        """A gpt-oss fused experts weight whose input size is a multiple of 32."""
        return name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")) and len(shape) == 3 and shape[1] % BLOCK == 0

    def quantization_config(self, compute_dtype: torch.dtype) -> dict[str, Any]:
        """The output's ``quantization_config``."""
        return dict(json.loads(self.quantization))

    def describe(self) -> dict[str, Any]:
        """JSON form for the manifest."""
        return {"format": "mxfp4", "quantization_config": self.quantization_config(torch.bfloat16)}

    @property
    def label(self) -> str:
        """Short description."""
        return "gpt-oss MXFP4 experts"
