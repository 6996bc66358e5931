"""Qwen3.5 dense (``conversion/qwen.py`` ``Qwen3_5TextModel`` of llama.cpp v0.5.0; ``src/models/qwen35.cpp``): refused.

transformers 5.24 builds it (``Qwen3_5ForCausalLM``, ``model_type`` ``qwen3_5_text``; the
multimodal ``Qwen3_5ForConditionalGeneration`` is ``qwen3_5``) and the runtime loads ``qwen35``,
but three of every four layers are Gated DeltaNet linear attention, which the converter writes
through value transforms this export's tensor stream does not have: ``A_log`` -> ``-exp(A_log)``,
``dt_bias`` renamed, ``conv1d`` squeezed to 2-D, the V heads of ``in_proj_qkv`` / ``in_proj_z`` /
``in_proj_a`` / ``in_proj_b`` rows and ``out_proj`` columns reordered from grouped to tiled order
(``_LinearAttentionVReorderBase``), RMSNorms ``+1`` except the linear-attention norm, plus the SSM
keys (``ssm.conv_kernel``, ``state_size``, ``group_count``, ``time_step_rank``, ``inner_size``),
the recurrent-layer array and ``rope.dimension_sections``.
"""

from __future__ import annotations

_WHY = (
    "GGUF export of {model_type} is not supported yet: its Gated DeltaNet linear-attention layers "
    "need the converter's tensor transforms (-exp(A_log), conv1d squeeze, V-head reorder), which this export does not do"
)

#: HF ``model_type`` -> the one-line refusal (``{model_type}`` filled in).
REFUSED: dict[str, str] = {"qwen3_5": _WHY, "qwen3_5_text": _WHY}
