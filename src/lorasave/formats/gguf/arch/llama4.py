"""Llama 4 (``conversion/llama.py`` ``Llama4Model`` of llama.cpp v0.5.0; ``src/models/llama4.cpp``).

``llama4_text`` is ``Llama4ForCausalLM``; ``llama4`` is ``Llama4ForConditionalGeneration``: its language
model only (``base.MULTIMODAL``: ``vision_model.*`` and ``multi_modal_projector.*`` left out, the
``language_model.`` prefix stripped), as the converter's ``TextModel`` does (the vision tower goes to
the ``mmproj`` file, ``conversion/llama4.py``).

Llama's keys with the two feed-forward sizes swapped as ``Llama4Model.__init__`` does:
``feed_forward_length`` = ``intermediate_size_mlp`` (the dense layers), ``expert_feed_forward_length``
= ``intermediate_size`` (each routed expert and the shared expert), plus ``interleave_moe_layer_step``
(layer ``il`` has experts when ``(il + 1) % step == 0``, transformers' ``moe_layers``). Q/K are written
as they are (``undo_permute = False``: Llama 4 already rotates interleaved pairs, llama.cpp's normal
RoPE); ``rope_type`` ``llama3`` (Scout) gives ``rope_freqs`` as for Llama 3.1. Tensors: the router
``feed_forward.router`` is ``ffn_gate_inp``, ``feed_forward.shared_expert.*`` the ``*_shexp``; the fused
experts are split as ``Llama4Model.modify_tensors`` does: ``gate_up_proj`` ``(E, n_embd, 2 * n_ff)``
transposed, gate = the first half, up = the second (concatenated, not interleaved); ``down_proj``
``(E, n_ff, n_embd)`` transposed. Byte-level BPE vocab only (``set_vocab`` = ``_set_vocab_gpt2``).

What the converter writes no key for, ``llama4.cpp`` hard-codes, so other configs are refused:
chunked attention of 8192 tokens on 3 layers of every 4 (``load_swa_pattern(ml, 4)``), RoPE skipped
on every 4th layer (``n_no_rope_layer_step`` 4), attention temperature tuning on those layers with
``floor_scale`` 8192 and ``attn_scale`` 0.1, the L2 Q/K norm on the RoPE layers for every expert count
but 128 (``use_kq_norm = type != 17B_128E``), sigmoid routing scaling the expert input, SiLU, no
attention output bias. A config with every layer ``full_attention`` (no chunked attention; MobileLLM)
makes the converter write ``sliding_window = 0``, on which ``llama4.cpp`` runs RoPE on every layer but
the last: refused too.
"""

from __future__ import annotations

from dataclasses import replace

import gguf

from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch.base import MULTIMODAL, FusedExperts, GgufArch, Hparams, K, MetaItem, V, VocabKind, set_item
from lorasave.formats.gguf.arch.llama import llama3_rope_freqs, llama_params

#: ``Llama4Model.modify_tensors``: ``gate_up_proj`` ``(E, n_embd, 2 * n_ff)`` -> transposed, split on its
#: rows into gate then up; ``down_proj`` ``(E, n_ff, n_embd)`` -> transposed.
LLAMA4_FUSED = (
    FusedExperts("feed_forward.experts.gate_up_proj", ("feed_forward.experts.gate_proj.weight", "feed_forward.experts.up_proj.weight"), transposed=True),
    FusedExperts("feed_forward.experts.down_proj", ("feed_forward.experts.down_proj.weight",), transposed=True),
)

#: What ``llama4.cpp`` hard-codes (``load_arch_hparams``, chunked branch).
CHUNK = 8192
PERIOD = 4
FLOOR_SCALE = 8192
ATTN_SCALE = 0.1


def llama4_params(hp: Hparams) -> list[MetaItem]:
    """``Llama4Model.set_gguf_parameters``: Llama's keys with ``feed_forward_length`` =
    ``intermediate_size_mlp``, then ``interleave_moe_layer_step`` and ``expert_feed_forward_length`` =
    ``intermediate_size`` (``sliding_window`` 0 for an all-``full_attention`` config is refused)."""
    h = hp.h
    out = llama_params(hp)
    set_item(out, K.LLM.FEED_FORWARD_LENGTH, int(h["intermediate_size_mlp"]), V.UINT32)
    out.append((K.LLM.INTERLEAVE_MOE_LAYER_STEP, int(h["interleave_moe_layer_step"]), V.UINT32))
    out.append((K.LLM.EXPERT_FEED_FORWARD_LENGTH, int(h["intermediate_size"]), V.UINT32))
    return out


def llama4_check(hp: Hparams) -> None:
    """Refuse Llama 4 configs ``llama4.cpp`` would run differently than transformers (module docstring).

    Raises:
        UnsupportedModelError: no experts, MoE layers other than every ``interleave_moe_layer_step``-th,
            no chunked attention, a chunk size, chunked/full pattern or no-RoPE pattern other than
            llama.cpp's, temperature tuning off or with other constants, ``use_qk_norm`` other than
            llama.cpp's choice, an activation other than SiLU, attention biases.
    """
    h, n = hp.h, hp.n_layer
    n_expert = int(h.get("num_local_experts") or 0)
    if n_expert == 0:
        raise UnsupportedModelError("llama4 without experts (num_local_experts=0) is refused by llama.cpp's llama4 graph")
    step = int(h.get("interleave_moe_layer_step") or 0)
    moe = h.get("moe_layers")
    if step < 1 or (moe is not None and list(moe) != list(range(step - 1, n, step))):
        raise UnsupportedModelError(
            f"llama4 moe_layers={h.get('moe_layers')} are not every interleave_moe_layer_step={step}-th layer, the only placement llama.cpp reads"
        )
    types = list(h.get("layer_types") or [])
    if types and all(t == "full_attention" for t in types):
        raise UnsupportedModelError("llama4 without chunked attention (every layer full_attention): llama.cpp's llama4 graph then skips RoPE on the last layer")
    if h.get("attention_chunk_size", CHUNK) != CHUNK:
        raise UnsupportedModelError(f"llama4 attention_chunk_size={h['attention_chunk_size']}: llama.cpp's llama4 graph hard-codes chunks of {CHUNK}")
    want_rope = [int((i + 1) % PERIOD != 0) for i in range(n)]
    if list(h.get("no_rope_layers") or want_rope) != want_rope:
        raise UnsupportedModelError(f"llama4 no_rope_layers differ from llama.cpp's fixed pattern (RoPE skipped on every {PERIOD}th layer); not supported")
    want_types = ["chunked_attention" if i % PERIOD < PERIOD - 1 else "full_attention" for i in range(n)]
    if types and types != want_types:
        raise UnsupportedModelError(f"llama4 layer_types differ from llama.cpp's fixed pattern ({PERIOD - 1} chunked, then 1 full); not supported")
    tuning = (h.get("attn_temperature_tuning", True), h.get("floor_scale", FLOOR_SCALE), h.get("attn_scale", ATTN_SCALE))
    if not tuning[0] or int(tuning[1]) != FLOOR_SCALE or float(tuning[2]) != ATTN_SCALE:
        raise UnsupportedModelError(
            f"llama4 attention temperature tuning {tuning[0]} (floor_scale={tuning[1]}, attn_scale={tuning[2]}): "
            f"llama.cpp always applies it with {FLOOR_SCALE}, {ATTN_SCALE}"
        )
    if bool(h.get("use_qk_norm", True)) != (n_expert != 128):
        raise UnsupportedModelError(
            f"llama4 use_qk_norm={h.get('use_qk_norm', True)} with {n_expert} experts: "
            "llama.cpp applies the Q/K L2 norm exactly when the model has not 128 experts"
        )
    if h.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"llama4 hidden_act={h['hidden_act']!r}: llama.cpp's llama4 graph runs SiLU")
    if h.get("attention_bias"):
        raise UnsupportedModelError("llama4 with attention_bias: llama.cpp's llama4 graph loads no attention output bias")


LLAMA4 = GgufArch(
    gguf.MODEL_ARCH.LLAMA4,
    llama4_params,
    vocabs=(VocabKind.BPE,),
    bpe_pre="llama4",
    extra_tensors=llama3_rope_freqs,
    check=llama4_check,
    rope_types=frozenset({"default", "linear", "llama3"}),
    fused=LLAMA4_FUSED,
)

#: HF ``model_type`` -> rules.
ARCHITECTURES: dict[str, GgufArch] = {"llama4_text": LLAMA4, "llama4": replace(LLAMA4, text_of=MULTIMODAL)}
