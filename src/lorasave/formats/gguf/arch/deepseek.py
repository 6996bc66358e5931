"""DeepSeek-V3 / R1 and DeepSeek-V2 (``conversion/deepseek.py`` ``DeepseekV2Model`` of llama.cpp v0.5.0,
written as its ``deepseek2`` architecture; ``src/models/deepseek2.cpp``, ``build_moe_ffn`` in
``src/llama-graph.cpp``, the YaRN set-up of ``llama_context``).

Multi-head latent attention (MLA): ``q_a_proj`` / ``q_a_layernorm`` / ``q_b_proj`` (or ``q_proj`` when
``q_lora_rank`` is None), ``kv_a_proj_with_mqa`` / ``kv_a_layernorm``, and ``kv_b_proj`` split per head
into ``attn_k_b`` (its ``qk_nope_head_dim`` rows of each head, transposed: ``(n_head, kv_lora_rank,
qk_nope_head_dim)``) and ``attn_v_b`` (``(n_head, v_head_dim, kv_lora_rank)``), as the converter does for
llama.cpp's absorbed MLA (a :class:`~.base.ValueTransform`: the transpose needs the whole tensor).
Keys: ``num_key_value_heads`` written as 1 (MLA runs as MQA over the latent), ``key_length`` /
``value_length`` = ``kv_lora_rank + qk_rope_head_dim`` / ``kv_lora_rank``, the ``*_mla`` lengths, the LoRA
ranks, ``rope.dimension_count = qk_rope_head_dim`` (interleaved pairs: llama.cpp's normal RoPE, Q/K as
they are), YaRN with ``rope.scaling.yarn_log_multiplier = 0.1 * mscale_all_dim``.

Mixture of experts: the first ``first_k_dense_replace`` layers dense, the others routed experts (stacked
``ffn_*_exps``, from per-expert tensors or transformers 5's fused ones) + shared experts
(``ffn_*_shexp``), ``routed_scaling_factor`` -> ``expert_weights_scale``, ``norm_topk_prob`` ->
``expert_weights_norm``, expert groups (``n_group`` / ``topk_group``: ``build_moe_ffn`` keeps the
``topk_group`` groups with the largest sum of their two best scores, as transformers' V3 router does).
V3 gates with a sigmoid and chooses experts with the router's ``e_score_correction_bias``
(``exp_probs_b``); the converter writes ``expert_gating_func`` only from a ``scoring_func`` in config.json,
and without it llama.cpp falls back to softmax, so lorasave always writes sigmoid for ``deepseek_v3`` (what
transformers runs). V2 gates with a softmax (no key: llama.cpp's default). Multi-token-prediction layers
(``model.layers.<num_hidden_layers>``) are left out, as the converter's ``skip_mtp`` does.

Not refused, noted: transformers normalises the ``q_a`` / ``kv_a`` latents with a fixed epsilon of 1e-6,
llama.cpp with ``rms_norm_eps`` (the same value in DeepSeek's configs; a relative difference of about the
epsilons' difference otherwise).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import gguf

from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch.base import GgufArch, Hparams, K, MetaItem, V, ValueTransform, VocabKind, set_item, text_params
from lorasave.formats.gguf.arch.mistral import yarn_params

if TYPE_CHECKING:
    import torch

#: Layer counts ``llama_model_deepseek2::load_arch_hparams`` takes for a "lite" model (no ``q_lora_rank``
#: read; 48 only with 128256 tokens).
LITE_LAYERS = (26, 27)


def _kv_b(hp: Hparams, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv_b_proj`` ``(n_head * (nope + v), kv_lora_rank)`` -> per head ``(k_b, v_b)`` (``DeepseekV2Model.modify_tensors``)."""
    nope, v = int(hp.h["qk_nope_head_dim"]), int(hp.h["v_head_dim"])
    kv = w.view(hp.heads[0], nope + v, w.shape[-1])
    return kv[:, :nope], kv[:, nope:]


def k_b(hp: Hparams, w: torch.Tensor) -> torch.Tensor:
    """``attn_k_b``: each head's key rows, transposed: ``(n_head, kv_lora_rank, qk_nope_head_dim)``."""
    return _kv_b(hp, w)[0].transpose(1, 2)


def v_b(hp: Hparams, w: torch.Tensor) -> torch.Tensor:
    """``attn_v_b``: each head's value rows: ``(n_head, v_head_dim, kv_lora_rank)``."""
    return _kv_b(hp, w)[1]


#: ``kv_b_proj`` -> ``attn_k_b`` + ``attn_v_b`` (the converter's "MLA with the absorption optimization").
KV_B = ValueTransform("self_attn.kv_b_proj.weight", (("self_attn.k_b_proj.weight", k_b), ("self_attn.v_b_proj.weight", v_b)))


def deepseek2_params(hp: Hparams) -> list[MetaItem]:
    """``DeepseekV2Model.set_gguf_parameters`` (the text model, not DeepSeek-OCR), in its order.

    ``num_key_value_heads`` is set to 1 and ``rms_norm_eps`` defaults to 1e-6 before the common keys
    (YaRN's included); then the leading dense layers, vocabulary size, LoRA ranks, MLA head lengths,
    expert sizes and counts, ``rope.dimension_count`` and the YaRN log multiplier. ``deepseek_v3`` also
    gets the sigmoid gating (see the module docstring).
    """
    h = dict(hp.h)
    h["num_key_value_heads"] = 1
    h["rms_norm_eps"] = h.get("rms_norm_eps", 1e-6)
    mine = Hparams(h, hp.rope)
    out = text_params(mine)
    for key, value, vtype in yarn_params(mine):
        set_item(out, key, value, vtype)
    has_moe = h.get("n_routed_experts") is not None
    dense = h.get("first_k_dense_replace")
    dense = (hp.n_layer if not has_moe else 0) if dense is None else dense
    rank = int(h.get("kv_lora_rank", 512))
    items: list[MetaItem] = [(K.LLM.LEADING_DENSE_BLOCK_COUNT, int(dense), V.UINT32), (K.LLM.VOCAB_SIZE, int(h["vocab_size"]), V.UINT32)]
    if h.get("q_lora_rank") is not None:
        items.append((K.Attention.Q_LORA_RANK, int(h["q_lora_rank"]), V.UINT32))
    items += [
        (K.Attention.KV_LORA_RANK, rank, V.UINT32),
        (K.Attention.KEY_LENGTH, rank + int(h["qk_rope_head_dim"]), V.UINT32),
        (K.Attention.VALUE_LENGTH, rank, V.UINT32),
        (K.Attention.KEY_LENGTH_MLA, int(h["qk_nope_head_dim"]) + int(h["qk_rope_head_dim"]), V.UINT32),
        (K.Attention.VALUE_LENGTH_MLA, int(h["v_head_dim"]), V.UINT32),
        (K.LLM.EXPERT_FEED_FORWARD_LENGTH, int(mine.find(("moe_intermediate_size", "intermediate_size"))), V.UINT32),
    ]
    if has_moe:
        items.append((K.LLM.EXPERT_COUNT, int(h["n_routed_experts"]), V.UINT32))
    items.append((K.LLM.EXPERT_SHARED_COUNT, int(h.get("n_shared_experts", 0)), V.UINT32))
    if h.get("routed_scaling_factor") is not None:
        items.append((K.LLM.EXPERT_WEIGHTS_SCALE, float(h["routed_scaling_factor"]), V.FLOAT32))
    if h.get("norm_topk_prob"):
        items.append((K.LLM.EXPERT_WEIGHTS_NORM, True, V.BOOL))
    items.append((K.Rope.DIMENSION_COUNT, int(h["qk_rope_head_dim"]), V.UINT32))
    if (mscale_all := hp.rope.get("mscale_all_dim")) is not None:  # [TAG_DEEPSEEK2_YARN_LOG_MUL_FIX]
        items.append((K.Rope.SCALING_YARN_LOG_MUL, 0.1 * mscale_all, V.FLOAT32))
    if h.get("model_type") == "deepseek_v3":
        items.append((K.LLM.EXPERT_GATING_FUNC, int(gguf.ExpertGatingFuncType.SIGMOID), V.UINT32))
    for key, value, vtype in items:
        set_item(out, key, value, vtype)
    return out


def _refuse(hp: Hparams, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{hp.h.get('model_type')} {what}")


def deepseek2_check(hp: Hparams) -> None:
    """Refuse DeepSeek V2/V3 configs llama.cpp v0.5.0's ``deepseek2`` would run differently from
    transformers, or that its converter or loader cannot take.

    Raises:
        UnsupportedModelError: ``num_key_value_heads`` != ``num_attention_heads`` (the converter splits
            ``kv_b_proj`` per key/value head); ``q_lora_rank`` None unless the model has 26 or 27 layers,
            or set with 26 / 27 layers (the loader reads the rank by layer count); attention or MLP
            biases; an activation other than SiLU; YaRN without ``factor`` or without ``mscale`` equal to
            ``mscale_all_dim`` (llama.cpp takes them equal), with an explicit ``attention_factor`` or
            ``truncate: false``.
    """
    h, rp = hp.h, hp.full_rope
    n_head, n_kv = hp.heads
    if n_kv != n_head:
        raise _refuse(hp, f"with num_key_value_heads={n_kv} != num_attention_heads={n_head}: llama.cpp's converter splits kv_b_proj per attention head")
    lite = hp.n_layer in LITE_LAYERS
    if h.get("q_lora_rank") is None and not lite:
        raise _refuse(hp, f"without q_lora_rank and {hp.n_layer} layers: llama.cpp's deepseek2 reads q_lora_rank unless the model has 26 or 27 layers")
    if h.get("q_lora_rank") is not None and lite:
        raise _refuse(hp, f"with q_lora_rank and {hp.n_layer} layers: llama.cpp's deepseek2 takes a 26/27-layer model for one without q_lora_rank")
    if h.get("attention_bias") or h.get("mlp_bias"):
        raise _refuse(hp, "with attention_bias/mlp_bias: llama.cpp's deepseek2 has no projection biases")
    if h.get("hidden_act", "silu") != "silu":
        raise _refuse(hp, f"with hidden_act={h['hidden_act']!r}: llama.cpp's deepseek2 runs SiLU")
    if rp.get("rope_type") == "yarn":
        mscale, all_dim = rp.get("mscale"), rp.get("mscale_all_dim")
        if rp.get("factor") is None:
            raise _refuse(hp, "YaRN without factor: llama.cpp's converter writes no scaling")
        if not all_dim or mscale is None or float(mscale) != float(all_dim):
            raise _refuse(hp, f"YaRN with mscale={mscale}, mscale_all_dim={all_dim}: llama.cpp's deepseek2 takes mscale equal to a non-zero mscale_all_dim")
        if rp.get("attention_factor", rp.get("attn_factor")) is not None:
            raise _refuse(hp, "YaRN with an explicit attention_factor: llama.cpp derives its own")
        if rp.get("truncate", True) is False:
            raise _refuse(hp, "YaRN with truncate=false: llama.cpp always truncates the correction range")


def deepseek_v3_check(hp: Hparams) -> None:
    """:func:`deepseek2_check`, and ``rope_interleave: false`` (transformers then rotates halves, NeoX-style;
    llama.cpp's deepseek2 rotates interleaved pairs)."""
    deepseek2_check(hp)
    if hp.h.get("rope_interleave", True) is False:
        raise _refuse(hp, "with rope_interleave=false: llama.cpp's deepseek2 rotates interleaved pairs")


def deepseek_v2_check(hp: Hparams) -> None:
    """:func:`deepseek2_check`, and the V2 router's differences from ``build_moe_ffn``.

    Raises:
        UnsupportedModelError: ``n_group`` > 1 (transformers' V2 router takes each group's best score or
            no groups at all; llama.cpp sums each group's two best), ``norm_topk_prob`` (transformers' V2
            router never normalises; the converter writes the key), a ``scoring_func`` other than softmax.
    """
    deepseek2_check(hp)
    h = hp.h
    if int(h.get("n_group") or 1) > 1:
        raise _refuse(hp, f"with expert groups (n_group={h['n_group']}): llama.cpp chooses groups by the sum of their two best scores")
    if h.get("norm_topk_prob"):
        raise _refuse(hp, "with norm_topk_prob: transformers' DeepSeek-V2 router does not normalise, llama.cpp would")
    if h.get("scoring_func", "softmax") != "softmax":
        raise _refuse(hp, f"with scoring_func={h['scoring_func']!r}: transformers' DeepSeek-V2 router runs softmax")


DEEPSEEK_V3 = GgufArch(
    gguf.MODEL_ARCH.DEEPSEEK2,
    deepseek2_params,
    vocabs=(VocabKind.BPE,),
    check=deepseek_v3_check,
    rope_types=frozenset({"default", "yarn"}),
    mtp_layers=True,
    transforms=(KV_B,),
)

#: HF ``model_type`` -> rules.
ARCHITECTURES: dict[str, GgufArch] = {
    "deepseek_v3": DEEPSEEK_V3,
    "deepseek_v2": replace(DEEPSEEK_V3, check=deepseek_v2_check),
}
