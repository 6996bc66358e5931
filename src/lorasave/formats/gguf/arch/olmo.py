"""OLMo 2 (``conversion/olmo.py`` ``Olmo2Model`` of llama.cpp v0.5.0; ``src/models/olmo2.cpp``):
the common text keys; ``post_attention_layernorm`` / ``post_feedforward_layernorm`` become
``blk.N.post_attention_norm`` / ``post_ffw_norm`` (norms applied to each sub-layer's output before
the residual add), and ``q_norm`` / ``k_norm`` (RMSNorm over the whole Q / K projection, not per
head) ``attn_q_norm`` / ``attn_k_norm``: all by gguf-py's tensor map. NeoX RoPE, so no permutation.
"""

from __future__ import annotations

import gguf

from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch.base import GgufArch, Hparams, VocabKind, text_params


def olmo2_check(hp: Hparams) -> None:
    """Refuse OLMo 2 configs llama.cpp v0.5.0 cannot load or would run differently.

    Raises:
        UnsupportedModelError: tied embeddings (``llama_model_olmo2`` requires ``output.weight``),
            ``attention_bias`` (no Q/K/V/O biases loaded), or ``head_dim`` other than
            ``hidden_size / num_attention_heads`` (the runtime's head size), or a ``sliding_window``
            (transformers' OLMo 2 ignores it; the converter would write it and the runtime use it).
    """
    h = hp.h
    if h.get("tie_word_embeddings"):
        raise UnsupportedModelError("olmo2 with tie_word_embeddings=true is not supported: llama.cpp's olmo2 requires an untied output.weight")
    if h.get("attention_bias"):
        raise UnsupportedModelError("olmo2 with attention_bias=true is not supported: llama.cpp's olmo2 loads no attention biases")
    if h.get("sliding_window") is not None:
        raise UnsupportedModelError("olmo2 config with sliding_window: llama.cpp would apply it, transformers' OLMo 2 does not; not supported")
    n_head, _ = hp.heads
    if hp.head_dim * n_head != int(h["hidden_size"]):
        raise UnsupportedModelError(f"olmo2 head_dim={hp.head_dim} with {n_head} heads != hidden_size {h['hidden_size']}, which llama.cpp's olmo2 assumes")


#: HF ``model_type`` -> rules.
ARCHITECTURES: dict[str, GgufArch] = {
    "olmo2": GgufArch(gguf.MODEL_ARCH.OLMO2, text_params, vocabs=(VocabKind.BPE,), check=olmo2_check),
}
