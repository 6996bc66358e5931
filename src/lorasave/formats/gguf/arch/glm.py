"""GLM-4 dense and GLM-4.5 MoE (``conversion/glm.py`` ``Glm4Model`` / ``Glm4MoeModel`` of llama.cpp v0.5.0;
``src/models/glm4.cpp``, ``src/models/glm4-moe.cpp``).

The common text keys and ``rope.dimension_count = head_dim * partial_rotary_factor`` (0.5 by
default): GLM-4 rotates interleaved pairs of the first half of each head, which is llama.cpp's
normal (non-NeoX) RoPE over ``n_rot`` dimensions, so Q/K are written as they are. The fused
``mlp.gate_up_proj`` stays fused as ``ffn_up`` (``{n_embd, 2 * n_ff}``, split by the runtime);
``post_self_attn_layernorm`` / ``post_mlp_layernorm`` are ``post_attention_norm`` / ``post_ffw_norm``
and ``post_attention_layernorm`` (the pre-MLP norm) is ``ffn_norm``, all by gguf-py's map. The
tokenizer is byte-level BPE only, with ``<|endoftext|>`` as BOS/EOS/UNK and ``<|user|>`` as EOT
where the tokenizer files set none (``Glm4Model.set_vocab``).

``glm4_moe`` (GLM-4.5 / 4.5-Air / 4.6): the same RoPE (partial, NeoX: Q/K as they are) and vocab, with
the special tokens of ``TextModel._set_vocab_glm`` where the tokenizer files set none (``[gMASK]`` as
BOS, ``<|user|>`` EOT, ``<|endoftext|>`` UNK, ``<|observation|>`` EOM; no EOS fallback);
the first ``first_k_dense_replace`` layers dense, the others routed experts (stacked ``ffn_*_exps``)
+ shared experts (``ffn_*_shexp``), sigmoid gating with the router's ``e_score_correction_bias``
(``exp_probs_b``: used to choose the experts only), ``routed_scaling_factor`` and ``norm_topk_prob``
as ``expert_weights_scale`` / ``expert_weights_norm``. The checkpoint's multi-token-prediction layers
(``num_nextn_predict_layers`` layers after the last) are left out, as ``--no-mtp`` does (transformers
runs no MTP layer either). Expert groups (``n_group`` / ``topk_group``, written by
``TextModel.set_gguf_parameters`` as ``expert_group_count`` / ``expert_group_used_count``): llama.cpp
reads them for every architecture (``llama_model::load_hparams``) and ``build_moe_ffn``, which
``glm4-moe.cpp`` calls, keeps the ``topk_group`` groups with the largest sum of their two best biased
scores, as transformers' ``Glm4MoeTopkRouter`` does.
"""

from __future__ import annotations

from dataclasses import replace

import gguf

from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch.base import GgufArch, Hparams, K, MetaItem, V, VocabKind, set_item, text_params


def partial_rotary(hp: Hparams) -> float:
    """``partial_rotary_factor`` of the RoPE parameters, GLM-4's 0.5 when absent (``Glm4Model.__init__``)."""
    return float(hp.full_rope.get("partial_rotary_factor", 0.5))


def glm4_params(hp: Hparams) -> list[MetaItem]:
    """Text keys + ``rope.dimension_count`` (``Glm4Model.set_gguf_parameters``)."""
    return [*text_params(hp), (K.Rope.DIMENSION_COUNT, int(hp.head_dim * partial_rotary(hp)), V.UINT32)]


def glm4_check(hp: Hparams) -> None:
    """Refuse GLM-4 configs this export does not write as the converter does.

    Raises:
        UnsupportedModelError: ``mrope_section`` in the RoPE parameters (GLM-4V's language model:
            M-RoPE needs the converter's NeoX reordering of Q/K, not done here), or an odd
            number of rotary dimensions (the converter refuses it).
    """
    if "mrope_section" in hp.full_rope:
        raise UnsupportedModelError("glm4 with M-RoPE (mrope_section, GLM-4V's language model) is not supported by GGUF export")
    if int(hp.head_dim * partial_rotary(hp)) % 2:
        raise UnsupportedModelError(f"glm4 rotary dimensions head_dim*partial_rotary_factor={hp.head_dim * partial_rotary(hp):g} must be even")


def glm4_moe_params(hp: Hparams) -> list[MetaItem]:
    """``Glm4MoeModel.set_gguf_parameters`` (without ``nextn_predict_layers``: the MTP layers are left out)."""
    out = glm4_params(hp)
    h = hp.h
    optional = (
        (K.LLM.EXPERT_FEED_FORWARD_LENGTH, "moe_intermediate_size", V.UINT32, int),
        (K.LLM.EXPERT_SHARED_COUNT, "n_shared_experts", V.UINT32, int),
        (K.LLM.LEADING_DENSE_BLOCK_COUNT, "first_k_dense_replace", V.UINT32, int),
    )
    for key, name, vtype, cast in optional:
        if h.get(name) is not None:
            set_item(out, key, cast(h[name]), vtype)
    set_item(out, K.LLM.EXPERT_GATING_FUNC, int(gguf.ExpertGatingFuncType.SIGMOID), V.UINT32)
    if h.get("routed_scaling_factor") is not None:
        set_item(out, K.LLM.EXPERT_WEIGHTS_SCALE, float(h["routed_scaling_factor"]), V.FLOAT32)
    if h.get("norm_topk_prob") is not None:
        set_item(out, K.LLM.EXPERT_WEIGHTS_NORM, bool(h["norm_topk_prob"]), V.BOOL)
    return out


def glm4_moe_check(hp: Hparams) -> None:
    """GLM-4's refusals, and expert groups llama.cpp would not load: with ``n_group`` > 1 it asserts
    ``0 < topk_group < n_group`` (``llama_model::load_hparams``), where transformers also takes
    ``topk_group == n_group`` (every group kept).

    Raises:
        UnsupportedModelError: see :func:`glm4_check`; ``topk_group`` outside 1 .. ``n_group`` - 1.
    """
    glm4_check(hp)
    n_group, topk_group = int(hp.h.get("n_group") or 1), int(hp.h.get("topk_group") or 0)
    if n_group > 1 and not 0 < topk_group < n_group:
        raise UnsupportedModelError(
            f"glm4_moe with topk_group={hp.h.get('topk_group')} of n_group={n_group} expert groups: llama.cpp asserts 0 < topk_group < n_group"
        )


GLM4 = GgufArch(
    gguf.MODEL_ARCH.GLM4,
    glm4_params,
    vocabs=(VocabKind.BPE,),
    check=glm4_check,
    special_tokens=(("eos", "<|endoftext|>"), ("eot", "<|user|>"), ("unk", "<|endoftext|>"), ("bos", "<|endoftext|>")),
)

#: ``TextModel._set_vocab_glm`` (``Glm4MoeModel.set_vocab``): kind -> added token text.
GLM_SPECIAL_TOKENS = (("bos", "[gMASK]"), ("eot", "<|user|>"), ("unk", "<|endoftext|>"), ("eom", "<|observation|>"))

#: HF ``model_type`` -> rules.
ARCHITECTURES: dict[str, GgufArch] = {
    "glm4": GLM4,
    "glm4_moe": replace(GLM4, arch=gguf.MODEL_ARCH.GLM4_MOE, params=glm4_moe_params, check=glm4_moe_check, mtp_layers=True, special_tokens=GLM_SPECIAL_TOKENS),
}
