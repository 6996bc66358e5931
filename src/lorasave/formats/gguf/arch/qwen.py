"""Qwen2, Qwen3 and their mixtures of experts (``conversion/qwen.py`` ``Qwen2Model`` / ``Qwen3Model`` /
``Qwen2MoeModel`` / ``Qwen3MoeModel`` of llama.cpp v0.5.0; ``src/models/qwen2moe.cpp``,
``src/models/qwen3moe.cpp``): the common text keys; Q/K/V biases (Qwen2) and ``attn_q_norm`` /
``attn_k_norm`` (Qwen3) by name; experts stacked into ``ffn_*_exps`` (``formats.gguf.experts``), the
router ``ffn_gate_inp`` and Qwen2-MoE's shared expert ``ffn_*_shexp`` with its gate ``ffn_gate_inp_shexp``."""

from __future__ import annotations

from collections.abc import Callable

import gguf

from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch.base import GgufArch, Hparams, K, MetaItem, V, text_params


def qwen_moe_params(hp: Hparams) -> list[MetaItem]:
    """Text keys (expert count and experts used among them) + the expert and shared-expert feed-forward
    lengths (``Qwen2MoeModel.set_gguf_parameters``)."""
    out = text_params(hp)
    if (n := hp.h.get("moe_intermediate_size")) is not None:
        out.append((K.LLM.EXPERT_FEED_FORWARD_LENGTH, int(n), V.UINT32))
    if (n := hp.h.get("shared_expert_intermediate_size")) is not None:
        out.append((K.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH, int(n), V.UINT32))
    return out


def moe_check(model_type: str, norm_topk: bool) -> Callable[[Hparams], None]:
    """Refuse what llama.cpp's ``qwen2moe`` / ``qwen3moe`` graphs cannot run as transformers does:
    dense layers among the sparse ones (``mlp_only_layers``, ``decoder_sparse_step``), and top-k
    weights normalised (``norm_topk_prob``) other than as the graph hard-codes (``build_moe_ffn``'s
    ``norm_w``: true for qwen3moe, false for qwen2moe)."""

    def check(hp: Hparams) -> None:
        h = hp.h
        if h.get("mlp_only_layers") or int(h.get("decoder_sparse_step", 1) or 1) != 1:
            raise UnsupportedModelError(f"{model_type} with dense layers (mlp_only_layers / decoder_sparse_step) is not supported by llama.cpp")
        if bool(h.get("norm_topk_prob", False)) != norm_topk:
            raise UnsupportedModelError(
                f"{model_type} with norm_topk_prob={h.get('norm_topk_prob')} would not run the same in llama.cpp, which "
                f"{'always' if norm_topk else 'never'} normalises the top-k expert weights"
            )

    return check


#: HF ``model_type`` -> rules.
ARCHITECTURES: dict[str, GgufArch] = {
    "qwen2": GgufArch(gguf.MODEL_ARCH.QWEN2, text_params, bpe_pre="qwen2"),
    "qwen3": GgufArch(gguf.MODEL_ARCH.QWEN3, text_params, bpe_pre="qwen2"),
    "qwen2_moe": GgufArch(gguf.MODEL_ARCH.QWEN2MOE, qwen_moe_params, bpe_pre="qwen2", check=moe_check("qwen2_moe", False)),
    "qwen3_moe": GgufArch(gguf.MODEL_ARCH.QWEN3MOE, qwen_moe_params, bpe_pre="qwen2", check=moe_check("qwen3_moe", True)),
}
