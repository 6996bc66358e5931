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
from dataclasses import dataclass

import gguf

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
            out[idx] = override(name, shape, opts.token_embedding_type, "token-embedding-type")
            continue
        if cat == "output" and opts.output_tensor_type is not None:
            out[idx] = override(name, shape, opts.output_tensor_type, "output-tensor-type")
            continue
        if opts.pure:
            out[idx] = fallback(ne0, default)
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
        out[idx] = fallback(ne0, new)
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
