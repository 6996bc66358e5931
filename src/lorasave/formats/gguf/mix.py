"""llama.cpp's per-tensor type mix for a file type (``llama-quant.cpp`` of llama.cpp v0.5.0), as data.

``llama_tensor_get_type_impl`` picks each tensor's GGML type from the file type, the tensor's
category (attn_v, ffn_down, attn_output, output, token_embd...), its layer (``use_more_bits``), the
counters llama.cpp keeps while it walks the tensors in its own order (``llama_cpp_order``), and the
model's facts (GQA, experts, the 70B rule): :data:`KQUANT_RULES` and :func:`kquant_types`; then
``--pure`` / ``--output-tensor-type`` / ``--token-embedding-type`` (``QuantOptions``) and
``tensor_type_fallback``. :func:`tensor_types` is the entry point for every GGUF type (the
converter's types and q4_0..q5_1 are ``formats.gguf.quant``'s simpler rules).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import gguf
import numpy as np

from lorasave.formats.gguf.quant import (
    K_SUBSTITUTE,
    GgufType,
    QuantOptions,
    allows_quantization,
    block_size,
    converter_type,
    fallback,
    llama_cpp_type,
    override,
)

Q = gguf.GGMLQuantizationType


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
    """Where a tensor stands, for a rule: its counter, the model facts, whether an imatrix is given."""

    i: int  # i_attention_wv, or the FFN layer (layer_info)
    n: int  # n_attention_wv or n_layer
    m: ModelFacts
    imatrix: bool = False  # qs.has_imatrix

    @property
    def falcon(self) -> bool:
        return self.m.arch == "falcon"

    @property
    def more(self) -> bool:
        return use_more_bits(self.i, self.n)

    @property
    def first_eighth(self) -> bool:
        return self.i < _c_div(self.n, 8)

    @property
    def middle(self) -> bool:
        """``i_layer >= n_layer/8 && i_layer < 7*n_layer/8``."""
        return _c_div(self.n, 8) <= self.i < _c_div(7 * self.n, 8)

    @property
    def moe8(self) -> bool:
        """An 8-expert model that is not Falcon (the attn_output promotions)."""
        return self.m.n_expert == 8 and not self.falcon


_Rule = Callable[[_At], "gguf.GGMLQuantizationType | None"]

T = GgufType

#: The file types of llama-quant.cpp's very-low-bit branch (IQ2_XXS ... IQ1_M): their attn_v, attn_k,
#: ffn_down and attn_output rules replace the others' (no 70B / 8-expert attn_v adjustments).
IQ2_GROUP = frozenset({T.IQ2_XXS, T.IQ2_XS, T.IQ1_S, T.IQ2_S, T.IQ2_M, T.IQ1_M})

#: GGML types ``tensor_requires_imatrix`` names (Q2_K too, in a Q2_K_S file).
IMATRIX_TYPES = frozenset({Q.IQ3_XXS, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ1_M, Q.IQ1_S})


def _iq2(a_type: GgufType, s_m: gguf.GGMLQuantizationType, other: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """IQ2_S / IQ2_M get ``s_m``, the rest of :data:`IQ2_GROUP` ``other``."""
    return s_m if a_type in (T.IQ2_S, T.IQ2_M) else other


#: ``llama_tensor_get_type_impl`` (``src/llama-quant.cpp`` of llama.cpp v0.5.0) for every
#: llama-quantize file type: (category, type) -> the tensor's type before ``tensor_type_fallback``,
#: or None for the file's default type. ``attn_v`` rules see ``i = i_attention_wv`` (the rank of the
#: tensor among the file's attn_v / attn_qkv / attn_kv_b tensors in llama.cpp's order) and
#: ``n = n_attention_wv``; ``ffn_down`` / ``ffn_gate`` / ``ffn_up`` rules the layer and ``n_layer``.
#: Every other (category, type) keeps the default. Applied after these, outside :data:`IQ2_GROUP`:
#: an ``attn_v`` Q3_K / Q4_K of a 70B model becomes Q5_K, an 8-expert model's ``attn_v`` / ``attn_k``
#: Q8_0 (:func:`kquant_types`; Q4_K for the attn_k of :data:`IQ2_GROUP`). ``output`` (and a tied
#: ``token_embd``) and ``mxfp4_moe`` are :func:`_output_type` / :func:`_mxfp4_type`. The
#: ATTENTION_QKV branch of the C++ is unreachable (``category_is_attn_v`` is tested first) and is left out.
KQUANT_RULES: dict[tuple[str, GgufType], _Rule] = {
    # --- attn_v (attn_qkv, attn_kv_b)
    ("attn_v", T.Q2_K): lambda a: Q.Q4_K if a.m.n_gqa >= 4 else Q.Q3_K,
    ("attn_v", T.Q2_K_S): lambda a: Q.Q4_K if a.m.n_gqa >= 4 else None,
    ("attn_v", T.IQ3_XXS): lambda a: Q.Q4_K if a.m.n_gqa >= 4 else Q.IQ3_XXS if a.imatrix else Q.IQ3_S,
    ("attn_v", T.IQ3_XS): lambda a: Q.Q4_K if a.m.n_gqa >= 4 else None,
    ("attn_v", T.IQ3_S): lambda a: Q.Q4_K if a.m.n_gqa >= 4 else None,
    ("attn_v", T.IQ3_M): lambda a: Q.Q4_K,
    ("attn_v", T.Q3_K_M): lambda a: Q.Q5_K if a.i < 2 else Q.Q4_K,
    ("attn_v", T.Q3_K_L): lambda a: Q.Q5_K,
    ("attn_v", T.IQ4_NL): lambda a: Q.Q5_K if a.m.n_gqa >= 4 else None,
    ("attn_v", T.IQ4_XS): lambda a: Q.Q5_K if a.m.n_gqa >= 4 else None,
    ("attn_v", T.Q4_K_M): lambda a: Q.Q6_K if a.more else None,
    ("attn_v", T.Q5_K_M): lambda a: Q.Q6_K if a.more else None,
    ("attn_v", T.Q4_K_S): lambda a: Q.Q5_K if a.i < 4 else None,
    # --- attn_k, attn_q (an 8-expert attn_k is Q8_0 / Q4_K before these: kquant_types)
    ("attn_k", T.IQ3_XS): lambda a: Q.IQ3_XXS,
    ("attn_k", T.IQ3_XXS): lambda a: Q.IQ2_S,
    ("attn_q", T.IQ3_XS): lambda a: Q.IQ3_XXS,
    ("attn_q", T.IQ3_XXS): lambda a: Q.IQ2_S,
    # --- ffn_down
    ("ffn_down", T.Q2_K): lambda a: Q.Q3_K,
    ("ffn_down", T.Q2_K_S): lambda a: Q.Q4_K if a.first_eighth else None,
    ("ffn_down", T.IQ3_XXS): lambda a: None if a.imatrix else Q.Q4_K if a.first_eighth else Q.Q3_K,
    ("ffn_down", T.Q3_K_M): lambda a: Q.Q5_K if a.i < _c_div(a.n, 16) else Q.Q4_K if not a.falcon or a.more else Q.Q3_K,
    ("ffn_down", T.IQ3_M): lambda a: Q.Q4_K if a.first_eighth or (a.m.n_expert == 8 and a.more) else None,
    ("ffn_down", T.Q3_K_L): lambda a: Q.Q4_K if a.falcon else Q.Q5_K,
    ("ffn_down", T.Q4_K_M): lambda a: (Q.Q6_K if a.i < _c_div(a.n, 16) else Q.Q5_K if a.more else Q.Q4_K) if a.falcon else (Q.Q6_K if a.more else None),
    ("ffn_down", T.IQ4_NL): lambda a: Q.Q5_K if a.first_eighth and not a.imatrix else None,
    ("ffn_down", T.IQ4_XS): lambda a: Q.Q5_K if a.first_eighth and not a.imatrix else None,
    ("ffn_down", T.Q5_K_M): lambda a: Q.Q6_K if a.more else None,
    ("ffn_down", T.Q4_K_S): lambda a: Q.Q5_K if not a.falcon and a.first_eighth else None,
    ("ffn_down", T.Q4_0): lambda a: Q.Q4_1 if a.imatrix and a.first_eighth else None,
    ("ffn_down", T.Q5_0): lambda a: Q.Q5_1 if a.imatrix and a.first_eighth else None,
    # --- attn_output: Falcon only changes q3_k_l; an 8-expert model takes Q5_K for most types
    ("attn_output", T.Q2_K): lambda a: None if a.falcon else Q.Q5_K if a.m.n_expert == 8 else Q.Q3_K,
    ("attn_output", T.IQ3_XXS): lambda a: None if a.falcon else Q.Q5_K if a.m.n_expert == 8 else Q.IQ3_S,
    ("attn_output", T.Q3_K_M): lambda a: None if a.falcon else Q.Q5_K if a.m.n_expert == 8 else Q.Q4_K,
    ("attn_output", T.Q3_K_L): lambda a: Q.Q4_K if a.falcon else None if a.m.n_expert == 8 else Q.Q5_K,
    ("attn_output", T.IQ3_M): lambda a: None if a.falcon else Q.Q5_K if a.m.n_expert == 8 else Q.Q4_K,
    **{("attn_output", t): (lambda a: Q.Q5_K if a.moe8 else None) for t in (T.IQ3_XS, T.Q3_K_S, T.IQ4_NL, T.Q4_K_S, T.Q4_K_M, T.IQ3_S, T.IQ4_XS)},
    # --- ffn_gate, ffn_up
    ("ffn_gate", T.IQ3_XS): lambda a: Q.IQ3_XXS if a.middle else None,
    ("ffn_up", T.IQ3_XS): lambda a: Q.IQ3_XXS if a.middle else None,
    # --- token_embd of an untied model
    **{("token_embd", t): (lambda a: Q.Q2_K) for t in (T.IQ2_XXS, T.IQ2_XS, T.IQ1_S, T.IQ1_M)},
    **{("token_embd", t): (lambda a: Q.IQ3_S) for t in (T.IQ2_S, T.IQ2_M, T.IQ3_XXS)},
    **{("token_embd", t): (lambda a: Q.Q4_K) for t in (T.TQ1_0, T.TQ2_0)},
    # --- the very-low-bit branch (IQ2_GROUP): ffn_down counts its tensors (no layer_info)
    **{("attn_v", t): (lambda a, t=t: Q.Q4_K if a.m.n_gqa >= 4 or a.m.n_expert >= 4 else _iq2(t, Q.IQ3_S, Q.Q2_K)) for t in IQ2_GROUP},
    **{("ffn_down", t): (lambda a, t=t: _iq2(t, Q.IQ3_S, Q.Q2_K) if a.first_eighth else None) for t in IQ2_GROUP},
    **{
        ("attn_output", t): (lambda a, t=t: Q.Q5_K if a.m.n_expert == 8 else Q.IQ2_XXS if t in (T.IQ1_S, T.IQ1_M) else _iq2(t, Q.IQ3_S, t.default_qtype))
        for t in IQ2_GROUP
    },
}


def _layer(name: str) -> int:
    """The ``blk.%d.`` number of a name, or -1 (``weight_name_comparer``)."""
    m = re.match(r"blk\.([+-]?\d+)", name)
    return int(m.group(1)) if m else -1


def llama_cpp_order(names: Sequence[str]) -> list[int]:
    """Indices of ``names`` in the order ``llama_model_quantize`` visits them (``weights_map``'s
    ``weight_name_comparer``: by ``blk.N`` number, names without one first, then by name)."""
    return sorted(range(len(names)), key=lambda i: (_layer(names[i]), names[i].encode()))


def _output_type(type: GgufType, model: ModelFacts, ne0: int) -> gguf.GGMLQuantizationType:
    """``output.weight`` (and a tied ``token_embd.weight``) without ``--output-tensor-type``."""
    if type is T.MXFP4_MOE or model.arch == "falcon" or ne0 % block_size(type.default_qtype):
        return Q.Q8_0
    if type in IQ2_GROUP or type is T.IQ3_XXS:
        return Q.Q5_K
    return Q.Q6_K if type.default_qtype is not Q.Q8_0 else Q.Q8_0


def _mxfp4_type(name: str, shape: tuple[int, ...], cat: str, model: ModelFacts) -> gguf.GGMLQuantizationType:
    """``mxfp4_moe``: expert tensors (``ne[2] > 1``; for bailingmoe3 only the FFN ones) MXFP4, the rest Q8_0."""
    experts = len(shape) >= 3 and shape[-3] > 1
    if experts and (model.arch != "bailingmoe3" or cat in ("ffn_up", "ffn_gate", "ffn_down")):
        return Q.MXFP4
    return Q.Q8_0


def kquant_types(
    tensors: Sequence[tuple[str, tuple[int, ...]]], type: GgufType, model: ModelFacts, options: QuantOptions | None = None
) -> list[gguf.GGMLQuantizationType]:
    """``llama_tensor_get_type`` for every tensor of a llama-quantize file, in the order given.

    llama.cpp visits the tensors in :func:`llama_cpp_order`; ``i_attention_wv`` and ``i_ffn_down`` /
    ``i_ffn_gate`` / ``i_ffn_up`` count the quantized tensors of their category seen so far (the
    layer of an FFN tensor is that counter for a dense model, the ``blk.N`` number for a MoE one). A
    tensor llama.cpp does not quantize keeps the converter's F16-file type (as the gguf-py types do).
    The output tensor (and the token embedding when tied: no ``output.weight``) gets
    :func:`_output_type`; then ``tensor_type_fallback``.

    With ``options`` (``llama_tensor_get_type``): ``token_embedding_type`` and ``output_tensor_type``
    are taken as they are for their tensor; ``pure`` gives every other quantized tensor the default
    type, then ``tensor_type_fallback``; without ``pure`` a tied ``token_embd.weight`` takes
    ``output_tensor_type`` through the mix, then ``tensor_type_fallback``; an ``imatrix`` switches
    the rules that depend on ``has_imatrix``.

    Raises:
        InvalidOptionError: an override type whose block does not divide its tensor's rows; a Q1_0
            tensor whose rows are not a multiple of 128 (no fallback).
        ValueError: a MoE tensor's ``blk.N`` outside the model's layers.
    """
    opts = options or QuantOptions()
    names = [n for n, _ in tensors]
    tied = "output.weight" not in names
    n_wv = sum(1 for n in names if _category(n) == "attn_v")
    counters = {"attn_v": 0, "ffn_down": 0, "ffn_gate": 0, "ffn_up": 0}
    out: list[gguf.GGMLQuantizationType | None] = [None] * len(tensors)
    default = type.default_qtype
    low = type in IQ2_GROUP
    has_imatrix = opts.imatrix is not None
    for idx in llama_cpp_order(names):
        name, shape = tensors[idx]
        if not allows_quantization(name, shape):
            out[idx] = converter_type(name, shape, Q.F16)
            continue
        cat = _category(name)
        ne0 = shape[-1]
        if cat == "token_embd" and opts.token_embedding_type is not None:
            out[idx] = override(name, shape, opts.token_embedding_type, "token-embedding-type")
            continue
        if cat == "output" and opts.output_tensor_type is not None:
            out[idx] = override(name, shape, opts.output_tensor_type, "output-tensor-type")
            continue
        if opts.pure:
            out[idx] = fallback(ne0, default, name)
            continue
        if cat == "output" or (tied and cat == "token_embd"):
            new = opts.output_tensor_type if opts.output_tensor_type is not None else _output_type(type, model, ne0)
        elif type is T.MXFP4_MOE:
            new = _mxfp4_type(name, shape, cat, model)
        elif cat == "attn_k" and model.n_expert == 8:
            new = Q.Q4_K if low else Q.Q8_0
        else:
            if cat in counters:
                n = n_wv if cat == "attn_v" else model.n_layer
                i = counters[cat]
                if cat != "attn_v" and not low and model.n_expert > 1:  # layer_info: the blk.N number
                    i = _layer(name)
                    if not 0 <= i < model.n_layer:
                        raise ValueError(f"bad layer {i} for tensor {name}")
                at = _At(i, n, model, has_imatrix)
                if not (low and cat in ("ffn_gate", "ffn_up")):  # the IQ2 branch never counts these
                    counters[cat] += 1
            else:
                at = _At(0, 0, model, has_imatrix)
            rule = KQUANT_RULES.get((cat, type))
            new = (rule(at) if rule else None) or default
            if cat == "attn_v" and not low:
                if model.is_70b and new in (Q.Q3_K, Q.Q4_K):
                    new = Q.Q5_K
                if model.n_expert == 8:
                    new = Q.Q8_0
        out[idx] = fallback(ne0, new, name)
    return [t for t in out if t is not None]


def imatrix_required(name: str, qtype: gguf.GGMLQuantizationType, type: GgufType) -> bool:
    """``tensor_requires_imatrix``: llama-quantize refuses to write ``qtype`` for ``name`` in a
    ``type`` file without an importance matrix (never for ``token_embd`` / ``output``)."""
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    return qtype in IMATRIX_TYPES or (qtype is Q.Q2_K and type is T.Q2_K_S)


def for_type(type: GgufType, options: QuantOptions) -> QuantOptions:
    """The options a file of ``type`` is written with: without the importance matrix for the
    converter's types (f32, f16, bf16, q8_0: ``convert_hf_to_gguf.py`` has none)."""
    return replace(options, imatrix=None, imatrix_sha256=None) if type.converter and options.imatrix is not None else options


def uses_ggml(type: GgufType, options: QuantOptions | None = None) -> bool:
    """Whether a file of ``type`` is llama-quantize's exact mix, every block encoded by ``ggml_quantize_chunk``
    (the k-quants; any llama-quantize type with active :class:`QuantOptions`), so the runtime is required."""
    return type.needs_runtime or (options is not None and options.active and not type.converter)


def check_options(types: Sequence[GgufType], options: QuantOptions) -> None:
    """Refuse llama-quantize's options (``--imatrix`` too) for the types ``convert_hf_to_gguf.py`` writes (f32, f16, bf16, q8_0): they have no mix.

    Raises:
        InvalidOptionError: an option is given and a type is a converter type.
    """
    from lorasave.errors import InvalidOptionError

    if not options.active:
        return
    if not options.pure and options.output_tensor_type is None and options.token_embedding_type is None and not all(t.converter for t in types):
        return  # --imatrix alone: the llama-quantize types of a list use it, the converter's do not (for_type)
    bad = [t.value for t in types if t.converter]
    if bad:
        given = [f"--{k.removesuffix('_sha256').replace('_', '-')}" for k, v in options.settings().items() if v]
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


def importances(
    tensors: Sequence[tuple[str, tuple[int, ...]]], types: Sequence[TensorType], type: GgufType, options: QuantOptions | None
) -> list[np.ndarray | None]:
    """The importance each tensor is encoded with, checked as ``llama_model_quantize`` checks it.

    A tensor gets its entry of the importance matrix when the file has one of ``ne0 * n_mat``
    values (``n_mat``: experts of a 3-D tensor, else 1); a ``token_embd`` entry of another size is
    ignored, as llama.cpp ignores it.

    Returns:
        float32 ``(n_mat, ne0)`` or None, per tensor, in order.

    Raises:
        ImatrixRequiredError: a tensor needs an importance matrix (:func:`imatrix_required`, or a
            type ``ggml_quantize_requires_imatrix`` names) and none is given, or the file has no
            entry for it ("Missing importance matrix for tensor ..." in llama.cpp).
        ImatrixMismatchError: an entry's size differs from its tensor's.
    """
    from lorasave.errors import ImatrixMismatchError, ImatrixRequiredError

    out: list[np.ndarray | None] = []
    ggml_needs = {Q.IQ2_XXS, Q.IQ2_XS, Q.IQ1_S}  # ggml_quantize_requires_imatrix (ggml.c of v0.5.0)
    for (name, shape), t in zip(tensors, types, strict=True):
        quantized = allows_quantization(name, shape) and t.qtype not in (Q.F32, Q.F16, Q.BF16)
        values = options.importance(name) if options is not None and quantized else None
        if values is not None:
            n_mat = shape[-3] if len(shape) >= 3 else 1
            values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
            if values.size != shape[-1] * n_mat:
                if _category(name) != "token_embd":
                    raise ImatrixMismatchError(
                        f"the importance matrix has {values.size} values for {name}, whose rows have {shape[-1]} values"
                        f"{f' in {n_mat} experts' if n_mat > 1 else ''}: it was computed for another model"
                    )
                values = None
            else:
                values = values.reshape(n_mat, shape[-1])
        if values is None and quantized and (imatrix_required(name, t.qtype, type) or t.qtype in ggml_needs):
            if options is None or options.imatrix is None:
                raise ImatrixRequiredError(
                    f"{type.value} needs an importance matrix ({name} is {t.qtype.name}): give one with --imatrix FILE "
                    "(make it with `lorasave imatrix BASE ADAPTER --text FILE -o OUT`, or llama-imatrix)"
                )
            raise ImatrixRequiredError(f"the importance matrix has no entry for {name}, which {type.value} writes as {t.qtype.name}")
        out.append(values)
    return out
