"""compressed-tensors checkpoints (vLLM / SGLang's quantized format) written from the float32 merge, data-free.

The save methods are compressed-tensors' own preset schemes (``quantization/quant_scheme.py``) that
need no calibration data, applied to every ``nn.Linear`` but ``lm_head`` (``targets=["Linear"]``,
``ignore=["lm_head"]``: llm-compressor's data-free recipes, ``QuantizationModifier(scheme=...)``):

=============  ===========  =========================================================================
save method    preset       stored per quantized ``<module>``
=============  ===========  =========================================================================
fp8_dynamic    FP8_DYNAMIC  ``weight`` float8_e4m3fn (out, in); ``weight_scale`` (out, 1)
fp8_block      FP8_BLOCK    ``weight`` float8_e4m3fn (out, in); ``weight_scale`` (⌈out/128⌉, ⌈in/128⌉)
w8a16          W8A16        ``weight_packed`` int32 (out, in/4); ``weight_scale`` (out, in/128); ``weight_shape``
w4a16          W4A16        ``weight_packed`` int32 (out, in/8); ``weight_scale`` (out, in/128); ``weight_shape``
w8a8           W8A8         ``weight`` int8 (out, in); ``weight_scale`` (out, 1)
nvfp4a16       NVFP4A16     ``weight_packed`` uint8 (out, in/2); ``weight_scale`` float8_e4m3fn (out, in/16);
                            ``weight_global_scale`` float32 (1,)
mxfp4a16       MXFP4A16     ``weight_packed`` uint8 (out, in/2); ``weight_scale`` uint8 E8M0 (out, in/32)
=============  ===========  =========================================================================

Scales are in the output dtype (bfloat16 for a bfloat16 output) unless the preset fixes their dtype.
The activation presets of the 8-bit schemes are dynamic (computed by the engine at run time).
``NVFP4`` / ``MXFP4`` with quantized activations and ``FP8`` (static activation scales) need
calibration data and are not offered.

Per weight, as llm-compressor's ``oneshot`` does for these presets: the merged weight is rounded to
the output dtype, observed by a memoryless min-max observer over the scheme's strategy (the reshape
of llm-compressor ``observers/helpers.flatten_for_calibration``, then ``amin`` / ``amax``; compressed-
tensors 0.20 has no observers), its scale computed by compressed-tensors' ``calculate_qparams``
(with ``generate_gparam`` over the fused q/k/v and gate/up weights for NVFP4's global scale, llm-
compressor ``FUSED_LAYER_NAMES``), and the weight quantized and packed by the format's compressor
(``BaseCompressor.compress``). ``config.json``'s ``quantization_config`` is compressed-tensors'
``QuantizationConfig`` written by its ``ModelCompressor.update_config``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from lorasave.errors import UnsupportedModelError
from lorasave.util.dtypes import StDtype, st_dtype

logger = logging.getLogger(__name__)

#: save method -> compressed-tensors preset scheme name.
SAVE_METHODS: dict[str, str] = {
    "fp8_dynamic": "FP8_DYNAMIC",
    "fp8_block": "FP8_BLOCK",
    "w8a16": "W8A16",
    "w4a16": "W4A16",
    "w8a8": "W8A8",
    "nvfp4a16": "NVFP4A16",
    "mxfp4a16": "MXFP4A16",
}
#: Presets that need calibration data (static activation scales), not offered.
NEEDS_CALIBRATION = ("FP8", "NVFP4", "MXFP4")
#: Layers sharing one NVFP4 global scale (llm-compressor ``observers/helpers.FUSED_LAYER_NAMES``:
#: vLLM fuses them into one matmul).
FUSED_LAYER_NAMES = (("gate_proj", "up_proj"), ("q_proj", "k_proj", "v_proj"), ("q_a_proj", "kv_a_proj_with_mqa"), ("w1", "w3"))
#: Linear layers llm-compressor's MoE examples leave unquantized (routers): ``re:.*mlp.gate$`` and kin.
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


def import_compressed_tensors() -> Any:
    """Import compressed_tensors, or explain how to get it.

    Raises:
        UnsupportedModelError: the package is not installed.
    """
    try:
        import compressed_tensors
    except ImportError:
        raise UnsupportedModelError(
            "this save method writes compressed-tensors checkpoints and needs the compressed-tensors package: pip install 'lorasave[serve]'"
        ) from None
    return compressed_tensors


@dataclass(frozen=True)
class CompressedSpec:
    """One data-free compressed-tensors scheme applied to the Linear weights of an output.

    Attributes:
        save_method: a key of :data:`SAVE_METHODS`.
        ignore: the Linear modules left in 16-bit (``quantization_config.ignore``), set by the plan.
    """

    save_method: str
    ignore: tuple[str, ...] = ("lm_head",)

    @cached_property
    def scheme(self) -> Any:
        """compressed-tensors ``QuantizationScheme`` of the preset, targets ``["Linear"]``, its format set."""
        import_compressed_tensors()
        from compressed_tensors.compressors.format import infer_module_format
        from compressed_tensors.quantization import preset_name_to_scheme

        scheme = preset_name_to_scheme(SAVE_METHODS[self.save_method], ["Linear"])
        scheme.format = infer_module_format(torch.nn.Linear, scheme)
        return scheme

    @cached_property
    def compressor(self) -> Any:
        """The format's compressor class (``BaseCompressor`` registry)."""
        from compressed_tensors.compressors import BaseCompressor

        return BaseCompressor.get_value_from_registry(self.scheme.format.value)

    @property
    def group_size(self) -> int | None:
        """Elements per scale along a row for group strategies, else None."""
        return self.scheme.weights.group_size

    def quantizable(self, shape: Sequence[int]) -> bool:
        """Whether a 2-D weight of ``shape`` (out, in) fits the scheme (group strategies: ``in`` divisible by the group)."""
        if len(shape) != 2:
            return False
        gs = self.group_size
        return gs is None or shape[1] % gs == 0

    def observe(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Memoryless min-max over the scheme's strategy: ``(min, max)`` shaped like the scales, ``w``'s dtype.

        The reshape is llm-compressor's ``flatten_for_calibration`` for weights (block: zero-padded
        with compressed-tensors' ``maybe_pad_tensor_for_block_quant``), reduced over its last axis.
        """
        from compressed_tensors.quantization import QuantizationStrategy as S
        from compressed_tensors.quantization.utils import maybe_pad_tensor_for_block_quant

        args = self.scheme.weights
        if args.strategy == S.CHANNEL:
            v = w.unsqueeze(-2)  # (out, 1, in)
        elif args.strategy in (S.GROUP, S.TENSOR_GROUP):
            v = w.unflatten(-1, (-1, args.group_size))  # (out, in/g, g)
        elif args.strategy == S.BLOCK:
            bh, bw = args.block_structure
            p = maybe_pad_tensor_for_block_quant(w, tuple(args.block_structure))
            v = p.reshape(p.shape[0] // bh, bh, p.shape[1] // bw, bw).transpose(1, 2).flatten(-2, -1)
        elif args.strategy == S.TENSOR:
            v = w.reshape(1, 1, -1)
        else:
            raise ValueError(f"weight strategy {args.strategy} is not data-free")
        return torch.amin(v, dim=-1), torch.amax(v, dim=-1)

    def global_scale(self, weights: Iterable[torch.Tensor]) -> torch.Tensor | None:
        """NVFP4's per-tensor scale over fused weights (each already in the output dtype), or None.

        ``generate_gparam(-absmax, absmax)`` with absmax the largest ``|w|`` over all of ``weights``
        (each observed as in :meth:`observe`), as llm-compressor's fused observers compute it.
        """
        from compressed_tensors.quantization import QuantizationStrategy as S
        from compressed_tensors.quantization.utils import generate_gparam

        if self.scheme.weights.strategy != S.TENSOR_GROUP:
            return None
        absmax: torch.Tensor | None = None
        for w in weights:
            mn, mx = self.observe(w)
            m = torch.max(-mn.min(), mx.max())
            absmax = m if absmax is None else torch.max(absmax, m)
        assert absmax is not None
        return generate_gparam(-absmax.reshape(1), absmax.reshape(1))

    def fusion_groups(self, modules: Iterable[str]) -> list[tuple[str, ...]]:
        """Groups of quantized modules that share an NVFP4 global scale (empty for other schemes)."""
        from compressed_tensors.quantization import QuantizationStrategy as S

        if self.scheme.weights.strategy != S.TENSOR_GROUP:
            return []
        present = set(modules)
        groups = []
        for m in sorted(present):
            parent, _, leaf = m.rpartition(".")
            for names in FUSED_LAYER_NAMES:
                if leaf == names[0]:
                    group = tuple(f"{parent}.{n}" if parent else n for n in names)
                    if all(g in present for g in group):
                        groups.append(group)
        return groups

    def serialized(self, name: str, w: torch.Tensor, dtype: torch.dtype, global_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Quantize one merged weight; the tensors the checkpoint stores for it.

        Args:
            name: ``<module>.weight``.
            w: float32 (or ``dtype``) weight ``(out, in)``, on CPU.
            dtype: the output dtype the weight is rounded to first (bfloat16, float16 or float32).
            global_scale: NVFP4's float32 ``(1,)`` scale shared by the fused group (:meth:`global_scale`);
                computed from ``w`` alone when None.

        Returns:
            ``{<module>.weight / .weight_packed / .weight_scale / ...: tensor}`` as the compressor returns them.
        """
        module = name.removesuffix(".weight")
        w = w.to(dtype)
        if global_scale is None:
            global_scale = self.global_scale([w])
        out = self._compress(w, global_scale)
        return {f"{module}.{k}": v.contiguous() for k, v in out.items()}

    def _compress(self, w: torch.Tensor, global_scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
        from compressed_tensors.quantization.utils import calculate_qparams

        mn, mx = self.observe(w)
        scale, zp = calculate_qparams(mn, mx, self.scheme.weights, global_scale=global_scale)
        state = {"weight": w, "weight_scale": scale, "weight_zero_point": zp}
        if global_scale is not None:
            state["weight_global_scale"] = global_scale
        return dict(self.compressor.compress(state, self.scheme))

    def planned_shapes(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, tuple[StDtype, tuple[int, ...]]]:
        """Names, dtypes and shapes :meth:`serialized` produces (exact: the compressor run on the meta device)."""
        w = torch.empty(shape, dtype=dtype, device="meta")
        gs = torch.empty(1, dtype=torch.float32, device="meta") if self.global_scale_needed else None
        module = name.removesuffix(".weight")
        return {f"{module}.{k}": (st_dtype(v.dtype), tuple(v.shape)) for k, v in self._compress(w, gs).items()}

    @property
    def global_scale_needed(self) -> bool:
        """Whether the scheme has a per-tensor global scale (NVFP4)."""
        from compressed_tensors.quantization import QuantizationStrategy as S

        return bool(self.scheme.weights.strategy == S.TENSOR_GROUP)

    def config(self) -> Any:
        """compressed-tensors ``QuantizationConfig`` of the output (status compressed, this ``ignore`` list)."""
        from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

        return QuantizationConfig(
            config_groups={"group_0": self.scheme},
            format=self.scheme.format.value,
            quantization_status=QuantizationStatus.COMPRESSED,
            ignore=list(self.ignore),
        )

    def quantization_config(self, compute_dtype: torch.dtype) -> dict[str, Any]:
        """``config.json``'s ``quantization_config`` as compressed-tensors' ``ModelCompressor.update_config`` writes it."""
        from compressed_tensors.compressors import ModelCompressor

        with tempfile.TemporaryDirectory(prefix="lorasave-ct-") as tmp:
            path = Path(tmp) / "config.json"
            path.write_text("{}", encoding="utf-8")
            ModelCompressor(quantization_config=self.config()).update_config(tmp)
            return dict(json.loads(path.read_text(encoding="utf-8"))["quantization_config"])

    def describe(self) -> dict[str, Any]:
        """JSON form for the manifest."""
        import compressed_tensors

        return {
            "scheme": SAVE_METHODS[self.save_method],
            "format": self.scheme.format.value,
            "ignore": list(self.ignore),
            "compressed_tensors": compressed_tensors.__version__,
        }

    @property
    def label(self) -> str:
        """Short description, e.g. ``"compressed-tensors W4A16 (pack-quantized)"``."""
        return f"compressed-tensors {SAVE_METHODS[self.save_method]} ({self.scheme.format.value})"


def select_modules(
    spec: CompressedSpec, linear: Iterable[str], quantizable: set[str], shapes: dict[str, tuple[int, ...]]
) -> tuple[set[str], list[str], list[str]]:
    """Which Linear modules the scheme quantizes.

    Args:
        spec: the scheme.
        linear: every ``nn.Linear`` module of the model, in ``named_modules`` order.
        quantizable: the ones transformers would quantize (no ``lm_head`` / output embeddings, no fp32 modules).
        shapes: weight shape of each module (``<module>.weight``), missing for modules with no weight.

    Returns:
        ``(quantized modules, ignore list in model order, notes)``: routers (:data:`ROUTER_NAMES`) and
        weights whose shape the scheme cannot take (``in`` not divisible by the group) are ignored.
    """
    chosen: set[str] = set()
    ignore: list[str] = []
    odd: list[str] = []
    for m in linear:
        shape = shapes.get(m)
        if m in quantizable and shape is not None and m.rpartition(".")[2] not in ROUTER_NAMES:
            if spec.quantizable(shape):
                chosen.add(m)
                continue
            odd.append(m)
        ignore.append(m)
    notes = []
    if odd:
        notes.append(
            f"{len(odd)} Linear layers kept in 16-bit: their input size is not a multiple of {spec.save_method}'s group of {spec.group_size} (first: {odd[0]})"
        )
    return chosen, ignore, notes
