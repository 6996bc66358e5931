"""Qwen3.5 dense and MoE (``conversion/qwen.py`` ``Qwen3_5TextModel`` / ``Qwen3_5MoeTextModel`` of llama.cpp
v0.5.0, through ``_Qwen35MRopeMixin``, ``_LinearAttentionVReorderBase``, ``Qwen3NextModel``, ``_QwenMtpMixin``
and ``Qwen2MoeModel``; ``src/models/qwen35.cpp``, ``qwen35moe.cpp``, ``delta-net-base.cpp``).

transformers 5: ``Qwen3_5ForCausalLM`` (``qwen3_5_text``), ``Qwen3_5ForConditionalGeneration`` (``qwen3_5``,
its language model only, as the converter writes it: ``base.MULTIMODAL``), ``Qwen3_5MoeForCausalLM``
(``qwen3_5_moe_text``) and ``Qwen3_5MoeForConditionalGeneration`` (``qwen3_5_moe``). Three of every four
layers are Gated DeltaNet linear attention; the others gated full attention (``q_proj`` holds query and
gate, Q/K RMSNorms, partial rotary with M-RoPE sections).

What the converter does, here as data:

* keys (``Qwen3NextModel.set_gguf_parameters``): the text keys and expert feed-forward lengths
  (``Qwen2MoeModel``), ``ssm.conv_kernel`` / ``state_size`` (linear key head size) / ``group_count``
  (linear key heads) / ``time_step_rank`` (linear value heads) / ``inner_size`` (value heads x size),
  ``attention.recurrent_layers`` from ``layer_types``, ``full_attention_interval`` (default 4),
  ``rope.dimension_count`` = head_dim x ``partial_rotary_factor`` (default 0.25), and
  ``rope.dimension_sections`` [11, 11, 10, 0] when the config has no ``mrope_section``
  (``_Qwen35MRopeMixin``: the runtime requires the key);
* tensors (``Qwen3NextModel.modify_tensors``): ``A_log`` -> ``-exp(A_log)`` (``ssm_a``), ``dt_bias`` renamed
  ``dt_proj.bias`` (``ssm_dt.bias``), the ``(channels, 1, kernel)`` ``conv1d`` squeezed to 2-D, every RMSNorm
  ``+1`` (transformers computes ``x * (1 + w)``) except the gated ``linear_attn.norm`` (``x * w``);
* the V-head reorder (``_LinearAttentionVReorderBase.modify_tensors``, when there are more value heads than
  key heads): transformers groups the value heads by key head, llama.cpp broadcasts key heads tiled, so
  the V rows of ``in_proj_qkv`` and of ``conv1d``, the rows of ``in_proj_z`` / ``in_proj_a`` /
  ``in_proj_b``, the elements of ``A_log`` / ``dt_bias`` and the columns of ``out_proj`` go from
  ``[k0v0, k0v1, k1v0, k1v1]`` to ``[k0v0, k1v0, k0v1, k1v1]``;
* experts as Qwen2-MoE's (``ffn_*_exps``, router, shared expert and its sigmoid gate ``ffn_gate_inp_shexp``);
* the multi-token-prediction block (``mtp.*``) left out, as ``--no-mtp`` does (the fine-tune does not
  train it; without the flag the converter also stops on a checkpoint without it).

The tensor transforms are ``base.ValueTransform`` entries (the writer buffers one such tensor's merged
float32 blocks, then writes its transform): the LoRA is merged into the checkpoint's layout
(``in_proj_qkv``, ``out_proj``...), then reordered, as the converter reorders the merged checkpoint.

Refused, one line each: linear-attention key and value head sizes that differ (llama.cpp v0.5.0's loader
takes both from ``ssm.state_size``), value heads not a multiple of key heads, ``attention_bias`` (the
runtime has no ``attn_output.bias``), an activation other than SiLU (the graph's conv, gated norm and MLP
use SiLU whatever the config says). Not refused: llama.cpp's L2 norm of q/k in the linear attention
uses ``rms_norm_eps`` where transformers uses 1e-6 (the same for Qwen3.5's 1e-6).
"""

from __future__ import annotations

from dataclasses import replace

import gguf
import torch

from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch.base import MULTIMODAL, GgufArch, Hparams, K, MetaItem, V, ValueTransform, VocabKind, set_item
from lorasave.formats.gguf.arch.qwen import qwen_moe_params

#: ``_Qwen35MRopeMixin._QWEN35_DEFAULT_MROPE_SECTION``.
DEFAULT_SECTIONS = [11, 11, 10, 0]


def qwen35_params(hp: Hparams) -> list[MetaItem]:
    """``Qwen3NextModel.set_gguf_parameters`` (with ``--no-mtp``) and ``_Qwen35MRopeMixin``'s default sections."""
    h = hp.h
    out = qwen_moe_params(hp)
    out += [
        (K.SSM.CONV_KERNEL, int(h["linear_conv_kernel_dim"]), V.UINT32),
        (K.SSM.STATE_SIZE, int(h["linear_key_head_dim"]), V.UINT32),
        (K.SSM.GROUP_COUNT, int(h["linear_num_key_heads"]), V.UINT32),
        (K.SSM.TIME_STEP_RANK, int(h["linear_num_value_heads"]), V.UINT32),
        (K.SSM.INNER_SIZE, int(h["linear_value_head_dim"]) * int(h["linear_num_value_heads"]), V.UINT32),
    ]
    if (layer_types := h.get("layer_types")) is not None:
        if len(layer_types) != hp.n_layer:
            raise UnsupportedModelError(f"layer_types has {len(layer_types)} entries, expected num_hidden_layers ({hp.n_layer})")
        out.append(("{arch}.attention.recurrent_layers", [t == "linear_attention" for t in layer_types], V.ARRAY))
    out.append((K.LLM.FULL_ATTENTION_INTERVAL, int(h.get("full_attention_interval", 4)), V.UINT32))
    rope_dim = h.get("head_dim") or int(h["hidden_size"]) // int(h["num_attention_heads"])
    out.append((K.Rope.DIMENSION_COUNT, int(int(rope_dim) * hp.rope.get("partial_rotary_factor", 0.25)), V.UINT32))
    if "mrope_section" not in hp.rope:
        set_item(out, K.Rope.DIMENSION_SECTIONS, list(DEFAULT_SECTIONS), V.ARRAY)
    return out


def qwen35_check(hp: Hparams) -> None:
    """Refuse what llama.cpp v0.5.0's ``qwen35`` / ``qwen35moe`` would not load or run as transformers does.

    Raises:
        UnsupportedModelError: see the module docstring.
    """
    h = hp.h
    name = str(h.get("model_type"))
    if int(h["linear_key_head_dim"]) != int(h["linear_value_head_dim"]):
        raise UnsupportedModelError(
            f"{name} with linear_key_head_dim {h['linear_key_head_dim']} != linear_value_head_dim {h['linear_value_head_dim']}: "
            "llama.cpp's qwen35 takes both from ssm.state_size"
        )
    if int(h["linear_num_value_heads"]) % int(h["linear_num_key_heads"]):
        raise UnsupportedModelError(f"{name} with linear_num_value_heads not a multiple of linear_num_key_heads is not supported by llama.cpp")
    if h.get("attention_bias"):
        raise UnsupportedModelError(f"{name} with attention_bias: llama.cpp's qwen35 has no attention output bias")
    if h.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{name} hidden_act={h['hidden_act']!r}: llama.cpp's qwen35 runs SiLU")


def _sizes(hp: Hparams) -> tuple[int, int, int, int]:
    """``(key heads, value heads per key head, key head size, value head size)`` of the linear attention."""
    h = hp.h
    nk, nv = int(h["linear_num_key_heads"]), int(h["linear_num_value_heads"])
    return nk, nv // nk, int(h["linear_key_head_dim"]), int(h["linear_value_head_dim"])


def reorder_v_heads(t: torch.Tensor, dim: int, nk: int, per_k: int, head_dim: int) -> torch.Tensor:
    """``_LinearAttentionVReorderBase._reorder_v_heads``: axis ``dim`` of ``(nk, per_k, head_dim)`` value heads,
    grouped by key head, as ``(per_k, nk, head_dim)`` (tiled)."""
    shape = list(t.shape)
    dim = dim % len(shape)
    t = t.reshape(*shape[:dim], nk, per_k, head_dim, *shape[dim + 1 :])
    return t.transpose(dim, dim + 1).contiguous().reshape(shape)


def _qkv_channels(t: torch.Tensor, hp: Hparams) -> torch.Tensor:
    """Q and K channels as they are, the V channels' heads tiled (``in_proj_qkv`` rows, ``conv1d`` channels)."""
    nk, per_k, dk, dv = _sizes(hp)
    if per_k == 1:
        return t
    qk = 2 * nk * dk
    return torch.cat([t[:qk], reorder_v_heads(t[qk:], 0, nk, per_k, dv)], dim=0)


def in_proj_qkv(hp: Hparams, w: torch.Tensor) -> torch.Tensor:
    """``in_proj_qkv``: the V rows' heads tiled."""
    return _qkv_channels(w, hp)


def in_proj_z(hp: Hparams, w: torch.Tensor) -> torch.Tensor:
    """``in_proj_z``: rows are value heads."""
    nk, per_k, _, dv = _sizes(hp)
    return w if per_k == 1 else reorder_v_heads(w, 0, nk, per_k, dv)


def per_v_head(hp: Hparams, w: torch.Tensor) -> torch.Tensor:
    """``in_proj_a`` / ``in_proj_b`` rows, ``dt_bias`` elements: one per value head."""
    nk, per_k, _, _ = _sizes(hp)
    return w if per_k == 1 else reorder_v_heads(w, 0, nk, per_k, 1)


def out_proj(hp: Hparams, w: torch.Tensor) -> torch.Tensor:
    """``out_proj``: columns are value heads."""
    nk, per_k, _, dv = _sizes(hp)
    return w if per_k == 1 else reorder_v_heads(w, 1, nk, per_k, dv)


def conv1d(hp: Hparams, w: torch.Tensor) -> torch.Tensor:
    """``conv1d`` ``(channels, 1, kernel)`` squeezed to ``(channels, kernel)``, the V channels' heads tiled."""
    return _qkv_channels(w.squeeze(), hp)


def a_log(hp: Hparams, w: torch.Tensor) -> torch.Tensor:
    """``A_log`` -> ``-exp(A_log)`` per value head, tiled."""
    return -torch.exp(per_v_head(hp, w))


#: The converter's tensor transforms (``_LinearAttentionVReorderBase`` then ``Qwen3NextModel.modify_tensors``).
TRANSFORMS = (
    ValueTransform("linear_attn.in_proj_qkv.weight", (("linear_attn.in_proj_qkv.weight", in_proj_qkv),)),
    ValueTransform("linear_attn.in_proj_z.weight", (("linear_attn.in_proj_z.weight", in_proj_z),)),
    ValueTransform("linear_attn.in_proj_a.weight", (("linear_attn.in_proj_a.weight", per_v_head),)),
    ValueTransform("linear_attn.in_proj_b.weight", (("linear_attn.in_proj_b.weight", per_v_head),)),
    ValueTransform("linear_attn.out_proj.weight", (("linear_attn.out_proj.weight", out_proj),)),
    ValueTransform("linear_attn.conv1d.weight", (("linear_attn.conv1d.weight", conv1d),)),
    ValueTransform("linear_attn.A_log", (("linear_attn.A_log", a_log),)),
    ValueTransform("linear_attn.dt_bias", (("linear_attn.dt_proj.bias", per_v_head),)),
)

QWEN35 = GgufArch(
    gguf.MODEL_ARCH.QWEN35,
    qwen35_params,
    norm_shift=1.0,
    no_shift=("linear_attn.norm.weight",),
    vocabs=(VocabKind.BPE,),
    bpe_pre="qwen35",
    check=qwen35_check,
    mtp_layers=True,
    transforms=TRANSFORMS,
)
QWEN35MOE = replace(QWEN35, arch=gguf.MODEL_ARCH.QWEN35MOE)

#: HF ``model_type`` -> rules.
ARCHITECTURES: dict[str, GgufArch] = {
    "qwen3_5_text": QWEN35,
    "qwen3_5": replace(QWEN35, text_of=MULTIMODAL),
    "qwen3_5_moe_text": QWEN35MOE,
    "qwen3_5_moe": replace(QWEN35MOE, text_of=MULTIMODAL),
}
