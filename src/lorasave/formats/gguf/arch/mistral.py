"""Mistral 3 / Ministral 3 (``conversion/mistral3.py`` ``Mistral3Model.Ministral3Model`` of llama.cpp
v0.5.0: ``LlamaModel`` with the ``mistral3`` architecture; ``src/models/mistral3.cpp``).

``mistral3`` is ``Mistral3ForConditionalGeneration`` (Mistral Small 3.1+, Ministral 3): its language
model only (``base.MULTIMODAL``: the Pixtral tower and the projector left out); ``ministral3`` is the
text model (``Ministral3ForCausalLM``). Llama's keys, Q/K permutation and tokenizer order; a
``ministral3`` text model adds YaRN (``rope.scaling.yarn_log_mul`` = ``mscale_all_dim``) and
Llama 4's attention temperature (``attention.temperature_scale`` = ``llama_4_scaling_beta``).
"""

from __future__ import annotations

from dataclasses import replace

import gguf

from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch.base import MULTIMODAL, GgufArch, Hparams, K, MetaItem, V, set_item
from lorasave.formats.gguf.arch.llama import llama_like, llama_params


def yarn_params(hp: Hparams) -> list[MetaItem]:
    """The YaRN keys of ``TextModel.set_gguf_parameters`` (``conversion/base.py``), or none without YaRN."""
    rp = hp.full_rope
    if rp.get("rope_type") != "yarn" or rp.get("factor") is None:
        return []
    out: list[MetaItem] = [
        (K.Rope.SCALING_TYPE, gguf.RopeScalingType.YARN.value, V.STRING),
        (K.Rope.SCALING_FACTOR, float(rp["factor"]), V.FLOAT32),
        (K.Rope.SCALING_ORIG_CTX_LEN, int(rp["original_max_position_embeddings"]), V.UINT32),
    ]
    optional = (
        (K.Rope.SCALING_YARN_EXT_FACTOR, rp.get("extrapolation_factor")),
        (K.Rope.SCALING_YARN_ATTN_FACTOR, rp.get("attention_factor", rp.get("attn_factor"))),
        (K.Rope.SCALING_YARN_BETA_FAST, rp.get("beta_fast")),
        (K.Rope.SCALING_YARN_BETA_SLOW, rp.get("beta_slow")),
    )
    out += [(key, float(value), V.FLOAT32) for key, value in optional if value is not None]
    return out


def mistral3_params(hp: Hparams) -> list[MetaItem]:
    """``Ministral3Model.set_gguf_parameters``: Llama's keys, YaRN, and for ``ministral3`` the log
    multiplier and the attention temperature."""
    out = llama_params(hp)
    for key, value, vtype in yarn_params(hp):
        set_item(out, key, value, vtype)
    if hp.h.get("model_type") == "ministral3":
        rp = hp.full_rope
        set_item(out, K.Rope.SCALING_YARN_LOG_MUL, float(rp["mscale_all_dim"]), V.FLOAT32)
        set_item(out, K.Attention.TEMPERATURE_SCALE, float(rp["llama_4_scaling_beta"]), V.FLOAT32)
    return out


def mistral3_check(hp: Hparams) -> None:
    """Refuse Mistral 3 configs llama.cpp v0.5.0 would run differently (``src/models/mistral3.cpp``,
    ``llama_context`` YaRN set-up) or its converter refuses.

    ``ministral3`` must have YaRN with ``mscale_all_dim`` and ``llama_4_scaling_beta`` (the
    converter asserts it); llama.cpp derives YaRN's attention factor itself assuming ``mscale == 1``
    (an explicit ``attention_factor`` is overridden) and always truncates the correction range; the
    ``mistral3`` runtime has no sliding window; an ``llama_4_scaling_beta`` outside ``ministral3``
    is not written; other text models (``mistral4``: DeepSeek-style experts) are refused.

    Raises:
        UnsupportedModelError: one of these disagrees with the config.
    """
    h, rp = hp.h, hp.full_rope
    if h.get("model_type") not in ("mistral", "ministral3"):
        raise UnsupportedModelError(f"mistral3 with a {h.get('model_type')!r} text model: only mistral and ministral3 are written (as llama.cpp's mistral3)")
    ministral3 = h.get("model_type") == "ministral3"
    yarn = rp.get("rope_type") == "yarn"
    if ministral3 and not (yarn and "mscale_all_dim" in rp and "llama_4_scaling_beta" in rp):
        raise UnsupportedModelError("ministral3 without YaRN rope_parameters (mscale_all_dim, llama_4_scaling_beta) is refused by llama.cpp's converter")
    if not ministral3 and rp.get("llama_4_scaling_beta"):
        raise UnsupportedModelError(
            f"mistral3 text model {h.get('model_type')!r} with llama_4_scaling_beta: llama.cpp's converter writes it for ministral3 only"
        )
    if yarn:
        mscale, all_dim = rp.get("mscale"), rp.get("mscale_all_dim")
        if rp.get("attention_factor", rp.get("attn_factor")) is not None:
            raise UnsupportedModelError("mistral3 YaRN with an explicit attention_factor: llama.cpp derives its own")
        if mscale and all_dim and (not ministral3 or float(mscale) != 1.0):
            raise UnsupportedModelError(f"mistral3 YaRN mscale={mscale}, mscale_all_dim={all_dim}: llama.cpp assumes mscale 1 with mscale_all_dim")
        if rp.get("truncate", True) is False:
            raise UnsupportedModelError("mistral3 YaRN with truncate=false: llama.cpp always truncates the correction range")
    if h.get("sliding_window") is not None:
        raise UnsupportedModelError(f"mistral3 with sliding_window={h['sliding_window']}: llama.cpp's mistral3 architecture has no sliding window")


MISTRAL3 = llama_like(gguf.MODEL_ARCH.MISTRAL3, mistral3_params, check=mistral3_check, rope_types=frozenset({"default", "linear", "yarn"}))

#: HF ``model_type`` -> rules.
ARCHITECTURES: dict[str, GgufArch] = {
    "mistral3": replace(MISTRAL3, text_of=MULTIMODAL),
    "ministral3": MISTRAL3,
}
