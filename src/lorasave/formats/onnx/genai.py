"""``genai_config.json``: what onnxruntime-genai needs to run the exported graph with its generator.

The layout is the one onnxruntime-genai's model builder writes (``make_genai_config`` in
``onnxruntime_genai/models/builders/base.py``, 0.18): the decoder's file, sizes and input/output
names, the special token ids, and greedy search defaults from ``generation_config.json``. The graph
keeps every layer's whole cache and masks sliding-window layers itself, so no ``sliding_window``
section is written and ``past_present_share_buffer`` is false (each step's ``present.*`` becomes
the next step's ``past_key_values.*``, as with optimum).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorasave.formats.onnx.output import ONNX_NAME
from lorasave.formats.onnx.spec import DecoderSpec
from lorasave.util.jsonio import read_json

GENAI_CONFIG = "genai_config.json"


def _ids(value: Any) -> int | list[int] | None:
    if value is None:
        return None
    if isinstance(value, list):
        return [int(v) for v in value] if len(value) != 1 else int(value[0])
    return int(value)


def genai_config(spec: DecoderSpec, config: dict[str, Any], generation: dict[str, Any]) -> dict[str, Any]:
    """The ``genai_config.json`` document (token ids: ``generation_config.json`` first, then ``config.json``)."""

    def pick(key: str) -> Any:
        value = generation.get(key)
        return value if value is not None else config.get(key)

    eos = _ids(pick("eos_token_id"))
    pad = _ids(pick("pad_token_id"))
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    context = spec.context_length or 4096
    return {
        "model": {
            "bos_token_id": _ids(pick("bos_token_id")),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": ONNX_NAME,
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
                "num_attention_heads": spec.n_heads,
                "num_hidden_layers": spec.n_layers,
                "num_key_value_heads": spec.n_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": spec.model_type,  # the builder: the architecture class before "For", gemma3_text for Gemma 3 text
            "vocab_size": spec.vocab,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": bool(generation.get("do_sample", False)),
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": float(generation.get("repetition_penalty") or 1.0),
            "temperature": float(generation.get("temperature") or 1.0),
            "top_k": int(generation.get("top_k") or 50),
            "top_p": float(generation.get("top_p") or 1.0),
        },
    }


def write_genai_config(folder: Path, spec: DecoderSpec, config: dict[str, Any]) -> Path:
    """Write ``folder/genai_config.json`` (after ``generation_config.json`` was carried there); returns its path."""
    gen_path = folder / "generation_config.json"
    generation = read_json(gen_path) if gen_path.is_file() else {}
    doc = genai_config(spec, config, generation)
    path = folder / GENAI_CONFIG
    path.write_text(json.dumps(doc, indent=4) + "\n", encoding="utf-8")
    return path
