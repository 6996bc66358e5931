"""What the directly built ONNX decoder needs to know about an architecture, read from its config.

``decoder_spec(config, tensor_names)`` turns a ``config.json`` (transformers' config class fills the
defaults) into a :class:`DecoderSpec`: sizes, the attention pattern (full or sliding window per
layer, the score scale), the norm flavour, the MLP activation and the RoPE frequencies. The RoPE
inverse frequencies and their attention scaling come from the architecture's own
``*RotaryEmbedding`` module in transformers (``rope_parameters``, every static ``rope_type``), so
the graph uses the same float32 frequencies transformers does.

Families (transformers' modeling files are the reference for each):

- ``llama``, ``mistral``, ``qwen2``, ``qwen3``: RMSNorm ``w * (x * rsqrt(mean(x²) + eps))``, SiLU
  gated MLP; Qwen2's q/k/v biases and Qwen3's per-head q/k RMSNorm follow from the tensors present;
  Mistral/Qwen sliding windows per ``layer_types`` (or ``sliding_window`` on every layer).
- ``phi3``: fused ``qkv_proj`` and ``gate_up_proj``, split in the graph.
- ``gemma3_text``: ``(1 + w)`` RMSNorm, embeddings times sqrt(hidden), GELU (tanh) gated MLP,
  four norms per layer, per-head q/k norms, score scale ``query_pre_attn_scalar ** -0.5``,
  sliding/full layers per ``layer_types`` with their own RoPE frequencies.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

from lorasave.errors import UnsupportedModelError

#: model_type -> family rules.
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "phi3": "phi3", "gemma3_text": "gemma3"}
#: family -> its Linear projections, the names a LoRA input (``--lora-inputs``) can target.
PROJECTIONS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gemma3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}
#: RoPE types whose frequencies change with the sequence length (transformers' ``dynamic_rope_update``).
_DYNAMIC_ROPE = ("dynamic", "longrope")


@dataclass(frozen=True)
class LayerAttention:
    """One layer's attention: ``window`` keys back (None: every earlier key) and its RoPE table.

    Attributes:
        window: sliding window in tokens (a key at distance >= window is masked), or None.
        rope: key into ``DecoderSpec.rope`` (the layer type).
    """

    window: int | None
    rope: str


@dataclass(frozen=True)
class DecoderSpec:
    """A decoder-only causal LM as the graph builder sees it.

    Attributes:
        model_type: config's ``model_type``.
        family: ``"llama"``, ``"phi3"`` or ``"gemma3"`` (``FAMILIES``).
        hidden, n_heads, n_kv_heads, head_dim, n_layers, vocab, intermediate: sizes.
        eps: RMSNorm epsilon.
        scale: attention score scale (``head_dim ** -0.5``, Gemma 3: ``query_pre_attn_scalar ** -0.5``).
        layers: per-layer attention (window, RoPE table).
        rope: layer type -> ``(inv_freq float32 (head_dim // 2,), attention_scaling)``.
        qkv_bias: q/k/v projections carry biases (Qwen2).
        qk_norm: per-head RMSNorm of queries and keys before RoPE (Qwen3, Gemma 3).
        tied: lm_head is the embedding matrix (no ``lm_head.weight`` in the checkpoint).
        final_softcap: Gemma's ``final_logit_softcapping`` (None: none).
        context_length: ``max_position_embeddings``.
        prefix: the decoder's tensor prefix (``"model."``).
    """

    model_type: str
    family: str
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_layers: int
    vocab: int
    intermediate: int
    eps: float
    scale: float
    layers: tuple[LayerAttention, ...]
    rope: dict[str, tuple[np.ndarray, float]]
    qkv_bias: bool
    qk_norm: bool
    tied: bool
    final_softcap: float | None
    context_length: int
    prefix: str = "model."


def _hf_config(config: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    cfg = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "auto_map", "transformers_version")}
    return AutoConfig.for_model(config["model_type"], **cfg)


def _rotary_class(model_type: str) -> Any:
    module_name = model_type.removesuffix("_text")
    module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    classes = [v for k, v in vars(module).items() if k.endswith("RotaryEmbedding") and isinstance(v, type) and v.__module__ == module.__name__]
    if len(classes) != 1:
        raise UnsupportedModelError(f"{model_type}: transformers' modeling file has {len(classes)} rotary embedding classes; the ONNX builder expects one")
    return classes[0]


def _rope_tables(hf: Any, layer_types: Collection[str]) -> dict[str, tuple[np.ndarray, float]]:
    params = getattr(hf, "rope_parameters", None) or {}
    per_type = isinstance(params, dict) and all(isinstance(params.get(t), dict) for t in layer_types)
    for p in params.values() if per_type else [params]:
        kind = (p or {}).get("rope_type", "default")
        if kind in _DYNAMIC_ROPE:
            raise UnsupportedModelError(f"{hf.model_type}: RoPE type {kind!r} changes with the sequence length; the ONNX builder handles static RoPE only")
    if getattr(hf, "partial_rotary_factor", 1.0) not in (None, 1.0):
        raise UnsupportedModelError(f"{hf.model_type}: partial rotary embeddings are not handled by the ONNX builder")
    rotary = _rotary_class(hf.model_type)(hf)
    tables = {}
    for t in layer_types:
        freq = getattr(rotary, f"{t}_inv_freq", None)
        if freq is None:
            tables[t] = (rotary.inv_freq.float().numpy().copy(), float(rotary.attention_scaling))
        else:
            tables[t] = (freq.float().numpy().copy(), float(getattr(rotary, f"{t}_attention_scaling")))
    return tables


def decoder_spec(config: dict[str, Any], tensor_names: Collection[str]) -> DecoderSpec:
    """The spec of the checkpoint whose ``config.json`` is ``config`` and whose tensors are ``tensor_names``.

    Raises:
        UnsupportedModelError: a ``model_type`` outside ``FAMILIES`` (the message lists them), or a
            feature of it the builder does not express (dynamic RoPE, partial rotary, attention
            logit softcapping, bidirectional attention).
    """
    model_type = str(config.get("model_type"))
    if model_type not in FAMILIES:
        raise UnsupportedModelError(f"{model_type}: the ONNX graph builder handles {', '.join(sorted(FAMILIES))}")
    family = FAMILIES[model_type]
    hf = _hf_config(config)
    for flag in ("attn_logit_softcapping", "use_bidirectional_attention"):
        if getattr(hf, flag, None):
            raise UnsupportedModelError(f"{model_type} with {flag} is not handled by the ONNX builder")
    n_heads = int(hf.num_attention_heads)
    head_dim = int(getattr(hf, "head_dim", None) or hf.hidden_size // n_heads)
    n_layers = int(hf.num_hidden_layers)
    window = getattr(hf, "sliding_window", None)
    types = list(getattr(hf, "layer_types", None) or [])
    if not types:
        types = ["sliding_attention" if window else "full_attention"] * n_layers
    layers = tuple(LayerAttention(int(window) if t == "sliding_attention" and window else None, t) for t in types)
    prefix = "model."
    names = set(tensor_names)
    scale = float(hf.query_pre_attn_scalar) ** -0.5 if family == "gemma3" else head_dim**-0.5
    return DecoderSpec(
        model_type=model_type,
        family=family,
        hidden=int(hf.hidden_size),
        n_heads=n_heads,
        n_kv_heads=int(getattr(hf, "num_key_value_heads", None) or n_heads),
        head_dim=head_dim,
        n_layers=n_layers,
        vocab=int(hf.vocab_size),
        intermediate=int(hf.intermediate_size),
        eps=float(hf.rms_norm_eps),
        scale=scale,
        layers=layers,
        rope=_rope_tables(hf, sorted(set(types))),
        qkv_bias=f"{prefix}layers.0.self_attn.q_proj.bias" in names,
        qk_norm=f"{prefix}layers.0.self_attn.q_norm.weight" in names,
        tied="lm_head.weight" not in names,
        final_softcap=getattr(hf, "final_logit_softcapping", None),
        context_length=int(getattr(hf, "max_position_embeddings", 0) or 0),
        prefix=prefix,
    )


def embed_scale(spec: DecoderSpec) -> float | None:
    """Gemma's embedding multiplier sqrt(hidden) (None for the other families)."""
    return math.sqrt(spec.hidden) if spec.family == "gemma3" else None
