"""Per-architecture facts for GGUF export, kept as data.

Each supported Hugging Face ``model_type`` maps to a :class:`GgufArch`: the gguf-py
architecture (tensor names come from ``gguf.get_tensor_name_map``), whether Q/K rows are
permuted from HF's rotate-half RoPE layout to the interleaved layout GGUF ``llama`` expects,
the pre-tokenizer name written for a byte-level BPE tokenizer, and the hyper-parameter keys.

Sources (llama.cpp, see /work/shared/reference/gguf-conversion.md):
``conversion/base.py`` ``TextModel.set_gguf_parameters`` (the common ``{arch}.*`` keys),
``conversion/llama.py`` ``LlamaModel`` (``undo_permute = True``, ``llama.vocab_size``,
``llama.rope.dimension_count``), ``conversion/qwen.py`` ``Qwen2Model`` (no permute, biases
kept, ``tokenizer.ggml.pre = "qwen2"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gguf

from .errors import UnsupportedModelError

#: One metadata value: ``(key suffix after "{arch}.", value, kind)``; kind is "u32" or "f32".
MetaItem = tuple[str, int | float, str]


def _get(cfg: dict[str, Any], *keys: str) -> Any:
    """First of ``keys`` present in ``cfg`` (top level, else ``text_config``), or None."""
    for src in (cfg, cfg.get("text_config") or {}):
        for k in keys:
            if k in src and src[k] is not None:
                return src[k]
    return None


def rope_theta(cfg: dict[str, Any]) -> float | None:
    """RoPE base frequency: ``rope_theta`` (transformers 4) or ``rope_parameters.rope_theta`` (5)."""
    theta = _get(cfg, "rope_theta")
    if theta is None:
        params = _get(cfg, "rope_parameters")
        if isinstance(params, dict):
            theta = params.get("rope_theta")
    return float(theta) if theta is not None else None


def head_counts(cfg: dict[str, Any]) -> tuple[int, int]:
    """``(n_head, n_head_kv)``; ``n_head_kv`` defaults to ``n_head`` (no GQA)."""
    n_head = int(_get(cfg, "num_attention_heads", "n_head"))
    n_kv = _get(cfg, "num_key_value_heads", "n_head_kv")
    return n_head, int(n_kv) if n_kv is not None else n_head


def common_params(cfg: dict[str, Any]) -> list[MetaItem]:
    """The keys ``TextModel.set_gguf_parameters`` (llama.cpp ``conversion/base.py``) writes.

    ``context_length`` (max_position_embeddings), ``embedding_length`` (hidden_size),
    ``block_count``, ``feed_forward_length`` (intermediate_size), ``attention.head_count``,
    ``attention.head_count_kv``, ``rope.freq_base``, ``attention.layer_norm_rms_epsilon``,
    and ``attention.key_length`` / ``value_length`` only when config.json has ``head_dim``.
    """
    n_head, n_kv = head_counts(cfg)
    items: list[MetaItem] = [
        ("context_length", int(_get(cfg, "max_position_embeddings", "n_ctx", "n_positions")), "u32"),
        ("embedding_length", int(_get(cfg, "hidden_size", "n_embd")), "u32"),
        ("block_count", int(_get(cfg, "num_hidden_layers", "n_layers", "n_layer")), "u32"),
        ("feed_forward_length", int(_get(cfg, "intermediate_size", "n_inner")), "u32"),
        ("attention.head_count", n_head, "u32"),
        ("attention.head_count_kv", n_kv, "u32"),
    ]
    theta = rope_theta(cfg)
    if theta is not None:
        items.append(("rope.freq_base", theta, "f32"))
    eps = _get(cfg, "rms_norm_eps")
    if eps is not None:
        items.append(("attention.layer_norm_rms_epsilon", float(eps), "f32"))
    head_dim = _get(cfg, "head_dim")
    if head_dim is not None:
        items += [("attention.key_length", int(head_dim), "u32"), ("attention.value_length", int(head_dim), "u32")]
    return items


def llama_params(cfg: dict[str, Any]) -> list[MetaItem]:
    """Common keys + ``vocab_size`` and ``rope.dimension_count`` (``LlamaModel.set_gguf_parameters``)."""
    n_head, _ = head_counts(cfg)
    head_dim = _get(cfg, "head_dim") or int(_get(cfg, "hidden_size")) // n_head
    return [*common_params(cfg), ("vocab_size", int(_get(cfg, "vocab_size")), "u32"), ("rope.dimension_count", int(head_dim), "u32")]


@dataclass(frozen=True)
class GgufArch:
    """How one HF ``model_type`` becomes GGUF.

    Attributes:
        arch: gguf-py architecture (``gguf.MODEL_ARCH.LLAMA``); its name is ``general.architecture``.
        permute_qk: apply llama.cpp's ``LlamaModel.permute`` to ``q_proj``/``k_proj`` rows.
        bpe_pre: ``tokenizer.ggml.pre`` written for a byte-level BPE tokenizer whose pre-tokenizer
            is not plain GPT-2 ByteLevel (llama.cpp derives it from a hash of token ids).
        params: config.json -> ``{arch}.*`` hyper-parameters.
        rope_types: ``rope_type`` values the export supports (others would need extra keys or
            tensors, e.g. ``rope_freqs`` for ``llama3``).
    """

    arch: gguf.MODEL_ARCH
    permute_qk: bool
    bpe_pre: str
    params: Callable[[dict[str, Any]], list[MetaItem]]
    rope_types: frozenset[str] = field(default_factory=lambda: frozenset({"default"}))

    @property
    def name(self) -> str:
        """The GGUF architecture name (``"llama"``)."""
        return gguf.MODEL_ARCH_NAMES[self.arch]


#: Supported HF ``model_type`` -> GGUF rules (llama.cpp ``conversion/__init__.py`` TEXT_MODEL_MAP).
ARCHITECTURES: dict[str, GgufArch] = {
    "llama": GgufArch(gguf.MODEL_ARCH.LLAMA, permute_qk=True, bpe_pre="llama-bpe", params=llama_params),
    "mistral": GgufArch(gguf.MODEL_ARCH.LLAMA, permute_qk=True, bpe_pre="llama-bpe", params=llama_params),
    "qwen2": GgufArch(gguf.MODEL_ARCH.QWEN2, permute_qk=False, bpe_pre="qwen2", params=common_params),
}


def gguf_arch_for(config: dict[str, Any]) -> GgufArch:
    """The GGUF rules for a base's config.json.

    Raises:
        UnsupportedModelError: ``model_type`` is not in :data:`ARCHITECTURES`, or the RoPE
            scaling needs keys this export does not write.
    """
    model_type = config.get("model_type")
    rules = ARCHITECTURES.get(str(model_type))
    if rules is None:
        raise UnsupportedModelError(f"GGUF export does not support model_type {model_type!r} yet; supported: {', '.join(sorted(ARCHITECTURES))}")
    scaling = _get(config, "rope_scaling") or _get(config, "rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else "default"
    if rope_type not in rules.rope_types:
        raise UnsupportedModelError(f"GGUF export of {model_type} with rope_type {rope_type!r} is not supported yet")
    return rules
