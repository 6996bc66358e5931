"""Unsloth's saving names and arguments on a live PeftModel, written by lorasave.

A training script that ends with Unsloth's calls switches with one line, ``lorasave.attach(model)``::

    lorasave.attach(model)                                          # a peft.PeftModel
    model.save_pretrained_merged("out", tokenizer, save_method="merged_16bit")   # or "lora", "merged_4bit", "fp8"...
    model.push_to_hub_merged("me/out", tokenizer, save_method="lora", token=token)
    model.save_pretrained_gguf("out", tokenizer, quantization_method=["q4_k_m", "q8_0"])
    model.push_to_hub_gguf("me/out-GGUF", tokenizer, quantization_method="quantized", token=token)
    model.save_pretrained_ggml("out-lora", tokenizer)                # a GGUF LoRA adapter
    model.push_to_hub_ggml(tokenizer, "me/out-lora-GGUF", token=token)

The same are functions taking the model first (``lorasave.save_pretrained_gguf(model, "out", tokenizer)``).
Every output streams from the model in memory (``sources.live``, ``sources.live_gguf``), leaves it
unchanged and trainable, and is byte for byte what ``lorasave.merge`` / ``export_gguf`` /
``export_gguf_adapter`` write from the base folder and the adapter PEFT saves.

Values: ``save_method`` is one of :data:`SAVE_METHODS` or an Unsloth name for one
(:data:`SAVE_METHOD_ALIASES`); ``quantization_method`` a GGUF type or a list of them, written from one
read of the model (``export_gguf``'s ``type`` list), with Unsloth's aliases ``not_quantized`` (the base's
16-bit type: ``bf16`` when its dtype is bfloat16, else ``f16``, as Unsloth's ``save_to_gguf`` picks),
``fast_quantized`` (``q8_0``), ``quantized`` (``q4_k_m``), ``q2_k_l`` (``q2_k`` with Q8_0 output and token
embedding) and ``None`` (``q8_0``). Anything else raises one :class:`InvalidChoiceError` listing every
valid value. Unsloth's arguments lorasave does not need (:data:`NOT_NEEDED`: ``maximum_memory_usage``,
``temporary_location``, ``first_conversion``...) are accepted and ignored, with one log line naming
them; an argument neither takes raises :class:`UnknownArgumentError` listing those accepted. Unsloth's
other names (``save_pretrained_torchao``) raise :class:`NotOfferedError`, an AttributeError saying what
to use instead.

Pushes go through ``lorasave.push`` (``hub.push``): the output is written into a temporary folder
(or ``save_directory=`` when given, kept), checked and uploaded, then the temporary folder is removed.
The push checks (repo id, token, offline mode) run before the save. The token (``token=``, else
``HF_TOKEN``, else ``hf auth login``'s) is handed to huggingface_hub only: never printed, logged or
written.
"""

from __future__ import annotations

from lorasave.unsloth.attach import attach
from lorasave.unsloth.calls import (
    push_to_hub_ggml,
    push_to_hub_gguf,
    push_to_hub_merged,
    save_pretrained_ggml,
    save_pretrained_gguf,
    save_pretrained_merged,
)
from lorasave.unsloth.push import SavedAndPushed
from lorasave.unsloth.values import (
    GGML_TYPES,
    METHODS,
    NOT_NEEDED,
    NOT_OFFERED,
    SAVE_METHOD_ALIASES,
    SAVE_METHODS,
    gguf_types,
    not_offered,
    save_method_of,
    sixteen_bit_type,
)

__all__ = [
    "GGML_TYPES",
    "METHODS",
    "NOT_NEEDED",
    "NOT_OFFERED",
    "SAVE_METHODS",
    "SAVE_METHOD_ALIASES",
    "SavedAndPushed",
    "attach",
    "gguf_types",
    "not_offered",
    "push_to_hub_ggml",
    "push_to_hub_gguf",
    "push_to_hub_merged",
    "save_method_of",
    "save_pretrained_ggml",
    "save_pretrained_gguf",
    "save_pretrained_merged",
    "sixteen_bit_type",
]
