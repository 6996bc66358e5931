"""What every architecture's GGUF rules share: the normalised config (:class:`Hparams`), the common
``{arch}.*`` keys (:func:`text_params`) and the rule record itself (:class:`GgufArch`).

Sources (llama.cpp v0.5.0): ``conversion/base.py`` ``TextModel.__init__`` (RoPE parameter
normalisation) and ``TextModel.set_gguf_parameters`` (the common keys).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

if TYPE_CHECKING:
    import torch

V = gguf.GGUFValueType
K = gguf.Keys

#: One metadata value: ``(key, value, GGUF value type)``; ``key`` may hold ``{arch}``.
MetaItem = tuple[str, Any, gguf.GGUFValueType]


class VocabKind(Enum):
    """Tokenizer sources, tried in an architecture's order (``set_vocab`` in the converter)."""

    SPM = "sentencepiece"  # tokenizer.model (``TextModel._set_vocab_sentencepiece``)
    SPM_JSON = "sentencepiece-style tokenizer.json"  # byte_fallback BPE (``_set_vocab_llama_hf``)
    BPE = "byte-level BPE"  # tokenizer.json (``TextModel._set_vocab_gpt2``)
    GEMMA4 = "gemma4 tokenizer.json"  # SentencePiece-style BPE as tokenizer model "gemma4" (``Gemma4Model.set_vocab``)


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


def set_item(items: list[MetaItem], key: str, value: Any, vtype: gguf.GGUFValueType) -> None:
    """Add or overwrite ``key`` in place (``GGUFWriter.add_key_value`` keeps the first position)."""
    for i, (k, _, _) in enumerate(items):
        if k == key:
            items[i] = (key, value, vtype)
            return
    items.append((key, value, vtype))


def text_params(hp: Hparams) -> list[MetaItem]:
    """The keys of ``TextModel.set_gguf_parameters`` (``conversion/base.py``), in its order.

    Block count, context/embedding/feed-forward length, head counts, RoPE scaling (``linear``,
    ``yarn``, ``longrope``; ``llama3`` goes to ``rope_freqs``), M-RoPE ``rope.dimension_sections``
    (``mrope_section`` padded to 4), ``rope.freq_base`` (+ ``_swa``),
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
    if (sections := hp.rope.get("mrope_section")) is not None:  # padded to [time, height, width, extra]
        out.append((K.Rope.DIMENSION_SECTIONS, [int(x) for x in [*sections, 0, 0, 0, 0][:4]], V.ARRAY))
    if (theta := rp.get("rope_theta")) is not None:
        out.append((K.Rope.FREQ_BASE, float(theta), V.FLOAT32))
    if (local := (hp.rope.get("sliding_attention") or {}).get("rope_theta")) is not None:
        out.append((K.Rope.FREQ_BASE_SWA, float(local), V.FLOAT32))
    if (eps := f(("rms_norm_eps", "norm_eps"))) is not None:
        out.append((K.Attention.LAYERNORM_RMS_EPS, float(eps), V.FLOAT32))
    if (eps := f(("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"))) is not None:
        out.append((K.Attention.LAYERNORM_EPS, float(eps), V.FLOAT32))
    out += expert_params(hp)
    if (head_dim := hp.h.get("head_dim")) is not None:
        out += [(K.Attention.KEY_LENGTH, int(head_dim), V.UINT32), (K.Attention.VALUE_LENGTH, int(head_dim), V.UINT32)]
    return out


#: ``score_function``-style config values -> ``{arch}.expert_gating_func`` (``TextModel.set_gguf_parameters``;
#: ``ExpertGatingFuncType`` of the runtime's gguf-py, whose ``SQRTSOFTPLUS = 4`` the installed gguf-py lacks).
GATING = {"softmax": 1, "sigmoid": 2, "sqrtsoftplus": 4}


def expert_params(hp: Hparams) -> list[MetaItem]:
    """The expert keys of ``TextModel.set_gguf_parameters``: expert count, experts used, expert
    groups and groups used, the gating function (none for a dense config).

    Raises:
        UnsupportedModelError: a gating function the converter does not know.
    """
    from lorasave.errors import UnsupportedModelError

    out: list[MetaItem] = []
    if (n := hp.find(("num_local_experts", "num_experts", "n_routed_experts"))) is not None:
        out.append((K.LLM.EXPERT_COUNT, int(n), V.UINT32))
    if (n := hp.find(("num_experts_per_tok", "num_experts_per_token", "top_k_experts"))) is not None:
        out.append((K.LLM.EXPERT_USED_COUNT, int(n), V.UINT32))
    if (n := hp.h.get("n_group")) is not None:
        out.append((K.LLM.EXPERT_GROUP_COUNT, int(n), V.UINT32))
    if (n := hp.h.get("topk_group")) is not None:
        out.append((K.LLM.EXPERT_GROUP_USED_COUNT, int(n), V.UINT32))
    names = ("score_function", "scoring_func", "score_func", "moe_router_activation", "moe_router_activation_func", "expert_selection_fn")
    if (func := hp.find(names)) is not None:
        if func not in GATING:
            raise UnsupportedModelError(f"expert gating function {func!r} is not supported by llama.cpp's converter")
        out.append((K.LLM.EXPERT_GATING_FUNC, GATING[func], V.UINT32))
    return out


@dataclass(frozen=True)
class FusedExperts:
    """A checkpoint tensor that holds every expert's matrices at once (transformers 5's fused experts).

    Attributes:
        suffix: the stored name's end, with or without ``.weight`` (``"mlp.experts.gate_up_proj"``).
        into: the HF names, same prefix, its equal parts are written as (``("mlp.experts.gate_proj.weight",
            "mlp.experts.up_proj.weight")``): the names gguf-py maps to ``ffn_gate_exps`` / ``ffn_up_exps``.
        transposed: stored ``(n_expert, in, out)`` rather than ``(n_expert, out, in)`` (GGUF's
            numpy order): each part's last two axes are swapped.
        interleaved: the parts alternate along the split axis (gpt-oss ``gate_up_proj``) rather than
            following each other.
    """

    suffix: str
    into: tuple[str, ...]
    transposed: bool = False
    interleaved: bool = False


#: ``Qwen2MoeModel.modify_tensors`` (``conversion/qwen.py``): ``gate_up_proj`` ``(E, 2 * n_ff, n_embd)``
#: split on dim -2 into gate then up; ``down_proj`` ``(E, n_embd, n_ff)`` written as it is.
QWEN_FUSED = (
    FusedExperts("mlp.experts.gate_up_proj", ("mlp.experts.gate_proj.weight", "mlp.experts.up_proj.weight")),
    FusedExperts("mlp.experts.down_proj", ("mlp.experts.down_proj.weight",)),
)


@dataclass(frozen=True)
class ValueTransform:
    """A converter value transform that needs a checkpoint tensor whole (its ``modify_tensors`` reshaping,
    splitting, transposing or computing on it), written as one or more GGUF tensors.

    The tensor whose (text-model) name ends in ``suffix`` is replaced by one GGUF tensor per entry of
    ``into``: ``(name, fn)`` with ``name`` the HF name that replaces ``suffix`` (mapped by gguf-py's
    ``TensorNameMap``) and ``fn(hp, values)`` the GGUF tensor's values (numpy order, rows first) from
    the config and the whole float32 tensor (the merge, after any ``FusedExperts`` cut; called once per
    piece of a stacked tensor). The written shape is ``fn`` run on a meta tensor, so ``fn`` uses torch
    operations only. The pass buffers the tensor's row blocks in float32 until it is complete
    (``formats.gguf.output``): memory grows by one such tensor at a time.

    Example: DeepSeek's ``kv_b_proj`` into ``k_b_proj`` (per-head transpose) and ``v_b_proj``
    (``arch.deepseek``).
    """

    suffix: str
    into: tuple[tuple[str, Callable[[Hparams, torch.Tensor], torch.Tensor]], ...]

    def matches(self, hf_name: str) -> bool:
        """Whether ``hf_name`` is the tensor this transform replaces."""
        return hf_name.endswith("." + self.suffix) or hf_name == self.suffix


@dataclass(frozen=True)
class TextOf:
    """Which tensors of a multimodal checkpoint are its language model's, and their text-model names.

    ``TextModel.filter_tensors`` + ``ModelBase.filter_tensors`` (``conversion/base.py``): a name
    starting with one of ``skip_prefixes`` or containing one of ``skip_parts`` is a vision / audio
    tower's or a projector's (left out of the language model's GGUF; llama.cpp's ``mmproj`` file holds
    them); ``strip`` is removed from the rest (``model.language_model.layers.0...`` ->
    ``model.layers.0...``; transformers 4's ``language_model.model.layers.0...`` -> the same).
    """

    skip_prefixes: tuple[str, ...]
    skip_parts: tuple[str, ...]
    strip: str = "language_model."

    def name(self, hf_name: str) -> str | None:
        """The text-model name of checkpoint tensor ``hf_name``, or None when it is not the language model's."""
        if hf_name.startswith(self.skip_prefixes) or any(part in hf_name for part in self.skip_parts):
            return None
        return hf_name.replace(self.strip, "")


#: The converter's rule for every ``TextModel`` of a multimodal checkpoint (``conversion/base.py``).
MULTIMODAL = TextOf(
    skip_prefixes=("mlp", "vit.", "vpm.", "siglip2.", "conformer.", "merger.", "resampler.", "sound_encoder.", "sound_projection.", "speech_embeddings."),
    skip_parts=(
        *("visual.", "vision.", "audio.", "talker.", "vision_", "audio_", "token2wav.", "code2wav.", "projector.", "pre_mm_projector_norm"),
        *("image_newline", "view_seperator", "patch_embed", "patch_embedding", "patch_merger.", "patch_merge_mlp.", "model.connector."),
    ),
)


def no_extra(hp: Hparams) -> list[tuple[str, np.ndarray]]:
    """No generated tensors."""
    return []


def no_check(hp: Hparams) -> None:
    """Nothing to refuse beyond the RoPE type."""


@dataclass(frozen=True)
class GgufArch:
    """How one HF ``model_type`` becomes GGUF.

    Attributes:
        arch: gguf-py architecture (``gguf.MODEL_ARCH.LLAMA``); its name is ``general.architecture``.
        params: hyper-parameters -> ``{arch}.*`` metadata items.
        permute_qk: apply ``LlamaModel.permute`` to ``q_proj`` / ``k_proj`` rows (and biases).
        norm_shift: added to every tensor whose HF name ends in ``norm.weight`` (Gemma: 1.0) but those
            ending in one of ``no_shift``.
        no_shift: name ends that get no ``norm_shift`` (Qwen3.5's gated ``linear_attn.norm.weight``).
        vocabs: tokenizer kinds in the order the converter's ``set_vocab`` tries them.
        bpe_pre: ``tokenizer.ggml.pre`` when the BPE pre-tokenizer hash is unknown.
        add_space_prefix: ``tokenizer.ggml.add_space_prefix`` written with a SentencePiece vocab, or None.
        drop: HF tensor names the converter skips (Gemma's ``lm_head.weight``).
        extra_tensors: generated tensors ``[(gguf name, float32 array)]``.
        check: refuses configs llama.cpp would not run as transformers does.
        rope_types: ``rope_type`` values supported (others are refused).
        fused: the fused expert tensors the checkpoint may hold, and how they are split
            (per-expert tensors ``...experts.N.<name>`` are stacked whatever this says).
        text_of: for a multimodal checkpoint, which tensors are the language model's and their
            text-model names (:data:`MULTIMODAL`); None: every tensor, names as they are.
        weight_suffix: tensor names ending in one of these get ``.weight`` appended before mapping
            (Gemma 4's ``layer_scalar``, the converter's ``filter_tensors``).
        special_tokens: ``(kind, added token text)`` set as ``tokenizer.ggml.<kind>_token_id`` when the
            tokenizer files name none of that kind (``SpecialVocab._set_special_token`` in a converter
            ``set_vocab``, e.g. GLM-4's ``eot`` = ``<|user|>``).
        mtp_layers: checkpoint layers at index ``>= num_hidden_layers`` (GLM-4.5) and tensors named
            ``mtp.*`` (Qwen3.5) are multi-token-prediction (``nextn``) layers, left out of the file as the
            converter's ``--no-mtp`` does.
        expert_note: a note for every file with expert tensors (``ffn_*_exps``), ``{types}`` replaced by
            their GGML types (gpt-oss: the merged experts are float, not the checkpoint's MXFP4).
        transforms: value transforms that need the whole tensor (:class:`ValueTransform`).
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
    fused: tuple[FusedExperts, ...] = QWEN_FUSED
    special_tokens: tuple[tuple[str, str], ...] = ()
    text_of: TextOf | None = None
    weight_suffix: tuple[str, ...] = ()
    expert_note: str | None = None
    mtp_layers: bool = False
    transforms: tuple[ValueTransform, ...] = ()
    no_shift: tuple[str, ...] = ()

    def shift(self, hf_name: str) -> float:
        """What is added to tensor ``hf_name``'s values: :attr:`norm_shift` for a ``norm.weight`` not in :attr:`no_shift`, else 0."""
        return self.norm_shift if hf_name.endswith("norm.weight") and not hf_name.endswith(self.no_shift) else 0.0

    def text_name(self, hf_name: str) -> str | None:
        """The text-model name of checkpoint tensor ``hf_name`` (itself without :attr:`text_of`, plus
        ``.weight`` after a :attr:`weight_suffix`), or None for a tensor the language model's GGUF leaves
        out (a vision tower's)."""
        name = hf_name if self.text_of is None else self.text_of.name(hf_name)
        if name is not None and name.endswith("e_score_correction_bias"):  # ModelBase.filter_tensors, every model
            name = name.replace("e_score_correction_bias", "e_score_correction.bias")
        return name + ".weight" if name is not None and self.weight_suffix and name.endswith(self.weight_suffix) else name

    @property
    def name(self) -> str:
        """The GGUF architecture name (``"llama"``)."""
        return gguf.MODEL_ARCH_NAMES[self.arch]
