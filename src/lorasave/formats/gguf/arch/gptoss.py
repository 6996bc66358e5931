"""gpt-oss (``conversion/gpt_oss.py`` ``GptOssModel`` of llama.cpp v0.5.0; ``src/models/openai-moe.cpp``).

The common text keys (YaRN among them, ``TextModel.set_gguf_parameters``) + ``sliding_window`` and
``expert_feed_forward_length`` = ``intermediate_size``; the byte-level BPE vocab (``_set_vocab_gpt2``).
Tensors: ``self_attn.sinks`` gets ``.weight`` (``filter_tensors``) and maps to ``attn_sinks``; the router
``mlp.router`` (weight and bias) to ``ffn_gate_inp``; transformers' fused experts are split as
``modify_tensors`` does for a float checkpoint: ``gate_up_proj`` ``(E, n_embd, 2 * n_ff)`` transposed,
gate = even rows and up = odd rows (interleaved), its bias ``(E, 2 * n_ff)`` likewise; ``down_proj``
``(E, n_ff, n_embd)`` transposed, its bias as it is. The converter repacks MXFP4 only for experts
stored as ``_blocks`` / ``_scales``; a merged (float) checkpoint's experts are written with the type
asked for (``mxfp4_moe`` gives MXFP4 experts).

The graph hard-codes what configs may vary, so other values are refused: alternating sliding / full
layers starting with a sliding one (``load_swa_pattern(ml, 2)``), the SwiGLU-OAI constants
(``alpha`` 1.702, ``limit`` 7.0), softmax over the top-k router logits, an untied ``output``.
llama.cpp's YaRN always rounds the correction range (``ggml_rope_yarn_corr_dims``: floor / ceil),
so gpt-oss's ``truncate: false`` runs with rounded bounds, as with the converter's own file (logged).
"""

from __future__ import annotations

import logging

import gguf

from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch.base import FusedExperts, GgufArch, Hparams, K, MetaItem, V, VocabKind, text_params
from lorasave.formats.gguf.arch.mistral import yarn_params

logger = logging.getLogger(__name__)

#: ``GptOssModel.modify_tensors`` for float experts (not ``_blocks`` / ``_scales``).
GPTOSS_FUSED = (
    FusedExperts("mlp.experts.gate_up_proj_bias", ("mlp.experts.gate_proj.bias", "mlp.experts.up_proj.bias"), interleaved=True),
    FusedExperts("mlp.experts.down_proj_bias", ("mlp.experts.down_proj.bias",)),
    FusedExperts("mlp.experts.gate_up_proj", ("mlp.experts.gate_proj.weight", "mlp.experts.up_proj.weight"), transposed=True, interleaved=True),
    FusedExperts("mlp.experts.down_proj", ("mlp.experts.down_proj.weight",), transposed=True),
)


#: The result note of a gpt-oss file (``GgufArch.expert_note``).
EXPERT_NOTE = (
    "gpt-oss experts written as {types} from the merged float weights (llama.cpp's converter keeps MXFP4 only "
    "for experts stored as _blocks/_scales; type mxfp4_moe writes MXFP4 experts)"
)


def gptoss_params(hp: Hparams) -> list[MetaItem]:
    """``GptOssModel.set_gguf_parameters``: the text keys (YaRN included), ``attention.sliding_window``,
    ``expert_feed_forward_length``."""
    out = text_params(hp) + yarn_params(hp)
    out.append((K.Attention.SLIDING_WINDOW, int(hp.h["sliding_window"]), V.UINT32))
    out.append((K.LLM.EXPERT_FEED_FORWARD_LENGTH, int(hp.h["intermediate_size"]), V.UINT32))
    return out


def gptoss_check(hp: Hparams) -> None:
    """Refuse gpt-oss configs ``openai-moe.cpp`` would run differently than transformers.

    Raises:
        UnsupportedModelError: layer types other than sliding / full alternating from layer 0, no
            ``sliding_window``, SwiGLU constants other than 1.702 / 7.0, tied embeddings.
    """
    h = hp.h
    n = hp.n_layer
    want = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    if h.get("layer_types") not in (None, want):
        raise UnsupportedModelError("gpt_oss layer_types other than sliding/full alternating from layer 0 are not supported by llama.cpp (SWA pattern 2)")
    if not h.get("sliding_window"):
        raise UnsupportedModelError("gpt_oss without sliding_window is not supported by llama.cpp's converter")
    if float(h.get("swiglu_alpha", 1.702)) != 1.702 or float(h.get("swiglu_limit", 7.0)) != 7.0:
        raise UnsupportedModelError("gpt_oss swiglu_alpha/swiglu_limit other than 1.702/7.0 are not supported: llama.cpp hard-codes them")
    if h.get("tie_word_embeddings"):
        raise UnsupportedModelError("gpt_oss with tie_word_embeddings is not supported: llama.cpp's gpt-oss needs its own output tensor")
    if hp.full_rope.get("rope_type") == "yarn" and hp.full_rope.get("truncate") is False:
        logger.warning("gpt_oss YaRN truncate=false: llama.cpp rounds the YaRN correction range (as for the converter's own file)")


ARCHITECTURES: dict[str, GgufArch] = {
    "gpt_oss": GgufArch(
        gguf.MODEL_ARCH.GPT_OSS,
        gptoss_params,
        vocabs=(VocabKind.BPE,),
        bpe_pre="gpt-4o",
        check=gptoss_check,
        rope_types=frozenset({"default", "yarn"}),
        fused=GPTOSS_FUSED,
        weight_suffix=("sinks",),
        expert_note=EXPERT_NOTE,
    ),
}
