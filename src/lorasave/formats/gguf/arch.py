"""Per-architecture facts for GGUF export, kept as data (one :class:`GgufArch` per HF ``model_type``).

Each entry says what llama.cpp v0.5.0's ``convert_hf_to_gguf.py`` does for that architecture:
the gguf-py architecture (tensor names come from ``gguf.get_tensor_name_map``), the per-tensor
transforms (Llama Q/K permutation, Gemma's RMSNorm ``+1``), tensors dropped or generated
(``rope_freqs`` for Llama 3.1 RoPE), the ``{arch}.*`` hyper-parameters, the order in which
tokenizer kinds are tried, and configs llama.cpp would run differently than transformers (refused).

Sources (``/work/ref/llama.cpp-v0.5.0``): ``conversion/base.py`` ``TextModel.__init__`` (RoPE
parameter normalisation) and ``TextModel.set_gguf_parameters`` (the common keys);
``conversion/llama.py`` ``LlamaModel`` (permute, ``vocab_size``, ``rope.dimension_count``,
``generate_extra_tensors``); ``conversion/qwen.py`` ``Qwen2Model`` / ``Qwen3Model``;
``conversion/gemma.py`` ``Gemma3Model``; ``conversion/phi.py`` ``Phi3MiniModel``;
``src/models/gemma3.cpp`` (attention scale, SWA pattern 6).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import gguf
import numpy as np

from lorasave.errors import UnsupportedModelError

V = gguf.GGUFValueType
K = gguf.Keys

#: One metadata value: ``(key, value, GGUF value type)``; ``key`` may hold ``{arch}``.
MetaItem = tuple[str, Any, gguf.GGUFValueType]


class VocabKind(Enum):
    """Tokenizer sources, tried in an architecture's order (``set_vocab`` in the converter)."""

    SPM = "sentencepiece"  # tokenizer.model (``TextModel._set_vocab_sentencepiece``)
    SPM_JSON = "sentencepiece-style tokenizer.json"  # byte_fallback BPE (``_set_vocab_llama_hf``)
    BPE = "byte-level BPE"  # tokenizer.json (``TextModel._set_vocab_gpt2``)


#: ``find_hparam`` key lists of ``TextModel`` (``conversion/base.py``).
GLOBAL_THETA = ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base")
LOCAL_THETA = ("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta", "rope_local_base_freq")


@dataclass
class Hparams:
    """config.json as ``TextModel.__init__`` sees it: ``text_config`` lifted to the top, RoPE normalised.

    Attributes:
        h: the flattened config.
        rope: ``rope_parameters`` (or ``rope_scaling``) with the global/local theta, ``rope_type``,
            ``partial_rotary_factor`` and ``original_max_position_embeddings`` mirrored into it.
    """

    h: dict[str, Any]
    rope: dict[str, Any]

    @classmethod
    def of(cls, config: dict[str, Any]) -> Hparams:
        """Normalise a config.json dict (the converter's ``TextModel.__init__``)."""
        h = dict(config)
        if isinstance(h.get("text_config"), dict):
            h = {**h, **h["text_config"]}
        raw = h.get("rope_parameters", h.get("rope_scaling")) or {}
        rope = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
        self = cls(h, rope)
        if "full_attention" not in rope and "sliding_attention" not in rope:
            mirrors = {
                "rope_theta": self.find(GLOBAL_THETA),
                "rope_type": rope.get("type"),
                "partial_rotary_factor": self.find(("partial_rotary_factor", "rope_pct", "rope_percent")),
                "original_max_position_embeddings": self.find(("original_max_position_embeddings",)),
            }
            local = self.find(LOCAL_THETA)
            if local is not None:
                rope["sliding_attention"] = {"rope_theta": local}
            for key, value in mirrors.items():
                if key not in rope and value is not None:
                    rope[key] = value
        return self

    def find(self, keys: Iterable[str], default: Any = None) -> Any:
        """First of ``keys`` present (``ModelBase.find_hparam(optional=True)``)."""
        for k in keys:
            if k in self.h:
                return self.h[k]
        return default

    @property
    def full_rope(self) -> dict[str, Any]:
        """The RoPE parameters of the global (full-attention) layers."""
        return self.rope.get("full_attention", self.rope)

    @property
    def rope_type(self) -> str:
        """``rope_type`` of the global layers, ``"default"`` when none is given."""
        return str(self.full_rope.get("rope_type") or "default").lower()

    @property
    def n_layer(self) -> int:
        """``block_count``."""
        return int(self.find(("n_layers", "num_hidden_layers", "n_layer", "num_layers")))

    @property
    def heads(self) -> tuple[int, int]:
        """``(n_head, n_head_kv)``; ``n_head_kv`` defaults to ``n_head`` (no GQA)."""
        n_head = int(self.find(("num_attention_heads", "n_head", "n_heads")))
        return n_head, int(self.find(("num_key_value_heads", "n_kv_heads", "n_head_kv"), n_head))

    @property
    def head_dim(self) -> int:
        """``head_dim``, else ``hidden_size // num_attention_heads``."""
        return int(self.h.get("head_dim") or int(self.find(("hidden_size", "n_embd"))) // self.heads[0])


def head_counts(config: dict[str, Any]) -> tuple[int, int]:
    """``(n_head, n_head_kv)`` of a config.json dict."""
    return Hparams.of(config).heads


def rope_theta(config: dict[str, Any]) -> float | None:
    """RoPE base frequency of the global layers, or None."""
    theta = Hparams.of(config).full_rope.get("rope_theta")
    return float(theta) if theta is not None else None


def _set(items: list[MetaItem], key: str, value: Any, vtype: gguf.GGUFValueType) -> None:
    """Add or overwrite ``key`` in place (``GGUFWriter.add_key_value`` keeps the first position)."""
    for i, (k, _, _) in enumerate(items):
        if k == key:
            items[i] = (key, value, vtype)
            return
    items.append((key, value, vtype))


def text_params(hp: Hparams) -> list[MetaItem]:
    """The keys of ``TextModel.set_gguf_parameters`` (``conversion/base.py``), in its order.

    Block count, context/embedding/feed-forward length, head counts, RoPE scaling (``linear``,
    ``yarn``, ``longrope``; ``llama3`` goes to ``rope_freqs``), ``rope.freq_base`` (+ ``_swa``),
    RMS / layer-norm epsilons, and ``attention.key_length`` / ``value_length`` when config.json
    has ``head_dim``. ``general.file_type`` is written by the caller.
    """
    f = hp.find
    out: list[MetaItem] = [(K.LLM.BLOCK_COUNT, hp.n_layer, V.UINT32)]
    optional = (
        (K.LLM.CONTEXT_LENGTH, ("max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length", "model_max_length")),
        (K.LLM.EMBEDDING_LENGTH, ("hidden_size", "n_embd", "dim")),
        (K.LLM.FEED_FORWARD_LENGTH, ("prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size", "n_inner", "hidden_dim")),
        (K.Attention.HEAD_COUNT, ("num_attention_heads", "n_head", "n_heads")),
        (K.Attention.HEAD_COUNT_KV, ("num_key_value_heads", "n_kv_heads")),
    )
    for key, names in optional:
        if (value := f(names)) is not None:
            out.append((key, int(value), V.UINT32))
    if hp.h.get("is_causal") is False:
        out.append((K.Attention.CAUSAL, False, V.BOOL))
    rp = hp.full_rope
    rope_type, factor = rp.get("rope_type"), rp.get("factor")
    if rope_type == "linear" and factor is not None:
        out += [(K.Rope.SCALING_TYPE, gguf.RopeScalingType.LINEAR.value, V.STRING), (K.Rope.SCALING_FACTOR, float(factor), V.FLOAT32)]
    elif rope_type in ("su", "longrope"):
        out.append((K.Rope.SCALING_TYPE, gguf.RopeScalingType.LONGROPE.value, V.STRING))
    if (theta := rp.get("rope_theta")) is not None:
        out.append((K.Rope.FREQ_BASE, float(theta), V.FLOAT32))
    if (local := (hp.rope.get("sliding_attention") or {}).get("rope_theta")) is not None:
        out.append((K.Rope.FREQ_BASE_SWA, float(local), V.FLOAT32))
    if (eps := f(("rms_norm_eps", "norm_eps"))) is not None:
        out.append((K.Attention.LAYERNORM_RMS_EPS, float(eps), V.FLOAT32))
    if (eps := f(("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"))) is not None:
        out.append((K.Attention.LAYERNORM_EPS, float(eps), V.FLOAT32))
    if (head_dim := hp.h.get("head_dim")) is not None:
        out += [(K.Attention.KEY_LENGTH, int(head_dim), V.UINT32), (K.Attention.VALUE_LENGTH, int(head_dim), V.UINT32)]
    return out


def llama_params(hp: Hparams) -> list[MetaItem]:
    """Text keys + ``vocab_size`` and ``rope.dimension_count`` (``LlamaModel.set_gguf_parameters``)."""
    return [*text_params(hp), (K.LLM.VOCAB_SIZE, int(hp.h["vocab_size"]), V.UINT32), (K.Rope.DIMENSION_COUNT, hp.head_dim, V.UINT32)]


def gemma3_params(hp: Hparams) -> list[MetaItem]:
    """Text keys overwritten / extended as ``Gemma3Model.set_gguf_parameters`` does (its defaults included)."""
    h = hp.h
    out = text_params(hp)
    _set(out, K.LLM.CONTEXT_LENGTH, int(h.get("max_position_embeddings", 131072)), V.UINT32)
    _set(out, K.Attention.HEAD_COUNT, int(h.get("num_attention_heads", 8)), V.UINT32)
    _set(out, K.Attention.LAYERNORM_RMS_EPS, float(h.get("rms_norm_eps", 1e-6)), V.FLOAT32)
    _set(out, K.Attention.KEY_LENGTH, int(h.get("head_dim", 256)), V.UINT32)
    _set(out, K.Attention.VALUE_LENGTH, int(h.get("head_dim", 256)), V.UINT32)
    _set(out, K.Rope.FREQ_BASE, float(hp.full_rope.get("rope_theta", 1_000_000.0)), V.FLOAT32)
    if cap := h.get("final_logit_softcapping"):
        _set(out, K.LLM.FINAL_LOGIT_SOFTCAPPING, float(cap), V.FLOAT32)
    if h.get("sliding_window_pattern") != 1:
        _set(out, K.Attention.SLIDING_WINDOW, int(h["sliding_window"]), V.UINT32)
    _set(out, K.Attention.HEAD_COUNT_KV, int(h.get("num_key_value_heads", 4)), V.UINT32)
    return out


def phi3_params(hp: Hparams) -> list[MetaItem]:
    """``Phi3MiniModel.set_gguf_parameters`` (``conversion/phi.py``; it does not call the text keys)."""
    n_embd = int(hp.find(("hidden_size", "n_embd")))
    n_head, n_kv = hp.heads
    rope_dims = int(hp.rope.get("partial_rotary_factor", 1.0) * n_embd) // n_head
    return [
        (K.LLM.CONTEXT_LENGTH, int(hp.find(("n_positions", "max_position_embeddings"))), V.UINT32),
        (K.Rope.SCALING_ORIG_CTX_LEN, int(hp.rope["original_max_position_embeddings"]), V.UINT32),
        (K.LLM.EMBEDDING_LENGTH, n_embd, V.UINT32),
        (K.LLM.FEED_FORWARD_LENGTH, int(hp.h["intermediate_size"]), V.UINT32),
        (K.LLM.BLOCK_COUNT, hp.n_layer, V.UINT32),
        (K.Attention.HEAD_COUNT, n_head, V.UINT32),
        (K.Attention.HEAD_COUNT_KV, n_kv, V.UINT32),
        (K.Attention.LAYERNORM_RMS_EPS, float(hp.h["rms_norm_eps"]), V.FLOAT32),
        (K.Rope.DIMENSION_COUNT, rope_dims, V.UINT32),
        (K.Rope.FREQ_BASE, float(hp.full_rope["rope_theta"]), V.FLOAT32),
        (K.Attention.SLIDING_WINDOW, int(hp.h.get("sliding_window") or 0), V.UINT32),
    ]


def llama3_rope_freqs(hp: Hparams) -> list[tuple[str, np.ndarray]]:
    """``rope_freqs.weight``: per-dimension RoPE factors for ``rope_type == "llama3"``.

    ``LlamaModel.generate_extra_tensors`` (``conversion/llama.py``), computed the same way
    (float32 inverse frequencies, Python float arithmetic per entry).

    Returns:
        ``[("rope_freqs.weight", float32 array of shape (head_dim // 2,))]`` or ``[]``.
    """
    rp = hp.full_rope
    if str(rp.get("rope_type", "")).lower() != "llama3":
        return []
    import torch

    base = rp.get("rope_theta", 10000.0)
    dim = hp.head_dim
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rp.get("factor", 8.0)
    low, high = rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old_ctx = rp.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    return [(name, torch.tensor(factors, dtype=torch.float32).numpy())]


def no_extra(hp: Hparams) -> list[tuple[str, np.ndarray]]:
    """No generated tensors."""
    return []


def no_check(hp: Hparams) -> None:
    """Nothing to refuse beyond the RoPE type."""


def gemma3_check(hp: Hparams) -> None:
    """Refuse Gemma 3 configs that llama.cpp v0.5.0 would run differently (``src/models/gemma3.cpp``).

    llama.cpp scales queries by ``1/sqrt(head_dim)`` (``1/sqrt(n_embd/n_head)`` for the 62-layer
    27B), ignoring ``query_pre_attn_scalar``; it marks layer ``il`` sliding when ``il % 6 < 5``; the
    converter asserts there is no ``attn_logit_softcapping``.

    Raises:
        UnsupportedModelError: one of these disagrees with the config.
    """
    h = hp.h
    n_head, _ = hp.heads
    expected = int(h["hidden_size"]) / n_head if hp.n_layer == 62 else hp.head_dim
    scalar = h.get("query_pre_attn_scalar")
    if scalar is not None and float(scalar) != float(expected):
        raise UnsupportedModelError(
            f"gemma3 query_pre_attn_scalar={scalar} but llama.cpp scales attention by 1/sqrt({expected:g}); this model would not run the same in llama.cpp"
        )
    if h.get("attn_logit_softcapping") is not None:
        raise UnsupportedModelError("gemma3 with attn_logit_softcapping is not supported by llama.cpp's converter")
    types = h.get("layer_types")
    if types is not None and h.get("sliding_window_pattern") != 1:
        want = ["sliding_attention" if i % 6 < 5 else "full_attention" for i in range(hp.n_layer)]
        if list(types) != want:
            raise UnsupportedModelError("gemma3 layer_types differ from llama.cpp's fixed pattern (5 sliding layers, then 1 global); not supported")


def phi3_check(hp: Hparams) -> None:
    """Refuse Phi-3 LongRoPE (``rope_factors_long/short`` tensors are not written) and a missing original context.

    Raises:
        UnsupportedModelError: ``long_factor`` present, or no ``original_max_position_embeddings``.
    """
    if hp.rope.get("long_factor"):
        raise UnsupportedModelError(
            "phi3 with LongRoPE (rope long_factor/short_factor, 128k models) is not supported by GGUF export yet; use a 4k-context Phi-3"
        )
    if "original_max_position_embeddings" not in hp.rope:
        raise UnsupportedModelError("phi3 config has no original_max_position_embeddings, which llama.cpp's converter requires")


@dataclass(frozen=True)
class GgufArch:
    """How one HF ``model_type`` becomes GGUF.

    Attributes:
        arch: gguf-py architecture (``gguf.MODEL_ARCH.LLAMA``); its name is ``general.architecture``.
        params: hyper-parameters -> ``{arch}.*`` metadata items.
        permute_qk: apply ``LlamaModel.permute`` to ``q_proj`` / ``k_proj`` rows (and biases).
        norm_shift: added to every tensor whose HF name ends in ``norm.weight`` (Gemma: 1.0).
        vocabs: tokenizer kinds in the order the converter's ``set_vocab`` tries them.
        bpe_pre: ``tokenizer.ggml.pre`` when the BPE pre-tokenizer hash is unknown.
        add_space_prefix: ``tokenizer.ggml.add_space_prefix`` written with a SentencePiece vocab, or None.
        drop: HF tensor names the converter skips (Gemma's ``lm_head.weight``).
        extra_tensors: generated tensors ``[(gguf name, float32 array)]``.
        check: refuses configs llama.cpp would not run as transformers does.
        rope_types: ``rope_type`` values supported (others are refused).
    """

    arch: gguf.MODEL_ARCH
    params: Callable[[Hparams], list[MetaItem]]
    permute_qk: bool = False
    norm_shift: float = 0.0
    vocabs: tuple[VocabKind, ...] = (VocabKind.SPM, VocabKind.BPE)
    bpe_pre: str = "default"
    add_space_prefix: bool | None = None
    drop: frozenset[str] = frozenset()
    extra_tensors: Callable[[Hparams], list[tuple[str, np.ndarray]]] = no_extra
    check: Callable[[Hparams], None] = no_check
    rope_types: frozenset[str] = field(default_factory=lambda: frozenset({"default", "linear"}))

    @property
    def name(self) -> str:
        """The GGUF architecture name (``"llama"``)."""
        return gguf.MODEL_ARCH_NAMES[self.arch]


_LLAMA = GgufArch(
    gguf.MODEL_ARCH.LLAMA,
    llama_params,
    permute_qk=True,
    vocabs=(VocabKind.SPM, VocabKind.SPM_JSON, VocabKind.BPE),
    bpe_pre="llama-bpe",
    extra_tensors=llama3_rope_freqs,
    rope_types=frozenset({"default", "linear", "llama3"}),
)

#: Supported HF ``model_type`` -> GGUF rules (llama.cpp ``conversion/__init__.py`` TEXT_MODEL_MAP).
ARCHITECTURES: dict[str, GgufArch] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": GgufArch(gguf.MODEL_ARCH.QWEN2, text_params, bpe_pre="qwen2"),
    "qwen3": GgufArch(gguf.MODEL_ARCH.QWEN3, text_params, bpe_pre="qwen2"),
    "gemma3_text": GgufArch(
        gguf.MODEL_ARCH.GEMMA3,
        gemma3_params,
        norm_shift=1.0,
        vocabs=(VocabKind.SPM, VocabKind.SPM_JSON, VocabKind.BPE),
        add_space_prefix=False,
        drop=frozenset({"lm_head.weight"}),
        check=gemma3_check,
    ),
    "phi3": GgufArch(
        gguf.MODEL_ARCH.PHI3,
        phi3_params,
        vocabs=(VocabKind.SPM, VocabKind.SPM_JSON, VocabKind.BPE),
        check=phi3_check,
        rope_types=frozenset({"default"}),
    ),
}


def gguf_arch_for(config: dict[str, Any]) -> GgufArch:
    """The GGUF rules for a base's config.json.

    Raises:
        UnsupportedModelError: ``model_type`` is not in :data:`ARCHITECTURES`, the RoPE scaling
            type is not supported for it, or the architecture's ``check`` refuses the config.
    """
    model_type = config.get("model_type")
    rules = ARCHITECTURES.get(str(model_type))
    if rules is None:
        raise UnsupportedModelError(f"GGUF export does not support model_type {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    hp = Hparams.of(config)
    rules.check(hp)
    if hp.rope_type not in rules.rope_types:
        raise UnsupportedModelError(
            f"GGUF export of {model_type} with rope_type {hp.rope_type!r} is not supported; supported: {', '.join(sorted(rules.rope_types))}"
        )
    return rules
