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
  type mix of ``llama-quant.cpp`` (``formats.gguf.mix``), so that each tensor's bytes are those
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
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import gguf
import numpy as np

from lorasave.util.notes import Detail

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
    Q2_K_S = "q2_k_s"
    IQ3_XXS = "iq3_xxs"
    IQ3_XS = "iq3_xs"
    IQ2_XXS = "iq2_xxs"
    IQ2_XS = "iq2_xs"
    IQ2_S = "iq2_s"
    IQ2_M = "iq2_m"
    IQ1_S = "iq1_s"
    IQ1_M = "iq1_m"
    TQ1_0 = "tq1_0"
    TQ2_0 = "tq2_0"
    MXFP4_MOE = "mxfp4_moe"
    Q1_0 = "q1_0"

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
    def needs_imatrix(self) -> bool:
        """Whether llama-quantize refuses the type without an importance matrix (on a model whose rows
        are multiples of 256; the exact test is per tensor: ``mix.imatrix_required``)."""
        return self.spec.needs_imatrix

    @property
    def kquant(self) -> bool:
        """A k-quant or i-quant file type (``q2_k`` ... ``q6_k``, ``iq4_nl``...): llama-quant.cpp's
        per-tensor mix (``mix.kquant_types``), every block encoded by ``ggml_quantize_chunk``."""
        return self.needs_runtime

    @property
    def converter(self) -> bool:
        """Whether ``convert_hf_to_gguf.py --outtype`` writes it (else ``llama-quantize`` does)."""
        return self.spec.converter

    @classmethod
    def parse(cls, name: str | GgufType) -> GgufType:
        """``GgufType("q4_k_m")``, case-insensitive; llama-quantize's aliases (:data:`ALIASES`: ``q4_k`` is ``q4_k_m``) too.

        Raises:
            ValueError: not a known type (callers turn it into ``InvalidOptionError``).
        """
        if isinstance(name, GgufType):
            return name
        key = str(name).lower()
        return ALIASES.get(key) or cls(key)


@dataclass(frozen=True)
class TypeSpec:
    """What one :class:`GgufType` means.

    Attributes:
        file_type: ``general.file_type`` (``LlamaFileType``, same values as ``llama_ftype``).
        default_qtype: GGML type of ordinary weight matrices (``llama_ftype_get_default_type``).
        converter: True when ``convert_hf_to_gguf.py`` writes it (its rules apply), False when
            ``llama-quantize`` does (``llama-quant.cpp``'s rules apply).
        needs_imatrix: llama-quantize refuses it without an importance matrix (``tensor_requires_imatrix``
            holds for some tensor of its mix on a model with rows of 256).
    """

    file_type: gguf.LlamaFileType
    default_qtype: gguf.GGMLQuantizationType
    converter: bool
    needs_imatrix: bool = False


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
    GgufType.IQ4_NL: TypeSpec(F.MOSTLY_IQ4_NL, Q.IQ4_NL, False),
    GgufType.IQ4_XS: TypeSpec(F.MOSTLY_IQ4_XS, Q.IQ4_XS, False),
    GgufType.IQ3_S: TypeSpec(F.MOSTLY_IQ3_S, Q.IQ3_S, False),
    GgufType.IQ3_M: TypeSpec(F.MOSTLY_IQ3_M, Q.IQ3_S, False),
    # need an importance matrix: IQ3_XXS / IQ3_XS put IQ2_S / IQ3_XXS on attn_q / attn_k (ffn_gate /
    # ffn_up), the IQ2 / IQ1 types are those types throughout, Q2_K_S's Q2_K needs one
    GgufType.Q2_K_S: TypeSpec(F.MOSTLY_Q2_K_S, Q.Q2_K, False, True),
    GgufType.IQ3_XXS: TypeSpec(F.MOSTLY_IQ3_XXS, Q.IQ3_XXS, False, True),
    GgufType.IQ3_XS: TypeSpec(F.MOSTLY_IQ3_XS, Q.IQ3_S, False, True),
    GgufType.IQ2_XXS: TypeSpec(F.MOSTLY_IQ2_XXS, Q.IQ2_XXS, False, True),
    GgufType.IQ2_XS: TypeSpec(F.MOSTLY_IQ2_XS, Q.IQ2_XS, False, True),
    GgufType.IQ2_S: TypeSpec(F.MOSTLY_IQ2_S, Q.IQ2_XS, False, True),
    GgufType.IQ2_M: TypeSpec(F.MOSTLY_IQ2_M, Q.IQ2_S, False, True),
    GgufType.IQ1_S: TypeSpec(F.MOSTLY_IQ1_S, Q.IQ1_S, False, True),
    GgufType.IQ1_M: TypeSpec(F.MOSTLY_IQ1_M, Q.IQ1_M, False, True),
    # ternary, MXFP4 (experts; the rest Q8_0) and 1-bit: no importance matrix needed
    GgufType.TQ1_0: TypeSpec(F.MOSTLY_TQ1_0, Q.TQ1_0, False),
    GgufType.TQ2_0: TypeSpec(F.MOSTLY_TQ2_0, Q.TQ2_0, False),
    GgufType.MXFP4_MOE: TypeSpec(F.MOSTLY_MXFP4_MOE, Q.MXFP4, False),
    GgufType.Q1_0: TypeSpec(F.MOSTLY_Q1_0, Q.Q1_0, False),
}

#: llama-quantize's aliases (``QUANT_OPTIONS`` of ``tools/quantize/quantize.cpp``): the name -> the type it stands for.
ALIASES: dict[str, GgufType] = {"q3_k": GgufType.Q3_K_M, "q4_k": GgufType.Q4_K_M, "q5_k": GgufType.Q5_K_M}

#: Rows of llama-quantize's type table lorasave does not offer, and why (named in the error for them).
NOT_OFFERED: dict[str, str] = {
    "q2_0": "gguf-py 0.19, which writes and reads lorasave's GGUF files, has no GGML type 42 (Q2_0)",
    "copy": "it copies an existing GGUF's tensors; lorasave writes from the merge (use --type f32)",
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
    **dict.fromkeys((Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ4_XS), Q.IQ4_NL),
    Q.TQ1_0: Q.Q4_0,
    Q.TQ2_0: Q.Q4_0,
}


def fallback(ne0: int, qtype: gguf.GGMLQuantizationType, name: str = "") -> gguf.GGMLQuantizationType:
    """``tensor_type_fallback``: a type whose block divides ``ne0``.

    Raises:
        InvalidOptionError: a type of a block over 32 with no fallback (Q1_0) does not divide
            ``ne0`` (llama.cpp: "no tensor type fallback is defined for type q1_0").
    """
    if ne0 % block_size(qtype) == 0:
        return qtype
    if qtype not in FALLBACK and block_size(qtype) > 32:
        from lorasave.errors import InvalidOptionError

        raise InvalidOptionError(
            f"{name or 'a tensor'} has rows of {ne0} values, not a multiple of the {qtype.name} block ({block_size(qtype)}), "
            f"and llama.cpp defines no fallback for {qtype.name}; choose another type"
        )
    out = FALLBACK.get(qtype, qtype)
    return out if ne0 % block_size(out) == 0 else Q.F16


def llama_cpp_type(name: str, shape: tuple[int, ...], type: GgufType, *, tied: bool) -> gguf.GGMLQuantizationType:
    """The GGML type llama.cpp gives a tensor for ``type``: the converter's choice for converter
    types, ``llama-quantize``'s (on the converter's F16 file) for the others.

    For the k-quants only the tensors llama.cpp does not quantize are answered here: the others
    depend on their place among the file's tensors (``use_more_bits`` per layer...), see
    ``mix.kquant_types``.

    Args:
        name: GGUF tensor name.
        shape: numpy shape, rows first; ``shape[-1]`` is ``ne0``.
        type: an output type.
        tied: the model has no ``output.weight`` (``token_embd.weight`` is also the output).

    Raises:
        ValueError: ``type`` is a k-quant and the tensor is quantized (use ``mix.tensor_types``).
    """
    if type.converter:
        return converter_type(name, shape, type.default_qtype)
    if not allows_quantization(name, shape):
        return converter_type(name, shape, Q.F16)
    if type.kquant:
        raise ValueError(f"the {type.value} type of {name} depends on the whole file: use formats.gguf.mix.tensor_types")
    new = type.default_qtype
    ne0 = shape[-1]
    # llama_tensor_get_type_impl: the output (or the tied token embedding) gets more bits
    if name == "output.weight" or (tied and name in ("token_embd.weight", "per_layer_token_embd.weight")):
        new = Q.Q8_0 if ne0 % block_size(new) != 0 else (Q.Q6_K if new is not Q.Q8_0 else new)
    return fallback(ne0, new)


# --- llama-quantize's overrides --------------------------------------------------------------------

#: GGML types ``--output-tensor-type`` / ``--token-embedding-type`` accept (llama-quantize's
#: ``parse_ggml_type``: a ``ggml_type_name``, any case): the types ``ggml_quantize_chunk`` encodes
#: (IQ2_XXS, IQ2_XS and IQ1_S only with an importance matrix: ``ggml_quantize_requires_imatrix``).
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
    Q.IQ3_XXS,
    Q.IQ2_XXS,
    Q.IQ2_XS,
    Q.IQ2_S,
    Q.IQ1_S,
    Q.IQ1_M,
    Q.TQ1_0,
    Q.TQ2_0,
    Q.MXFP4,
    Q.Q1_0,
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
        imatrix: ``--imatrix``: the importance matrix (``formats.gguf.imatrix.Imatrix``), or None.
            With one, llama-quant.cpp's mix changes (``has_imatrix``: IQ3_XXS, IQ4_NL/IQ4_XS, Q4_0/Q5_0
            ffn_down) and every block is encoded with the tensor's importance.
        imatrix_sha256: sha256 of the importance matrix file (``lorasave.json``).
    """

    pure: bool = False
    output_tensor_type: gguf.GGMLQuantizationType | None = None
    token_embedding_type: gguf.GGMLQuantizationType | None = None
    imatrix: ImportanceSource | None = field(default=None, compare=False)
    imatrix_sha256: str | None = None

    @property
    def active(self) -> bool:
        """Whether any option differs from llama-quantize's default."""
        return self.pure or self.output_tensor_type is not None or self.token_embedding_type is not None or self.imatrix is not None

    def importance(self, name: str) -> np.ndarray | None:
        """The importance of tensor ``name`` (float32, ``n_mat * ne0`` values), or None."""
        return None if self.imatrix is None else self.imatrix.importance(name)

    def settings(self) -> dict[str, object]:
        """The options as ``lorasave.json`` settings (type names lower case, None when not given)."""
        return {
            "pure": self.pure,
            "output_tensor_type": self.output_tensor_type.name.lower() if self.output_tensor_type is not None else None,
            "token_embedding_type": self.token_embedding_type.name.lower() if self.token_embedding_type is not None else None,
            "imatrix_sha256": self.imatrix_sha256,
        }


class ImportanceSource(Protocol):
    """An importance matrix (``formats.gguf.imatrix.Imatrix``): per GGUF tensor name the values
    ``llama-quantize`` hands ``llama_model_quantize`` (``tools/quantize/quantize.cpp`` ``load_imatrix``)."""

    def importance(self, name: str) -> np.ndarray | None:
        """float32, 1-D, ``n_mat * ne0`` values; None when the file has no entry for ``name``."""


def override(name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType, option: str) -> gguf.GGMLQuantizationType:
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


def kquant_note(type: GgufType, options: QuantOptions | None = None) -> Detail:
    """The result note saying how a k-quant file (or one with llama-quantize's options) was made."""
    from lorasave.runtimes.llama_cpp import lib as llama_cpp

    opts = options or QuantOptions()
    mix = "no mix (--pure)" if opts.pure else "llama-quant.cpp's per-tensor type mix"
    over = "".join(f", {k.replace('_', ' ')} {v}" for k, v in opts.settings().items() if k not in ("pure", "imatrix_sha256") and v)
    if opts.imatrix is not None:
        over += f", the importance matrix {getattr(opts.imatrix, 'path', '')}".rstrip()
    return Detail(
        f"{type.value}: every block encoded in the streaming pass by llama.cpp's own quantizer (ggml_quantize_chunk, llama.cpp "
        f"{llama_cpp.LLAMA_CPP_TAG}) from the float32 merge, with {mix}{over}; no intermediate file"
    )


def count_types(path: str | os.PathLike[str]) -> dict[str, int]:
    """GGML type name -> number of tensors, read back from a GGUF file with ``gguf.GGUFReader``."""
    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts
