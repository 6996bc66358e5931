"""GGUF output types and the GGML type of every tensor, as llama.cpp v0.5.0 chooses them.

Every type is written in one streaming pass, tensor by tensor, from the float32 merge; no
intermediate file:

* ``f32``, ``f16``, ``bf16``, ``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``: each merged tensor is
  encoded with gguf-py's arithmetic (``gguf.quants``, through ``formats.gguf.encode``); the
  llama.cpp runtime is not needed.
* the k-quants (``q2_k`` ... ``q6_k``) and the i-quants that need no importance matrix (``iq4_nl``,
  ``iq4_xs``, ``iq3_s``, ``iq3_m``), :attr:`GgufType.needs_runtime`: every row block is encoded by
  llama.cpp's own ``ggml_quantize_chunk`` (``runtimes.llama_cpp.ggml``, the pinned runtime's
  libggml-base), every tensor of the file included (the Q8_0/F16 fallbacks too), with the per-tensor
  type mix of ``llama-quant.cpp`` (:func:`kquant_types`), so that each tensor's bytes are those
  ``llama_model_quantize`` writes from an F32 GGUF of the same merge.

Per-tensor types of the streamed files:

* ``f32`` / ``f16`` / ``bf16`` / ``q8_0`` are what ``convert_hf_to_gguf.py --outtype`` writes
  (``ModelBase.prepare_tensors``, ``conversion/base.py``): F32 for 1-D tensors, ``*_norm.weight``,
  names not ending in ``.weight`` (biases) and the converter's always-F32 list (router, position
  embeddings, ...); the requested type for the rest; F16 when a row (``ne0``) is not a multiple of
  the block size (the converter catches ``gguf.QuantError``).
* ``q4_0`` / ``q4_1`` / ``q5_0`` / ``q5_1`` are what ``llama-quantize`` makes of the converter's
  F16 file (``src/llama-quant.cpp``): ``tensor_allows_quantization`` decides which tensors are
  quantized (2-D+, name ending in ``weight``, no ``_norm.weight``, not a few small special
  tensors), the others keep their converter type; ``llama_tensor_get_type_impl`` promotes
  ``output.weight`` -- or ``token_embd.weight`` when the embeddings are tied (no
  ``output.weight``) -- to Q6_K (Q8_0 when ``ne0`` is not a multiple of the block);
  ``tensor_type_fallback`` then demotes a type whose block does not divide ``ne0`` (Q6_K -> Q8_0,
  a 32-block type -> F16).

**The substitution rule.** Where llama.cpp picks a K type that gguf-py cannot encode (for the
gguf-py types this is only the Q6_K of the output / tied embedding), the file gets the type
llama.cpp itself falls back to for that K type in ``tensor_type_fallback`` (Q2_K/Q3_K -> Q4_0,
Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0): never fewer bits than llama.cpp's choice, so never less
accurate, at a slightly larger size. Every substitution is listed in the result notes. Ask for a
k-quant type to get llama.cpp's exact mix.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType


class GgufType(Enum):
    """An output type of ``lorasave gguf --type`` (llama.cpp's ``--outtype`` / ``llama-quantize`` names)."""

    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    Q8_0 = "q8_0"
    Q4_0 = "q4_0"
    Q4_1 = "q4_1"
    Q5_0 = "q5_0"
    Q5_1 = "q5_1"
    Q2_K = "q2_k"
    Q3_K_S = "q3_k_s"
    Q3_K_M = "q3_k_m"
    Q3_K_L = "q3_k_l"
    Q4_K_S = "q4_k_s"
    Q4_K_M = "q4_k_m"
    Q5_K_S = "q5_k_s"
    Q5_K_M = "q5_k_m"
    Q6_K = "q6_k"
    IQ4_NL = "iq4_nl"
    IQ4_XS = "iq4_xs"
    IQ3_S = "iq3_s"
    IQ3_M = "iq3_m"

    @property
    def spec(self) -> TypeSpec:
        """The row of :data:`TYPES` for this type."""
        return TYPES[self]

    @property
    def file_type(self) -> gguf.LlamaFileType:
        """``general.file_type`` of the finished file."""
        return self.spec.file_type

    @property
    def default_qtype(self) -> gguf.GGMLQuantizationType:
        """``llama_ftype_get_default_type``: the GGML type of an ordinary weight matrix."""
        return self.spec.default_qtype

    @property
    def streamed(self) -> bool:
        """Whether it is written in the streaming pass: every type is (the k-quants through ``ggml_quantize_chunk``)."""
        return True

    @property
    def needs_runtime(self) -> bool:
        """Whether its blocks are encoded by llama.cpp's ``ggml_quantize_chunk`` (the k-quants), so the runtime is required."""
        return self.spec.default_qtype not in WRITABLE

    @property
    def kquant(self) -> bool:
        """A k-quant or i-quant file type (``q2_k`` ... ``q6_k``, ``iq4_nl``...): llama-quant.cpp's
        per-tensor mix (:func:`kquant_types`), every block encoded by ``ggml_quantize_chunk``."""
        return self.needs_runtime

    @property
    def converter(self) -> bool:
        """Whether ``convert_hf_to_gguf.py --outtype`` writes it (else ``llama-quantize`` does)."""
        return self.spec.converter

    @classmethod
    def parse(cls, name: str | GgufType) -> GgufType:
        """``GgufType("q4_k_m")``, case-insensitive.

        Raises:
            ValueError: not a known type (callers turn it into ``InvalidOptionError``).
        """
        if isinstance(name, GgufType):
            return name
        return cls(str(name).lower())


@dataclass(frozen=True)
class TypeSpec:
    """What one :class:`GgufType` means.

    Attributes:
        file_type: ``general.file_type`` (``LlamaFileType``, same values as ``llama_ftype``).
        default_qtype: GGML type of ordinary weight matrices (``llama_ftype_get_default_type``).
        converter: True when ``convert_hf_to_gguf.py`` writes it (its rules apply), False when
            ``llama-quantize`` does (``llama-quant.cpp``'s rules apply).
    """

    file_type: gguf.LlamaFileType
    default_qtype: gguf.GGMLQuantizationType
    converter: bool


#: Every output type (``llama_ftype_get_default_type`` in ``src/llama-quant.cpp`` for the default).
TYPES: dict[GgufType, TypeSpec] = {
    GgufType.F32: TypeSpec(F.ALL_F32, Q.F32, True),
    GgufType.F16: TypeSpec(F.MOSTLY_F16, Q.F16, True),
    GgufType.BF16: TypeSpec(F.MOSTLY_BF16, Q.BF16, True),
    GgufType.Q8_0: TypeSpec(F.MOSTLY_Q8_0, Q.Q8_0, True),
    GgufType.Q4_0: TypeSpec(F.MOSTLY_Q4_0, Q.Q4_0, False),
    GgufType.Q4_1: TypeSpec(F.MOSTLY_Q4_1, Q.Q4_1, False),
    GgufType.Q5_0: TypeSpec(F.MOSTLY_Q5_0, Q.Q5_0, False),
    GgufType.Q5_1: TypeSpec(F.MOSTLY_Q5_1, Q.Q5_1, False),
    GgufType.Q2_K: TypeSpec(F.MOSTLY_Q2_K, Q.Q2_K, False),
    GgufType.Q3_K_S: TypeSpec(F.MOSTLY_Q3_K_S, Q.Q3_K, False),
    GgufType.Q3_K_M: TypeSpec(F.MOSTLY_Q3_K_M, Q.Q3_K, False),
    GgufType.Q3_K_L: TypeSpec(F.MOSTLY_Q3_K_L, Q.Q3_K, False),
    GgufType.Q4_K_S: TypeSpec(F.MOSTLY_Q4_K_S, Q.Q4_K, False),
    GgufType.Q4_K_M: TypeSpec(F.MOSTLY_Q4_K_M, Q.Q4_K, False),
    GgufType.Q5_K_S: TypeSpec(F.MOSTLY_Q5_K_S, Q.Q5_K, False),
    GgufType.Q5_K_M: TypeSpec(F.MOSTLY_Q5_K_M, Q.Q5_K, False),
    GgufType.Q6_K: TypeSpec(F.MOSTLY_Q6_K, Q.Q6_K, False),
    # the i-quants whose llama-quant.cpp mix needs no importance matrix (``tensor_requires_imatrix``
    # is false for every tensor they give without one): IQ3_XXS / IQ3_XS put IQ2_S / IQ3_XXS on
    # attn_q/attn_k/ffn_gate/ffn_up, the IQ2 / IQ1 types and Q2_K_S need one throughout
    GgufType.IQ4_NL: TypeSpec(F.MOSTLY_IQ4_NL, Q.IQ4_NL, False),
    GgufType.IQ4_XS: TypeSpec(F.MOSTLY_IQ4_XS, Q.IQ4_XS, False),
    GgufType.IQ3_S: TypeSpec(F.MOSTLY_IQ3_S, Q.IQ3_S, False),
    GgufType.IQ3_M: TypeSpec(F.MOSTLY_IQ3_M, Q.IQ3_S, False),
}

#: GGML types gguf-py 0.19 can encode (``gguf.quants`` classes overriding ``quantize_blocks``, plus
#: the float types). The K and IQ types are decode-only there.
WRITABLE: frozenset[gguf.GGMLQuantizationType] = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1})

#: llama.cpp's own demotion of a K type (``tensor_type_fallback``, ``src/llama-quant.cpp``): what
#: the streamed writer uses where llama.cpp would pick a type gguf-py cannot encode.
K_SUBSTITUTE: dict[gguf.GGMLQuantizationType, gguf.GGMLQuantizationType] = {
    Q.Q2_K: Q.Q4_0,
    Q.Q3_K: Q.Q4_0,
    Q.Q4_K: Q.Q5_0,
    Q.Q5_K: Q.Q5_1,
    Q.Q6_K: Q.Q8_0,
}

#: Tensors ``convert_hf_to_gguf.py`` always writes as F32 (``ModelBase.prepare_tensors``).
_CONVERTER_F32 = tuple(
    getattr(gguf.MODEL_TENSOR, n)
    for n in (
        "FFN_GATE_INP",
        "FFN_GATE_INP_SHEXP",
        "POS_EMBD",
        "TOKEN_TYPES",
        "SSM_CONV1D",
        "SHORTCONV_CONV",
        "TIME_MIX_FIRST",
        "TIME_MIX_W1",
        "TIME_MIX_W2",
        "TIME_MIX_DECAY_W1",
        "TIME_MIX_DECAY_W2",
        "TIME_MIX_LERP_FUSED",
        "POSNET_NORM1",
        "POSNET_NORM2",
        "V_ENC_EMBD_POS",
        "A_ENC_EMBD_POS",
        "ALTUP_CORRECT_COEF",
        "ALTUP_PREDICT_COEF",
        "SSM_CONV1D_Q",
        "SSM_CONV1D_K",
        "SSM_CONV1D_V",
        "INDEXER_PROJ",
    )
    if hasattr(gguf.MODEL_TENSOR, n)
)
_CONVERTER_F32_RE = re.compile("^(?:" + "|".join(re.escape(gguf.TENSOR_NAMES[k]).replace(re.escape("{bid}"), r"\d+") for k in _CONVERTER_F32) + r")\.weight$")

#: Name fragments ``tensor_allows_quantization`` (``src/llama-quant.cpp``) never quantizes.
_NOT_QUANTIZED = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)
_NOT_QUANTIZED_EXACT = ("position_embd.weight", "token_types.weight")


def block_size(qtype: gguf.GGMLQuantizationType) -> int:
    """Elements per block of ``qtype`` (1 for the float types)."""
    return gguf.GGML_QUANT_SIZES[qtype][0]


def tensor_nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    """Bytes of a tensor of ``shape`` (numpy order, rows first) encoded as ``qtype``."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    return n // block * type_size


def converter_type(name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """``ModelBase.prepare_tensors`` (``conversion/base.py``): the type the converter writes for ``--outtype``.

    Args:
        name: GGUF tensor name (``blk.0.attn_q.weight``).
        shape: numpy shape, rows first; ``shape[-1]`` is ggml's ``ne0``.
        qtype: the outtype's GGML type (F32, F16, BF16 or Q8_0).
    """
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or _CONVERTER_F32_RE.match(name):
        return Q.F32
    if shape[-1] % block_size(qtype) != 0:  # gguf.QuantError -> "falling back to F16"
        return Q.F16
    return qtype


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """``tensor_allows_quantization`` (``src/llama-quant.cpp``) with ``quantize_output_tensor`` on."""
    if len(shape) < 2 or not name.endswith("weight") or name in _NOT_QUANTIZED_EXACT:
        return False
    return not any(part in name for part in _NOT_QUANTIZED)


#: ``tensor_type_fallback`` (``src/llama-quant.cpp``): the type a tensor gets when the block of the
#: type chosen for it does not divide its row (``ne0``); a 32-block type maps to itself (then F16).
FALLBACK: dict[gguf.GGMLQuantizationType, gguf.GGMLQuantizationType] = {
    **K_SUBSTITUTE,
    Q.IQ3_S: Q.IQ4_NL,
    Q.IQ4_XS: Q.IQ4_NL,
}


def _fallback(ne0: int, qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """``tensor_type_fallback``: a type whose block divides ``ne0``."""
    if ne0 % block_size(qtype) == 0:
        return qtype
    out = FALLBACK.get(qtype, qtype)
    return out if ne0 % block_size(out) == 0 else Q.F16


def llama_cpp_type(name: str, shape: tuple[int, ...], type: GgufType, *, tied: bool) -> gguf.GGMLQuantizationType:
    """The GGML type llama.cpp gives a tensor for ``type``: the converter's choice for converter
    types, ``llama-quantize``'s (on the converter's F16 file) for the others.

    For the k-quants only the tensors llama.cpp does not quantize are answered here: the others
    depend on their place among the file's tensors (``use_more_bits`` per layer...), see
    :func:`kquant_types`.

    Args:
        name: GGUF tensor name.
        shape: numpy shape, rows first; ``shape[-1]`` is ``ne0``.
        type: an output type.
        tied: the model has no ``output.weight`` (``token_embd.weight`` is also the output).

    Raises:
        ValueError: ``type`` is a k-quant and the tensor is quantized (use :func:`tensor_types`).
    """
    if type.converter:
        return converter_type(name, shape, type.default_qtype)
    if not allows_quantization(name, shape):
        return converter_type(name, shape, Q.F16)
    if type.kquant:
        raise ValueError(f"the {type.value} type of {name} depends on the whole file: use tensor_types")
    new = type.default_qtype
    ne0 = shape[-1]
    # llama_tensor_get_type_impl: the output (or the tied token embedding) gets more bits
    if name == "output.weight" or (tied and name in ("token_embd.weight", "per_layer_token_embd.weight")):
        new = Q.Q8_0 if ne0 % block_size(new) != 0 else (Q.Q6_K if new is not Q.Q8_0 else new)
    return _fallback(ne0, new)


# --- llama-quantize's overrides --------------------------------------------------------------------

#: GGML types ``--output-tensor-type`` / ``--token-embedding-type`` accept (llama-quantize's
#: ``parse_ggml_type``: a ``ggml_type_name``, any case): the types lorasave encodes through
#: ``ggml_quantize_chunk`` without an importance matrix.
OVERRIDE_TYPES: tuple[gguf.GGMLQuantizationType, ...] = (
    Q.F32,
    Q.F16,
    Q.BF16,
    Q.Q8_0,
    Q.Q4_0,
    Q.Q4_1,
    Q.Q5_0,
    Q.Q5_1,
    Q.Q2_K,
    Q.Q3_K,
    Q.Q4_K,
    Q.Q5_K,
    Q.Q6_K,
    Q.IQ4_NL,
    Q.IQ4_XS,
    Q.IQ3_S,
)


def parse_ggml_type(name: str | gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """A GGML type name (``"q6_k"``, ``"Q8_0"``, ``"f16"``) -> the type, one of :data:`OVERRIDE_TYPES`.

    Raises:
        InvalidOptionError: not one of them.
    """
    from lorasave.errors import InvalidOptionError

    if isinstance(name, gguf.GGMLQuantizationType) and name in OVERRIDE_TYPES:
        return name
    by_name = {t.name.lower(): t for t in OVERRIDE_TYPES}
    t = by_name.get(str(name).lower())
    if t is None:
        raise InvalidOptionError(f"GGML type {name!r} is not supported here; choose one of {', '.join(by_name)}")
    return t


@dataclass(frozen=True)
class QuantOptions:
    """``llama_model_quantize_params`` fields that change the per-tensor types (llama-quantize's options).

    Attributes:
        pure: ``--pure``: every quantized tensor gets the file type's default type (then
            ``tensor_type_fallback``), no mix (``llama_tensor_get_type`` skips ``llama_tensor_get_type_impl``).
        output_tensor_type: ``--output-tensor-type``: the type of ``output.weight`` (and, through
            ``llama_tensor_get_type_impl``, of a tied ``token_embd.weight`` when no
            ``token_embedding_type`` is given and ``pure`` is off).
        token_embedding_type: ``--token-embedding-type``: the type of ``token_embd.weight``.
    """

    pure: bool = False
    output_tensor_type: gguf.GGMLQuantizationType | None = None
    token_embedding_type: gguf.GGMLQuantizationType | None = None

    @property
    def active(self) -> bool:
        """Whether any option differs from llama-quantize's default."""
        return self.pure or self.output_tensor_type is not None or self.token_embedding_type is not None

    def settings(self) -> dict[str, object]:
        """The options as ``lorasave.json`` settings (type names lower case, None when not given)."""
        return {
            "pure": self.pure,
            "output_tensor_type": self.output_tensor_type.name.lower() if self.output_tensor_type is not None else None,
            "token_embedding_type": self.token_embedding_type.name.lower() if self.token_embedding_type is not None else None,
        }


def _override(name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType, option: str) -> gguf.GGMLQuantizationType:
    """An override type taken as it is (``llama_tensor_get_type`` returns it without ``tensor_type_fallback``).

    Raises:
        InvalidOptionError: its block does not divide the tensor's rows (``ggml_quantize_chunk`` cannot encode it).
    """
    from lorasave.errors import InvalidOptionError

    if shape[-1] % block_size(qtype):
        raise InvalidOptionError(
            f"--{option} {qtype.name.lower()}: {name} has rows of {shape[-1]} values, not a multiple of the {qtype.name} block ({block_size(qtype)})"
        )
    return qtype


# --- the k-quant mix -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """What ``llama-quant.cpp`` reads of the model besides the tensor names and shapes.

    Attributes:
        arch: GGUF architecture name (``"llama"``, ``"qwen2"``...).
        n_layer: ``{arch}.block_count`` (``hparams.n_layer_all``: the ``n_ffn_down`` counter).
        n_head, n_head_kv: heads of layer 0 (``n_gqa() = n_head / n_head_kv``, 0 without KV heads).
        n_expert: ``{arch}.expert_count`` (0 for a dense model).
    """

    arch: str
    n_layer: int
    n_head: int = 1
    n_head_kv: int = 1
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        """``llama_hparams::n_gqa``."""
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        """``model.type == LLM_TYPE_70B`` (``load_arch_hparams`` of ``src/models/<arch>.cpp``; only this type matters for quantization)."""
        if self.arch == "llama" and (self.n_expert == 8 or self.n_head == self.n_head_kv):
            return False  # 8x7B / 8x22B, and 65B (no GQA)
        return _SEVENTY_B_LAYERS.get(self.arch) == self.n_layer


#: Architectures whose ``load_arch_hparams`` sets ``LLM_TYPE_70B``, and at how many layers.
_SEVENTY_B_LAYERS = {"llama": 80, "qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}


#: ``tensor_get_category``: the first name fragment found decides (``output`` and ``token_embd`` are exact names).
_CATEGORIES = (
    ("attn_qkv.weight", "attn_v"),  # category_is_attn_v: ATTENTION_QKV, ATTENTION_KV_B and ATTENTION_V count as one
    ("attn_kv_b.weight", "attn_v"),
    ("attn_v.weight", "attn_v"),
    ("attn_k.weight", "attn_k"),
    ("attn_q.weight", "attn_q"),
    ("attn_output.weight", "attn_output"),
    ("ffn_up", "ffn_up"),
    ("ffn_gate", "ffn_gate"),
    ("ffn_down", "ffn_down"),
)


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    return next((cat for frag, cat in _CATEGORIES if frag in name), "other")


def _c_div(a: int, b: int) -> int:
    """C integer division (toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """``use_more_bits`` of ``llama_tensor_get_type_impl``: the first and last eighth of the layers, and every third one between."""
    e = _c_div(n_layers, 8)
    d = i_layer - e
    return i_layer < e or i_layer >= _c_div(7 * n_layers, 8) or (d - _c_div(d, 3) * 3) == 2


@dataclass(frozen=True)
class _At:
    """Where a tensor stands, for a rule: its counter and the model facts."""

    i: int  # i_attention_wv or the FFN layer (layer_info)
    n: int  # n_attention_wv or n_layer
    m: ModelFacts

    @property
    def falcon(self) -> bool:
        return self.m.arch == "falcon"

    @property
    def more(self) -> bool:
        return use_more_bits(self.i, self.n)


_Rule = Callable[[_At], "gguf.GGMLQuantizationType | None"]

#: ``llama_tensor_get_type_impl`` (``src/llama-quant.cpp`` of llama.cpp v0.5.0), the k-quant file types
#: and the i-quants that need no importance matrix (their rules without one):
#: (category, type) -> the tensor's type before ``tensor_type_fallback``, or None for the file's
#: default type. ``attn_v`` rules see ``i = i_attention_wv`` (the rank of the tensor among the
#: file's attn_v / attn_qkv / attn_kv_b tensors in llama.cpp's order) and ``n = n_attention_wv``;
#: ``ffn_down`` rules the layer and ``n_layer``. Every other (category, type) keeps the default.
#: Applied after these: an ``attn_v`` Q3_K / Q4_K of a 70B model becomes Q5_K, an 8-expert model's
#: ``attn_v`` / ``attn_k`` Q8_0 (:func:`_kquant_type`). The ATTENTION_QKV branch of the C++ is
#: unreachable (``category_is_attn_v`` is tested first) and is left out.
KQUANT_RULES: dict[tuple[str, GgufType], _Rule] = {
    ("attn_v", GgufType.Q2_K): lambda a: Q.Q4_K if a.m.n_gqa >= 4 else Q.Q3_K,
    ("attn_v", GgufType.Q3_K_M): lambda a: Q.Q5_K if a.i < 2 else Q.Q4_K,
    ("attn_v", GgufType.Q3_K_L): lambda a: Q.Q5_K,
    ("attn_v", GgufType.Q4_K_M): lambda a: Q.Q6_K if a.more else None,
    ("attn_v", GgufType.Q5_K_M): lambda a: Q.Q6_K if a.more else None,
    ("attn_v", GgufType.Q4_K_S): lambda a: Q.Q5_K if a.i < 4 else None,
    ("ffn_down", GgufType.Q2_K): lambda a: Q.Q3_K,
    ("ffn_down", GgufType.Q3_K_M): lambda a: Q.Q5_K if a.i < _c_div(a.n, 16) else Q.Q4_K if not a.falcon or a.more else Q.Q3_K,
    ("ffn_down", GgufType.Q3_K_L): lambda a: Q.Q4_K if a.falcon else Q.Q5_K,
    ("ffn_down", GgufType.Q4_K_M): lambda a: (Q.Q6_K if a.i < _c_div(a.n, 16) else Q.Q5_K if a.more else Q.Q4_K) if a.falcon else (Q.Q6_K if a.more else None),
    ("ffn_down", GgufType.Q5_K_M): lambda a: Q.Q6_K if a.more else None,
    ("ffn_down", GgufType.Q4_K_S): lambda a: Q.Q5_K if not a.falcon and a.i < _c_div(a.n, 8) else None,
    # attn_output: falcon only changes q3_k_l; an 8-expert model takes Q5_K for q2_k, q3_k_s, q3_k_m, q4_k_s, q4_k_m
    ("attn_output", GgufType.Q2_K): lambda a: None if a.falcon else Q.Q5_K if a.m.n_expert == 8 else Q.Q3_K,
    ("attn_output", GgufType.Q3_K_M): lambda a: None if a.falcon else Q.Q5_K if a.m.n_expert == 8 else Q.Q4_K,
    ("attn_output", GgufType.Q3_K_L): lambda a: Q.Q4_K if a.falcon else None if a.m.n_expert == 8 else Q.Q5_K,
    ("attn_output", GgufType.Q3_K_S): lambda a: Q.Q5_K if a.m.n_expert == 8 and not a.falcon else None,
    ("attn_output", GgufType.Q4_K_S): lambda a: Q.Q5_K if a.m.n_expert == 8 and not a.falcon else None,
    ("attn_output", GgufType.Q4_K_M): lambda a: Q.Q5_K if a.m.n_expert == 8 and not a.falcon else None,
    # the i-quants without an importance matrix (``qs.has_imatrix`` false)
    ("attn_v", GgufType.IQ4_NL): lambda a: Q.Q5_K if a.m.n_gqa >= 4 else None,
    ("attn_v", GgufType.IQ4_XS): lambda a: Q.Q5_K if a.m.n_gqa >= 4 else None,
    ("attn_v", GgufType.IQ3_S): lambda a: Q.Q4_K if a.m.n_gqa >= 4 else None,
    ("attn_v", GgufType.IQ3_M): lambda a: Q.Q4_K,
    ("ffn_down", GgufType.IQ4_NL): lambda a: Q.Q5_K if a.i < _c_div(a.n, 8) else None,
    ("ffn_down", GgufType.IQ4_XS): lambda a: Q.Q5_K if a.i < _c_div(a.n, 8) else None,
    ("ffn_down", GgufType.IQ3_M): lambda a: Q.Q4_K if a.i < _c_div(a.n, 8) or (a.m.n_expert == 8 and a.more) else None,
    ("attn_output", GgufType.IQ4_NL): lambda a: Q.Q5_K if a.m.n_expert == 8 and not a.falcon else None,
    ("attn_output", GgufType.IQ4_XS): lambda a: Q.Q5_K if a.m.n_expert == 8 and not a.falcon else None,
    ("attn_output", GgufType.IQ3_S): lambda a: Q.Q5_K if a.m.n_expert == 8 and not a.falcon else None,
    ("attn_output", GgufType.IQ3_M): lambda a: None if a.falcon else Q.Q5_K if a.m.n_expert == 8 else Q.Q4_K,
}


def _layer(name: str) -> int:
    """The ``blk.%d.`` number of a name, or -1 (``weight_name_comparer``)."""
    m = re.match(r"blk\.([+-]?\d+)", name)
    return int(m.group(1)) if m else -1


def llama_cpp_order(names: Sequence[str]) -> list[int]:
    """Indices of ``names`` in the order ``llama_model_quantize`` visits them (``weights_map``'s
    ``weight_name_comparer``: by ``blk.N`` number, names without one first, then by name)."""
    return sorted(range(len(names)), key=lambda i: (_layer(names[i]), names[i].encode()))


def kquant_types(
    tensors: Sequence[tuple[str, tuple[int, ...]]], type: GgufType, model: ModelFacts, options: QuantOptions | None = None
) -> list[gguf.GGMLQuantizationType]:
    """``llama_tensor_get_type`` for every tensor of a k-quant file (or of any llama-quantize type
    with :class:`QuantOptions`), in the order given.

    llama.cpp visits the tensors in :func:`llama_cpp_order`; ``i_attention_wv`` and ``i_ffn_down``
    count the quantized tensors of their category seen so far (the layer of ``ffn_down`` is that
    counter for a dense model, the ``blk.N`` number for a MoE one). A tensor llama.cpp does not
    quantize keeps the converter's F16-file type (as the gguf-py types do). The output tensor (and
    the token embedding when tied: no ``output.weight``) gets Q6_K, Q8_0 when its row is not a
    multiple of the default type's block (or for Falcon); then ``tensor_type_fallback``.

    With ``options`` (``llama_tensor_get_type``): ``token_embedding_type`` and ``output_tensor_type``
    are taken as they are for their tensor; ``pure`` gives every other quantized tensor the default
    type, then ``tensor_type_fallback``; without ``pure`` a tied ``token_embd.weight`` takes
    ``output_tensor_type`` through the mix, then ``tensor_type_fallback``.

    Raises:
        InvalidOptionError: an override type whose block does not divide its tensor's rows.
    """
    opts = options or QuantOptions()
    names = [n for n, _ in tensors]
    tied = "output.weight" not in names
    n_wv = sum(1 for n in names if _category(n) == "attn_v")
    counters = {"attn_v": 0, "ffn_down": 0}
    out: list[gguf.GGMLQuantizationType | None] = [None] * len(tensors)
    default = type.default_qtype
    for idx in llama_cpp_order(names):
        name, shape = tensors[idx]
        if not allows_quantization(name, shape):
            out[idx] = converter_type(name, shape, Q.F16)
            continue
        cat = _category(name)
        new = default
        ne0 = shape[-1]
        if cat == "token_embd" and opts.token_embedding_type is not None:
            out[idx] = _override(name, shape, opts.token_embedding_type, "token-embedding-type")
            continue
        if cat == "output" and opts.output_tensor_type is not None:
            out[idx] = _override(name, shape, opts.output_tensor_type, "output-tensor-type")
            continue
        if opts.pure:
            out[idx] = _fallback(ne0, default)
            continue
        if cat == "output" or (tied and cat == "token_embd"):
            if opts.output_tensor_type is not None:
                new = opts.output_tensor_type
            else:
                new = Q.Q8_0 if model.arch == "falcon" or ne0 % block_size(default) else Q.Q6_K
        elif cat in counters:
            if cat == "attn_v":
                at = _At(counters[cat], n_wv, model)
            else:
                i = _layer(name) if model.n_expert > 1 else counters[cat]
                if model.n_expert > 1 and not 0 <= i < model.n_layer:
                    raise ValueError(f"bad layer {i} for tensor {name}")
                at = _At(i, model.n_layer, model)
            rule = KQUANT_RULES.get((cat, type))
            new = (rule(at) if rule else None) or default
            if cat == "attn_v":
                if model.is_70b and new in (Q.Q3_K, Q.Q4_K):
                    new = Q.Q5_K
                if model.n_expert == 8:
                    new = Q.Q8_0
            counters[cat] += 1
        elif cat == "attn_k" and model.n_expert == 8:
            new = Q.Q8_0
        else:
            rule = KQUANT_RULES.get((cat, type))
            new = (rule(_At(0, 0, model)) if rule else None) or default
        out[idx] = _fallback(ne0, new)
    return [t for t in out if t is not None]


def uses_ggml(type: GgufType, options: QuantOptions | None = None) -> bool:
    """Whether a file of ``type`` is llama-quantize's exact mix, every block encoded by ``ggml_quantize_chunk``
    (the k-quants; any llama-quantize type with active :class:`QuantOptions`), so the runtime is required."""
    return type.needs_runtime or (options is not None and options.active and not type.converter)


def check_options(types: Sequence[GgufType], options: QuantOptions) -> None:
    """Refuse llama-quantize's options for the types ``convert_hf_to_gguf.py`` writes (f32, f16, bf16, q8_0): they have no mix.

    Raises:
        InvalidOptionError: an option is given and a type is a converter type.
    """
    from lorasave.errors import InvalidOptionError

    if not options.active:
        return
    bad = [t.value for t in types if t.converter]
    if bad:
        given = [f"--{k.replace('_', '-')}" for k, v in options.settings().items() if v]
        raise InvalidOptionError(
            f"{'/'.join(given)} apply to llama-quantize's types (q4_0 ... q6_k), not to {', '.join(bad)} (written as convert_hf_to_gguf.py writes it)"
        )


@dataclass(frozen=True)
class TensorType:
    """The type of one tensor of a streamed file.

    Attributes:
        qtype: the GGML type written.
        llama_cpp: the type llama.cpp would write; differs from ``qtype`` only for a K type in a
            gguf-py file (see :data:`K_SUBSTITUTE`).
    """

    qtype: gguf.GGMLQuantizationType
    llama_cpp: gguf.GGMLQuantizationType


def tensor_types(
    tensors: Sequence[tuple[str, tuple[int, ...]]], type: GgufType, model: ModelFacts | None = None, options: QuantOptions | None = None
) -> list[TensorType]:
    """Types of every tensor of a file, in order.

    Args:
        tensors: ``(gguf_name, numpy shape)`` of every tensor of the file (all of them: whether
            ``output.weight`` exists decides the tied-embedding rule, the k-quants count layers).
        type: an output type.
        model: what llama.cpp reads of the hyperparameters (k-quants); default: ``n_layer`` from the
            ``blk.N`` names, one KV head per head, no experts, arch ``"llama"``.
        options: llama-quantize's ``--pure`` / ``--output-tensor-type`` / ``--token-embedding-type``
            (:func:`check_options`): with any of them a llama-quantize type follows
            ``llama_tensor_get_type`` exactly (:func:`kquant_types`), no substitution, every block
            encoded by ``ggml_quantize_chunk``.
    """
    if uses_ggml(type, options):
        if model is None:
            model = ModelFacts("llama", max((_layer(n) for n, _ in tensors), default=-1) + 1)
        return [TensorType(t, t) for t in kquant_types(tensors, type, model, options)]
    tied = not any(n == "output.weight" for n, _ in tensors)
    out = []
    for name, shape in tensors:
        want = llama_cpp_type(name, shape, type, tied=tied)
        out.append(TensorType(K_SUBSTITUTE.get(want, want), want))
    return out


def type_notes(tensors: Sequence[tuple[str, tuple[int, ...]]], types: Sequence[TensorType], type: GgufType) -> list[str]:
    """Notes for the result: the F16 fallbacks and the K-type substitutions."""
    notes = []
    want = type.default_qtype
    fallback = [
        n for (n, s), t in zip(tensors, types, strict=True) if t.llama_cpp is Q.F16 and want not in (Q.F16, Q.F32, Q.BF16) and allows_quantization(n, s)
    ]
    if fallback:
        notes.append(
            f"{len(fallback)} tensors kept as F16: rows not a multiple of {block_size(want)} for {want.name} (first: {fallback[0]}), as llama.cpp does"
        )
    for (name, _), t in zip(tensors, types, strict=True):
        if t.qtype is not t.llama_cpp:
            notes.append(
                f"{name} written as {t.qtype.name} where llama.cpp's {type.value} uses {t.llama_cpp.name}: gguf-py cannot encode "
                f"{t.llama_cpp.name}, {t.qtype.name} is llama.cpp's own fallback for it (more bits); use --type q4_k_m etc. for llama.cpp's exact mix"
            )
    return notes


def encode(w: np.ndarray, qtype: gguf.GGMLQuantizationType, *, ggml: bool = False) -> np.ndarray:
    """Encode a float32 array for ``GGUFWriter.write_tensor_data``.

    Args:
        w: float32, numpy shape (rows first); ``w.shape[-1]`` must be a multiple of the block size.
        qtype: a type of :data:`WRITABLE`, or any type ``ggml_quantize_chunk`` encodes with ``ggml``.
        ggml: encode every type but F32 with llama.cpp's ``ggml_quantize_chunk`` (k-quant files).

    Returns:
        F32/F16: the values as float32/float16 of the same shape; BF16 and the block types: uint8
        of shape ``(*w.shape[:-1], w.shape[-1] // block * type_size)``, the bytes of
        ``gguf.quants.quantize`` (computed by ``gguf_encode``, which is tested against it).

    Raises:
        ValueError: ``qtype`` is not one gguf-py can encode, or a row is not a whole number of blocks.
    """
    if qtype not in WRITABLE and not ggml:
        raise ValueError(f"gguf-py cannot encode {qtype.name}")
    w = np.ascontiguousarray(w, dtype=np.float32)
    if qtype is Q.F32:
        return w
    if ggml:
        from lorasave.runtimes.llama_cpp import ggml as ggml_quant

        rows = w.reshape(-1, w.shape[-1] if w.ndim else 1)
        return ggml_quant.quantize(rows, qtype).reshape(*w.shape[:-1], -1) if w.ndim else ggml_quant.quantize(rows, qtype).reshape(-1)
    if w.ndim and w.shape[-1] % block_size(qtype):
        raise ValueError(f"rows of {w.shape[-1]} values are not a multiple of the {qtype.name} block ({block_size(qtype)})")
    import torch

    from lorasave.formats.gguf.encode import encode_tensor

    data = encode_tensor(torch.from_numpy(w if w.flags.writeable else w.copy()), qtype).numpy()
    if qtype is Q.F16:
        return data.view(np.float16).reshape(w.shape)
    return data.reshape(gguf.quants.quant_shape_to_byte_shape(w.shape, qtype))


def kquant_note(type: GgufType, options: QuantOptions | None = None) -> str:
    """The result note saying how a k-quant file (or one with llama-quantize's options) was made."""
    from lorasave.runtimes.llama_cpp import lib as llama_cpp

    opts = options or QuantOptions()
    mix = "no mix (--pure)" if opts.pure else "llama-quant.cpp's per-tensor type mix"
    over = "".join(f", {k.replace('_', ' ')} {v}" for k, v in opts.settings().items() if k != "pure" and v)
    return (
        f"{type.value}: every block encoded in the streaming pass by llama.cpp's own quantizer (ggml_quantize_chunk, llama.cpp "
        f"{llama_cpp.LLAMA_CPP_TAG}) from the float32 merge, with {mix}{over}; no intermediate file"
    )


def count_types(path: str | os.PathLike[str]) -> dict[str, int]:
    """GGML type name -> number of tensors, read back from a GGUF file with ``gguf.GGUFReader``."""
    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts
