"""GLM-4 dense (``conversion/glm.py`` ``Glm4Model`` of llama.cpp v0.5.0; ``src/models/glm4.cpp``).

The common text keys and ``rope.dimension_count = head_dim * partial_rotary_factor`` (0.5 by
default): GLM-4 rotates interleaved pairs of the first half of each head, which is llama.cpp's
normal (non-NeoX) RoPE over ``n_rot`` dimensions, so Q/K are written as they are. The fused
``mlp.gate_up_proj`` stays fused as ``ffn_up`` (``{n_embd, 2 * n_ff}``, split by the runtime);
``post_self_attn_layernorm`` / ``post_mlp_layernorm`` are ``post_attention_norm`` / ``post_ffw_norm``
and ``post_attention_layernorm`` (the pre-MLP norm) is ``ffn_norm``, all by gguf-py's map. The
tokenizer is byte-level BPE only, with ``<|endoftext|>`` as BOS/EOS/UNK and ``<|user|>`` as EOT
where the tokenizer files set none (``Glm4Model.set_vocab``).
"""

from __future__ import annotations

import gguf

from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch.base import GgufArch, Hparams, K, MetaItem, V, VocabKind, text_params


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


#: HF ``model_type`` -> rules.
ARCHITECTURES: dict[str, GgufArch] = {
    "glm4": GgufArch(
        gguf.MODEL_ARCH.GLM4,
        glm4_params,
        vocabs=(VocabKind.BPE,),
        check=glm4_check,
        special_tokens=(("eos", "<|endoftext|>"), ("eot", "<|user|>"), ("unk", "<|endoftext|>"), ("bos", "<|endoftext|>")),
    ),
}
