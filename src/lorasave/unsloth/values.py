"""The values of Unsloth's saving arguments: what each means in lorasave, and the one error for the rest.

``save_method`` (:data:`SAVE_METHODS`, :data:`SAVE_METHOD_ALIASES`), ``quantization_method`` (:func:`gguf_types`),
``outtype`` (:data:`GGML_TYPES`), the arguments lorasave does not need (:data:`NOT_NEEDED`) and Unsloth's names
it does not offer (:data:`NOT_OFFERED`). Aliases are read from Unsloth's ``unsloth/save.py``
(``COMPRESSED_EXPORT_SCHEMES``, ``ALLOWED_QUANTS``, ``save_to_gguf``, ``_gguf_source_dtype``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lorasave.errors import InvalidChoiceError, InvalidOptionError, NotOfferedError, UnknownArgumentError

logger = logging.getLogger(__name__)

SAVE_METHODS: tuple[str, ...] = (
    "lora",
    "merged_16bit",
    "merged_4bit",
    "fp8_dynamic",
    "fp8_block",
    "w8a16",
    "w4a16",
    "w8a8",
    "nvfp4a16",
    "mxfp4a16",
    "mxfp4",
)

#: Unsloth's other names for them (``unsloth/save.py``'s ``COMPRESSED_EXPORT_SCHEMES`` rows lorasave writes,
#: and ``merged_4bit_forced``, which Unsloth asks for instead of ``merged_4bit``).
SAVE_METHOD_ALIASES: dict[str, str] = {
    "merged_4bit_forced": "merged_4bit",
    "fp8": "fp8_dynamic",
    "dynamic_fp8": "fp8_dynamic",
    "w8a8_fp8": "fp8_dynamic",
    "block_fp8": "fp8_block",
    "int8": "w8a8",
    "w8a8_int8": "w8a8",
    "int8_weight": "w8a16",
    "int4": "w4a16",
    "int4_weight": "w4a16",
    "w4a16_nvfp4": "nvfp4a16",
    "w4a16_mxfp4": "mxfp4a16",
}

#: Unsloth ``save_method`` values lorasave does not write, and why (in the error).
SAVE_METHODS_REFUSED: dict[str, str] = {
    **dict.fromkeys(("fp8_static", "static_fp8", "nvfp4", "w4a4_nvfp4"), "its activation scales need calibration data; lorasave's presets are data-free"),
    **dict.fromkeys(("mxfp8", "w8a8_mxfp8", "w4a4_mxfp4", "w4a16_asym", "w4a8", "w4afp8"), "not one of lorasave's compressed-tensors presets"),
    **dict.fromkeys(
        ("torchao_fp8", "torchao_int8", "portable_fp8", "portable_int8"),
        "lorasave writes no torchao checkpoint (fp8_dynamic and w8a8 are the compressed-tensors equivalents)",
    ),
}

#: Unsloth ``quantization_method`` values lorasave does not write, and why (in the error).
QUANTIZATION_REFUSED: dict[str, str] = {"q3_k_xs": "llama.cpp v0.5.0 has no Q3_K_XS type: iq3_xs or q3_k_s are the nearest"}

#: ``quantization_method`` aliases fixed by name (``not_quantized`` depends on the base: :func:`gguf_types`).
QUANTIZATION_ALIASES: dict[str, str] = {"fast_quantized": "q8_0", "quantized": "q4_k_m"}

#: ``save_pretrained_ggml`` / ``push_to_hub_ggml`` ``outtype`` values (``convert_lora_to_gguf.py``'s).
GGML_TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0")

#: Unsloth's arguments lorasave accepts and does not need, and why.
NOT_NEEDED: dict[str, str] = {
    "maximum_memory_usage": "lorasave streams one tensor at a time, so memory does not grow with the model",
    "temporary_location": "nothing is staged outside the output's own temporary folder",
    "use_temp_dir": "a push always stages in a temporary folder unless save_directory= is given",
    "first_conversion": "every GGUF type is written from the float32 merge in one pass, with no intermediate file",
    "merge_is_disposable": "no intermediate merged checkpoint is written",
    "is_main_process": "call it on one process",
    "save_function": "lorasave writes safetensors itself",
    "safe_serialization": "lorasave always writes safetensors",
    "save_peft_format": "save_method='lora' writes PEFT's own format",
    "variant": "file names follow transformers' defaults",
    "tags": "the model card is lorasave's",
    "datasets": "the model card is lorasave's",
    "commit_description": "lorasave's commit description lists what was pushed",
    "num_calibration_samples": "lorasave's compressed-tensors presets are data-free",
    "max_seq_length": "lorasave's compressed-tensors presets are data-free",
    "save_method": "a GGUF file is always a merge (save_pretrained_ggml writes the adapter)",
    "max_shard_size": "a GGUF file is one file",
    "state_dict": "lorasave reads the model's own tensors (only None is accepted)",
    "calibration_dataset": "lorasave's compressed-tensors presets are data-free (only None is accepted)",
}

#: Of :data:`NOT_NEEDED`, those whose only accepted value is None (any other would be silently dropped).
_ONLY_NONE = ("state_dict", "calibration_dataset")

#: Unsloth's per-function argument names beyond those each function declares.
MERGED_EXTRA = (
    "is_main_process",
    "state_dict",
    "save_function",
    "safe_serialization",
    "variant",
    "save_peft_format",
    "tags",
    "temporary_location",
    "maximum_memory_usage",
    "datasets",
    "calibration_dataset",
    "num_calibration_samples",
    "max_seq_length",
    "use_temp_dir",
    "commit_description",
)
GGUF_EXTRA = (*MERGED_EXTRA, "first_conversion", "merge_is_disposable", "save_method", "max_shard_size")

#: Unsloth's names lorasave does not offer, and what to use instead.
NOT_OFFERED: dict[str, str] = {
    "save_pretrained_torchao": (
        "lorasave writes no torchao checkpoint; for vLLM / SGLang use save_pretrained_merged(save_directory, tokenizer, "
        "save_method='fp8_dynamic') (or 'w8a8', 'w4a16', 'fp8_block'...: compressed-tensors checkpoints vLLM loads)"
    ),
    "push_to_hub_torchao": (
        "lorasave writes no torchao checkpoint; use push_to_hub_merged(repo_id, tokenizer, save_method='fp8_dynamic') (or 'w8a8', 'w4a16'...)"
    ),
    "save_to_gguf": (
        "use save_pretrained_gguf(model, save_directory, tokenizer, quantization_method=...), "
        "or lorasave.export_gguf(base, adapter, out, type=...) from folders"
    ),
}

#: The names :func:`attach` binds.
METHODS = ("save_pretrained_merged", "push_to_hub_merged", "save_pretrained_gguf", "push_to_hub_gguf", "save_pretrained_ggml", "push_to_hub_ggml")


def not_offered(name: str) -> NotOfferedError:
    """The error for one of Unsloth's names in :data:`NOT_OFFERED`."""
    return NotOfferedError(f"{name} is an Unsloth name lorasave does not offer: {NOT_OFFERED[name]}", attribute=name, instead=NOT_OFFERED[name])


# ----------------------------------------------------------------------------- values


def _key(value: object) -> str:
    """Unsloth's spelling rule: case, spaces and dashes do not matter (``_normalize_compressed_method``)."""
    return str(value).strip().lower().replace("-", "_").replace(" ", "_")


def save_method_of(value: object) -> str:
    """A ``save_method`` (or Unsloth's name for one) -> lorasave's name, one of :data:`SAVE_METHODS`.

    Raises:
        InvalidChoiceError: any other value; the message lists every valid one, ``"lora"`` first.
    """
    key = _key(value)
    if key in SAVE_METHODS:
        return key
    if key in SAVE_METHOD_ALIASES:
        return SAVE_METHOD_ALIASES[key]
    why = SAVE_METHODS_REFUSED.get(key)
    aliases = ", ".join(f"{a} = {m}" for a, m in SAVE_METHOD_ALIASES.items())
    raise InvalidChoiceError(
        f"save_method {value!r} is not one lorasave writes{f' ({why})' if why else ''}; use one of {', '.join(SAVE_METHODS)} "
        f"(Unsloth's names accepted too: {aliases})",
        option="save_method",
        value=value,
        choices=[*SAVE_METHODS, *SAVE_METHOD_ALIASES],
    )


def sixteen_bit_type(model: Any) -> str:
    """``not_quantized``: ``"bf16"`` when the base's dtype is bfloat16, else ``"f16"`` (Unsloth's ``_gguf_source_dtype``;
    Unsloth also drops to f16 on a GPU without bfloat16, which writing a file does not need)."""
    config = model.get_base_model().config if hasattr(model, "get_base_model") else getattr(model, "config", None)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return "bf16" if str(dtype).removeprefix("torch.") == "bfloat16" else "f16"


@dataclass(frozen=True)
class GgufTypes:
    """A ``quantization_method`` resolved: ``export_gguf``'s ``type`` list and the llama-quantize overrides ``q2_k_l`` sets."""

    types: list[str]
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None


def gguf_types(quantization_method: object, sixteen_bit: str) -> GgufTypes:
    """``quantization_method`` (a name, None, or a list or tuple of them) -> the GGUF types, in order, each once.

    Raises:
        InvalidChoiceError: a value that is no GGUF type lorasave writes (all of them named, with every valid value),
            an empty list, or ``q2_k_l`` together with other types.
    """
    from lorasave.formats.gguf.quant import ALIASES, NOT_OFFERED, GgufType

    items = list(quantization_method) if isinstance(quantization_method, (list, tuple)) else [quantization_method]
    choices = ["not_quantized", "fast_quantized", "quantized", "q2_k_l", *(t.value for t in GgufType), *ALIASES]
    types: list[str] = []
    bad: list[object] = []
    q2_k_l = False
    for item in items:
        key = "q8_0" if item is None else _key(item)
        if key == "not_quantized":
            key = sixteen_bit
        key = QUANTIZATION_ALIASES.get(key, key)
        if key == "q2_k_l":
            q2_k_l, key = True, "q2_k"
        try:
            name = GgufType.parse(key).value
        except ValueError:
            bad.append(item)
            continue
        if name not in types:
            types.append(name)
    if bad or not types or (q2_k_l and len(types) > 1):
        if bad:
            reasons = {**NOT_OFFERED, **QUANTIZATION_REFUSED}
            why = "; ".join(f"{b}: {reasons[_key(b)]}" for b in bad if _key(b) in reasons)
            what = f"quantization_method {', '.join(repr(b) for b in bad)}: not a GGUF type lorasave writes{f' ({why})' if why else ''}"
        elif not types:
            what = "quantization_method is an empty list"
        else:
            what = (
                "quantization_method 'q2_k_l' sets llama-quantize's --output-tensor-type/--token-embedding-type q8_0 for the whole call: "
                "save it in a call of its own"
            )
        raise InvalidChoiceError(
            f"{what}; use one of {', '.join(choices)}, or a list of them (not_quantized = {sixteen_bit} for this model, "
            "fast_quantized = q8_0, quantized = q4_k_m, q2_k_l = q2_k with Q8_0 output and token embedding)",
            option="quantization_method",
            value=quantization_method,
            choices=choices,
        )
    if q2_k_l:
        return GgufTypes(types, "q8_0", "q8_0")
    return GgufTypes(types)


def ggml_type_of(outtype: object) -> str:
    """``outtype`` of ``save_pretrained_ggml`` -> one of :data:`GGML_TYPES`.

    Raises:
        InvalidChoiceError: any other value.
    """
    key = _key(outtype)
    if key in GGML_TYPES:
        return key
    raise InvalidChoiceError(
        f"outtype {outtype!r} is not a GGUF LoRA adapter type; use one of {', '.join(GGML_TYPES)} (convert_lora_to_gguf.py's)",
        option="outtype",
        value=outtype,
        choices=list(GGML_TYPES),
    )


def take_unsloth_kwargs(caller: str, kwargs: dict[str, Any], allowed: Sequence[str], declared: Sequence[str]) -> None:
    """Check Unsloth's extra arguments ``kwargs`` of ``caller`` and log the ones it ignores.

    Raises:
        UnknownArgumentError: a keyword that is neither declared nor one of Unsloth's for ``caller`` (``allowed``).
        InvalidOptionError: ``state_dict`` or ``calibration_dataset`` other than None.
    """
    for name in kwargs:
        if name not in allowed:
            accepted = sorted({*declared, *allowed})
            raise UnknownArgumentError(
                f"{caller}() got an unexpected keyword argument {name!r}; it accepts {', '.join(accepted)}", argument=name, accepted=accepted
            )
    for name in _ONLY_NONE:
        if kwargs.get(name) is not None:
            raise InvalidOptionError(f"{caller}({name}=...) is not supported: {NOT_NEEDED[name]}; nothing was written")
    if kwargs:
        logger.info("%s: not needed by lorasave: %s", caller, "; ".join(f"{n} ({NOT_NEEDED[n]})" for n in kwargs))
