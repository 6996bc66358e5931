"""Helpers for the QLoRA tests: bitsandbytes-quantized tiny Llamas, and reference dequantization.

Every reference value is computed with bitsandbytes / transformers / PEFT themselves, from the
tensors of the checkpoints transformers saved, never from lorasave's output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, PreTrainedModel

# Sizes asked for by the QLoRA issue: every quantized Linear has a multiple of 64 elements
# per row, so blocks of 64 never straddle rows (and blocksize 128 still divides them).
Q_CONFIG: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "initializer_range": 0.1,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

# Linear layers of a Llama decoder layer: all of them are quantized by transformers + bnb.
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUANT_STATE_PREFIX = "quant_state.bitsandbytes__"
# Keys bitsandbytes adds next to a quantized ``<m>.weight`` (4-bit) or ``<m>`` (8-bit).
AUX_4BIT = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", QUANT_STATE_PREFIX + "nf4", QUANT_STATE_PREFIX + "fp4")
AUX_8BIT = ("SCB", "weight_format")


def build_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**Q_CONFIG)).eval()


def bnb_4bit(quant_type: str, double_quant: bool, compute_dtype: torch.dtype = torch.float32) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def bnb_8bit() -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_8bit=True)


def exact_cpu_4bit(model: PreTrainedModel) -> PreTrainedModel:
    """Keep bnb's plain CPU path: dequantize_4bit to the quant state's dtype, then a float matmul.

    On CPUs with AVX512-BF16, ``Linear4bit`` in eval mode repacks its weight on the first forward
    with bf16 absmax and a bf16 quant-state dtype (``_convert_weight_packed_for_cpu``), which
    rounds W0 to bf16. The references here need the dequantized weight as the quant state
    defines it, on any CPU, so that repacking is turned off.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def load_quantized(src: Path, config: BitsAndBytesConfig, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """``src`` (a plain checkpoint) loaded by transformers as a bitsandbytes model on CPU."""
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=config, dtype=dtype, device_map="cpu")
    return exact_cpu_4bit(model).eval()


def load_prequantized(src: Path) -> PreTrainedModel:
    """A checkpoint saved already quantized, loaded as such (its config.json has the quant config)."""
    return exact_cpu_4bit(AutoModelForCausalLM.from_pretrained(src, device_map="cpu")).eval()


# ---------------------------------------------------------------------- reading


def quantized_weights(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """``<m>.weight`` -> "4bit" / "8bit" for every quantized weight of a saved checkpoint."""
    out: dict[str, str] = {}
    for key, t in tensors.items():
        if not key.endswith(".weight"):
            continue
        if t.dtype == torch.uint8 and any(k.startswith(key + "." + QUANT_STATE_PREFIX) for k in tensors):
            out[key] = "4bit"
        elif t.dtype == torch.int8 and key[: -len(".weight")] + ".SCB" in tensors:
            out[key] = "8bit"
    return out


def is_aux_key(key: str) -> bool:
    return any(key.endswith("." + s) for s in AUX_4BIT + AUX_8BIT)


def quant_state_4bit(tensors: dict[str, torch.Tensor], weight_key: str) -> Any:
    """The bitsandbytes QuantState of ``weight_key``, rebuilt from the saved keys as transformers does."""
    from bitsandbytes.functional import QuantState

    prefix = weight_key + "."
    qs = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    assert any(k.startswith(QUANT_STATE_PREFIX) for k in qs), f"{weight_key} has no quant state"
    return QuantState.from_dict(qs, device=torch.device("cpu"))


def dequant_fp32(tensors: dict[str, torch.Tensor], weight_key: str) -> torch.Tensor:
    """W0 of a quantized checkpoint as float32, computed by bitsandbytes."""
    import bitsandbytes.functional as F

    w = tensors[weight_key]
    if w.dtype == torch.int8:  # LLM.int8: int8 rows and one float32 scale per row
        out = F.int8_vectorwise_dequant(w, tensors[weight_key[: -len(".weight")] + ".SCB"])
        assert out.dtype == torch.float32
        return out
    state = quant_state_4bit(tensors, weight_key)
    state.dtype = torch.float32  # dequantize straight to float32, whatever dtype was quantized
    out = F.dequantize_4bit(w, state)
    assert out.dtype == torch.float32
    return out


def roundtrip_fp32(w0: torch.Tensor, *, quant_type: str, blocksize: int, double_quant: bool, input_dtype: torch.dtype) -> torch.Tensor:
    """``dequantize_4bit(*quantize_4bit(W0.to(input_dtype)))`` with the dequantized tensor in float32."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(w0.to(input_dtype), blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
    state.dtype = torch.float32
    out = F.dequantize_4bit(packed, state)
    assert out.dtype == torch.float32
    return out


def quant_state_json(t: torch.Tensor) -> Any:
    """The JSON blob bitsandbytes stores as ``...quant_state.bitsandbytes__nf4`` (uint8 bytes)."""
    return json.loads(bytes(t.tolist()).decode("utf-8"))


def quant_config(folder: Path) -> dict[str, Any]:
    cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    qc = cfg.get("quantization_config")
    assert isinstance(qc, dict), f"{folder} has no quantization_config"
    return qc


# ---------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """A quantized copy of the fp32 tiny Llama and the LoRA trained on it."""

    bits: int  # 4 or 8
    quant_type: str = "nf4"  # 4-bit only
    double_quant: bool = True  # 4-bit only
    load_dtype: torch.dtype = torch.float32  # dtype the base was loaded in before quantizing
    compute_dtype: torch.dtype = torch.float32
    lora_alpha: int = 16
    targets: tuple[str, ...] | str = ("q_proj", "k_proj", "v_proj", "down_proj")
    seed: int = 0

    def bnb_config(self) -> BitsAndBytesConfig:
        return bnb_4bit(self.quant_type, self.double_quant, self.compute_dtype) if self.bits == 4 else bnb_8bit()


VARIANTS: dict[str, Variant] = {
    "nf4_dq": Variant(4, "nf4", True, seed=31),
    # 24 / 8 = 3: a scaling that is not a power of two, so float-operation order matters.
    "nf4": Variant(4, "nf4", False, lora_alpha=24, seed=32),
    "fp4_dq": Variant(4, "fp4", True, lora_alpha=24, seed=33),
    "fp4": Variant(4, "fp4", False, seed=34),
    "int8": Variant(8, lora_alpha=24, seed=35),
    # The usual QLoRA recipe: the base loaded in bf16, so bnb quantizes bf16 weights and its
    # quant states say dtype "bfloat16"; every Linear targeted.
    "nf4_dq_bf16": Variant(4, "nf4", True, torch.bfloat16, torch.bfloat16, lora_alpha=24, targets="all-linear", seed=36),
}
