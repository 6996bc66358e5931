"""Granite (``conversion/granite.py`` ``GraniteModel`` of llama.cpp v0.5.0, a ``LlamaModel``;
``src/models/granite.cpp``): Llama's keys and Q/K permutation without ``head_dim``, and the four
multipliers as ``{arch}.attention.scale`` / ``embedding_scale`` / ``residual_scale`` / ``logit_scale``.

The runtime multiplies the token embeddings by ``embedding_scale``, scales ``QK^T`` by
``attention.scale`` (instead of ``1/sqrt(head_dim)``), each block's attention and MLP outputs by
``residual_scale`` before the residual add, and divides the logits by ``logit_scale``: transformers'
``embedding_multiplier``, ``attention_multiplier``, ``residual_multiplier`` and ``logits_scaling``.
"""

from __future__ import annotations

import gguf

from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch.base import GgufArch, Hparams, K, MetaItem, V
from lorasave.formats.gguf.arch.llama import llama_like, llama_params

#: config.json multiplier -> GGUF key (``GraniteModel.set_gguf_parameters``, in its order).
MULTIPLIERS = (
    ("attention_multiplier", K.Attention.SCALE),
    ("embedding_multiplier", K.LLM.EMBEDDING_SCALE),
    ("residual_multiplier", K.LLM.RESIDUAL_SCALE),
    ("logits_scaling", K.LLM.LOGIT_SCALE),
)


def _without_head_dim(hp: Hparams) -> Hparams:
    """The config after ``GraniteModel.set_gguf_parameters`` pops ``head_dim`` (RoPE over ``hidden / heads``)."""
    return Hparams({k: v for k, v in hp.h.items() if k != "head_dim"}, hp.rope)


def granite_params(hp: Hparams) -> list[MetaItem]:
    """Llama's keys without ``attention.key_length`` / ``value_length``, then each non-zero multiplier."""
    out = llama_params(_without_head_dim(hp))
    for name, key in MULTIPLIERS:
        if value := hp.h.get(name):
            out.append((key, float(value), V.FLOAT32))
    return out


def granite_check(hp: Hparams) -> None:
    """Refuse Granite configs the converter's file would not run as transformers does.

    Raises:
        UnsupportedModelError: ``head_dim`` other than ``hidden_size / num_attention_heads`` (the
            converter drops it), no ``logits_scaling`` (a key ``llama_model_granite`` requires), or
            a multiplier of 0 (not written by the converter; the runtime then skips the scaling).
    """
    n_head, _ = hp.heads
    plain = int(hp.find(("hidden_size", "n_embd"))) // n_head
    if (head_dim := hp.h.get("head_dim")) is not None and int(head_dim) != plain:
        raise UnsupportedModelError(f"granite head_dim={head_dim} differs from hidden_size/num_attention_heads={plain}, used by llama.cpp's converter")
    for name, _ in MULTIPLIERS:
        value = hp.h.get(name)
        if value is None and name == "logits_scaling":
            raise UnsupportedModelError("granite config has no logits_scaling, which llama.cpp's granite architecture requires")
        if value is not None and float(value) == 0.0:
            raise UnsupportedModelError(f"granite {name}=0 cannot be written: llama.cpp reads 0 as 'no scaling'")


#: HF ``model_type`` -> rules.
ARCHITECTURES: dict[str, GgufArch] = {
    "granite": llama_like(gguf.MODEL_ARCH.GRANITE, granite_params, check=granite_check),
}
