"""compressed-tensors FP8 bases (``quant_method: "compressed-tensors"``, ``float-quantized``): which ones lorasave reads.

llm-compressor's FP8 presets (``FP8``, ``FP8_DYNAMIC``, ``FP8_BLOCK``) store each quantized Linear as
``<module>.weight`` float8_e4m3fn with ``<module>.weight_scale`` beside it (a multiplier, in the model's
dtype): one element per tensor (``strategy: tensor``), ``(out, 1)`` per channel, ``(out, in/g)`` per
group, or ``(ceil(out/bh), ceil(in/bw))`` per block of ``block_structure``; ``input_scale`` (static
activations) and zero points may sit beside it. The values are exactly ``weight * weight_scale``;
compressed-tensors' own ``dequantize`` computes that product in the scale's dtype (bfloat16 rounds it),
lorasave in float32 (``formats.fp8.dequantize_fp8``, the same grid rule as the ``fp8`` layout), which
is compressed-tensors' ``dequantize`` given the scale in float32.

Read only when every config group quantizes weights to 8-bit symmetric floats in the ``float-quantized``
(or ``naive-quantized``) format, the checkpoint is ``compressed`` and it has no KV-cache scales; any
other compressed-tensors checkpoint (INT4/INT8 packed, NVFP4, MXFP4...) is refused naming its format.
"""

from __future__ import annotations

from typing import Any

#: The scale of ``<module>.weight`` is ``<module>.weight_scale``.
SCALE_SUFFIX = "_scale"
FORMATS = ("float-quantized", "naive-quantized")
STRATEGIES = ("tensor", "channel", "group", "block")


def fp8_layout(qc: dict[str, Any]) -> dict[str, Any] | None:
    """The FP8 layout of a compressed-tensors ``quantization_config``, or None when lorasave does not read it.

    Returns:
        ``{"quant_method", "weight_block_size", "activation_scheme", "scale_suffix"}`` in the terms of
        ``formats.fp8`` (``weight_block_size`` None unless a group is block-scaled).
    """
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups or qc.get("kv_cache_scheme"):
        return None
    if qc.get("quantization_status", "compressed") != "compressed":
        return None
    blocks: set[tuple[int, ...]] = set()
    static = False
    for g in groups.values():
        if not isinstance(g, dict):
            return None
        w = g.get("weights")
        fmt = g.get("format") or qc.get("format")
        if not isinstance(w, dict) or fmt not in FORMATS:
            return None
        if w.get("num_bits") != 8 or w.get("type") != "float" or w.get("symmetric") is False or w.get("strategy") not in STRATEGIES:
            return None
        if w.get("strategy") == "block":
            bs = w.get("block_structure")
            if not isinstance(bs, list) or len(bs) != 2:
                return None
            blocks.add(tuple(bs))
        ia = g.get("input_activations")
        if isinstance(ia, dict) and not ia.get("dynamic"):
            static = True
    if len(blocks) > 1:
        return None
    return {
        "quant_method": "compressed-tensors",
        "weight_block_size": list(blocks.pop()) if blocks else None,
        "activation_scheme": "static" if static else "dynamic",
        "scale_suffix": SCALE_SUFFIX,
    }


def describe_format(qc: dict[str, Any]) -> str:
    """The formats a compressed-tensors config names, for a refusal (``"pack-quantized"``...)."""
    groups = qc.get("config_groups")
    fmts = {str(g.get("format")) for g in groups.values() if isinstance(g, dict) and g.get("format")} if isinstance(groups, dict) else set()
    if qc.get("format"):
        fmts.add(str(qc["format"]))
    return ", ".join(sorted(fmts)) or "no format"
