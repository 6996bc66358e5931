"""llama.h and ggml.h as ctypes: the enums, structs and function signatures lorasave uses, of the
pinned runtime's tag (llama.cpp v0.5.0, ``include/llama.h``), copied field by field.

``tests/test_llama_cpp.py`` checks the struct sizes against a C compiler's. :mod:`lorasave.runtimes.llama_cpp.lib`
loads the libraries and binds :data:`LLAMA_FUNCS` on them.
"""

from __future__ import annotations

import ctypes
import enum
from ctypes import POINTER, c_bool, c_char_p, c_float, c_int, c_int8, c_int32, c_size_t, c_uint32, c_void_p
from typing import Any

llama_token = c_int32
llama_pos = c_int32
llama_seq_id = c_int32
_enum = c_int  # C enums of llama.h / ggml.h: int-sized on x86_64 (gcc)

# typedef bool (*llama_progress_callback)(float progress, void * user_data);
llama_progress_callback = ctypes.CFUNCTYPE(c_bool, c_float, c_void_p)
# typedef bool (*ggml_backend_sched_eval_callback)(struct ggml_tensor * t, bool ask, void * user_data);
ggml_backend_sched_eval_callback = ctypes.CFUNCTYPE(c_bool, c_void_p, c_bool, c_void_p)
# typedef bool (*ggml_abort_callback)(void * data);
ggml_abort_callback = ctypes.CFUNCTYPE(c_bool, c_void_p)
# typedef void (*ggml_log_callback)(enum ggml_log_level level, const char * text, void * user_data);
ggml_log_callback = ctypes.CFUNCTYPE(None, _enum, c_char_p, c_void_p)


class GgmlType(enum.IntEnum):
    """``enum ggml_type`` (ggml.h), the members used here."""

    F32 = 0
    F16 = 1
    Q4_K = 12
    Q6_K = 14
    COUNT = 43


class GgmlLogLevel(enum.IntEnum):
    """``enum ggml_log_level`` (ggml.h)."""

    NONE = 0
    DEBUG = 1
    INFO = 2
    WARN = 3
    ERROR = 4
    CONT = 5


class LlamaFlashAttnType(enum.IntEnum):
    """``enum llama_flash_attn_type`` (llama.h)."""

    AUTO = -1
    DISABLED = 0
    ENABLED = 1


class LlamaFtype(enum.IntEnum):
    """``enum llama_ftype`` (llama.h): the model file types ``llama_model_quantize`` produces."""

    ALL_F32 = 0
    MOSTLY_F16 = 1
    MOSTLY_Q4_0 = 2
    MOSTLY_Q4_1 = 3
    MOSTLY_Q8_0 = 7
    MOSTLY_Q5_0 = 8
    MOSTLY_Q5_1 = 9
    MOSTLY_Q2_K = 10
    MOSTLY_Q3_K_S = 11
    MOSTLY_Q3_K_M = 12
    MOSTLY_Q3_K_L = 13
    MOSTLY_Q4_K_S = 14
    MOSTLY_Q4_K_M = 15
    MOSTLY_Q5_K_S = 16
    MOSTLY_Q5_K_M = 17
    MOSTLY_Q6_K = 18
    MOSTLY_IQ2_XXS = 19
    MOSTLY_IQ2_XS = 20
    MOSTLY_Q2_K_S = 21
    MOSTLY_IQ3_XS = 22
    MOSTLY_IQ3_XXS = 23
    MOSTLY_IQ1_S = 24
    MOSTLY_IQ4_NL = 25
    MOSTLY_IQ3_S = 26
    MOSTLY_IQ3_M = 27
    MOSTLY_IQ2_S = 28
    MOSTLY_IQ2_M = 29
    MOSTLY_IQ4_XS = 30
    MOSTLY_IQ1_M = 31
    MOSTLY_BF16 = 32
    MOSTLY_TQ1_0 = 36
    MOSTLY_TQ2_0 = 37
    MOSTLY_MXFP4_MOE = 38
    MOSTLY_NVFP4 = 39
    MOSTLY_Q1_0 = 40
    MOSTLY_Q2_0 = 41


# llama-quantize's type names (tools/quantize/quantize.cpp QUANT_OPTIONS, lower case, aliases included).
QUANT_TYPES: dict[str, LlamaFtype] = {
    "q1_0": LlamaFtype.MOSTLY_Q1_0,
    "q2_0": LlamaFtype.MOSTLY_Q2_0,
    "q4_0": LlamaFtype.MOSTLY_Q4_0,
    "q4_1": LlamaFtype.MOSTLY_Q4_1,
    "mxfp4_moe": LlamaFtype.MOSTLY_MXFP4_MOE,
    "q5_0": LlamaFtype.MOSTLY_Q5_0,
    "q5_1": LlamaFtype.MOSTLY_Q5_1,
    "iq2_xxs": LlamaFtype.MOSTLY_IQ2_XXS,
    "iq2_xs": LlamaFtype.MOSTLY_IQ2_XS,
    "iq2_s": LlamaFtype.MOSTLY_IQ2_S,
    "iq2_m": LlamaFtype.MOSTLY_IQ2_M,
    "iq1_s": LlamaFtype.MOSTLY_IQ1_S,
    "iq1_m": LlamaFtype.MOSTLY_IQ1_M,
    "tq1_0": LlamaFtype.MOSTLY_TQ1_0,
    "tq2_0": LlamaFtype.MOSTLY_TQ2_0,
    "q2_k": LlamaFtype.MOSTLY_Q2_K,
    "q2_k_s": LlamaFtype.MOSTLY_Q2_K_S,
    "iq3_xxs": LlamaFtype.MOSTLY_IQ3_XXS,
    "iq3_s": LlamaFtype.MOSTLY_IQ3_S,
    "iq3_m": LlamaFtype.MOSTLY_IQ3_M,
    "q3_k": LlamaFtype.MOSTLY_Q3_K_M,
    "iq3_xs": LlamaFtype.MOSTLY_IQ3_XS,
    "q3_k_s": LlamaFtype.MOSTLY_Q3_K_S,
    "q3_k_m": LlamaFtype.MOSTLY_Q3_K_M,
    "q3_k_l": LlamaFtype.MOSTLY_Q3_K_L,
    "iq4_nl": LlamaFtype.MOSTLY_IQ4_NL,
    "iq4_xs": LlamaFtype.MOSTLY_IQ4_XS,
    "q4_k": LlamaFtype.MOSTLY_Q4_K_M,
    "q4_k_s": LlamaFtype.MOSTLY_Q4_K_S,
    "q4_k_m": LlamaFtype.MOSTLY_Q4_K_M,
    "q5_k": LlamaFtype.MOSTLY_Q5_K_M,
    "q5_k_s": LlamaFtype.MOSTLY_Q5_K_S,
    "q5_k_m": LlamaFtype.MOSTLY_Q5_K_M,
    "q6_k": LlamaFtype.MOSTLY_Q6_K,
    "q8_0": LlamaFtype.MOSTLY_Q8_0,
    "f16": LlamaFtype.MOSTLY_F16,
    "bf16": LlamaFtype.MOSTLY_BF16,
    "f32": LlamaFtype.ALL_F32,
}


def _fields(ctype: Any, *names: str) -> list[tuple[str, Any]]:
    """``_fields_`` entries of consecutive struct fields of one C type, in order (as ``bool a, b, c;``)."""
    return [(name, ctype) for name in names]


class llama_model_params(ctypes.Structure):
    """``struct llama_model_params`` (llama.h)."""

    _fields_ = [
        *_fields(c_void_p, "devices", "tensor_buft_overrides"),  # ggml_backend_dev_t *, const struct llama_model_tensor_buft_override *
        ("n_gpu_layers", c_int32),
        *_fields(_enum, "split_mode", "load_mode", "lazy_mode"),  # enum llama_split_mode, llama_load_mode, llama_lazy_mode
        ("main_gpu", c_int32),
        ("tensor_split", POINTER(c_float)),
        ("progress_callback", llama_progress_callback),
        *_fields(c_void_p, "progress_callback_user_data", "kv_overrides"),  # kv_overrides: const struct llama_model_kv_override *
        *_fields(c_bool, "vocab_only", "check_tensors", "use_extra_bufts", "no_host", "no_alloc", "load_mtp"),
    ]


class llama_context_params(ctypes.Structure):
    """``struct llama_context_params`` (llama.h)."""

    _fields_ = [
        *_fields(c_uint32, "n_ctx", "n_batch", "n_ubatch", "n_seq_max", "n_rs_seq", "n_outputs_max", "n_outputs_max_per_seq"),
        *_fields(c_int32, "n_threads", "n_threads_batch"),
        # enum llama_context_type, llama_rope_scaling_type, llama_pooling_type, llama_attention_type, llama_flash_attn_type
        *_fields(_enum, "ctx_type", "rope_scaling_type", "pooling_type", "attention_type", "flash_attn_type"),
        *_fields(c_float, "rope_freq_base", "rope_freq_scale", "yarn_ext_factor", "yarn_attn_factor", "yarn_beta_fast", "yarn_beta_slow"),
        ("yarn_orig_ctx", c_uint32),
        ("defrag_thold", c_float),
        ("cb_eval", ggml_backend_sched_eval_callback),
        ("cb_eval_user_data", c_void_p),
        *_fields(_enum, "type_k", "type_v"),  # enum ggml_type
        ("abort_callback", ggml_abort_callback),
        ("abort_callback_data", c_void_p),
        *_fields(c_bool, "embeddings", "offload_kqv", "no_perf", "op_offload", "swa_full", "kv_unified"),
        ("samplers", c_void_p),  # struct llama_sampler_seq_config *
        ("n_samplers", c_size_t),
        ("ctx_other", c_void_p),  # struct llama_context *
    ]


class llama_batch(ctypes.Structure):
    """``struct llama_batch`` (llama.h); every array has ``n_tokens`` entries."""

    _fields_ = [
        ("n_tokens", c_int32),
        ("token", POINTER(llama_token)),
        ("embd", POINTER(c_float)),
        ("pos", POINTER(llama_pos)),
        ("n_seq_id", POINTER(c_int32)),
        ("seq_id", POINTER(POINTER(llama_seq_id))),
        ("logits", POINTER(c_int8)),  # output flags
    ]


class llama_model_imatrix_data(ctypes.Structure):
    """``struct llama_model_imatrix_data`` (llama.h): one weight's importance; an array of them ends with a NULL name."""

    _fields_ = [("name", c_char_p), ("data", POINTER(c_float)), ("size", c_size_t)]


class llama_model_quantize_params(ctypes.Structure):
    """``struct llama_model_quantize_params`` (llama.h)."""

    _fields_ = [
        ("nthread", c_int32),
        *_fields(_enum, "ftype", "output_tensor_type", "token_embedding_type"),  # enum llama_ftype, ggml_type, ggml_type
        *_fields(c_bool, "allow_requantize", "quantize_output_tensor", "only_copy", "pure", "keep_split", "dry_run"),
        # const struct llama_model_imatrix_data *, llama_model_kv_override *, llama_model_tensor_override *
        *_fields(c_void_p, "imatrix", "kv_overrides", "tt_overrides"),
        ("prune_layers", POINTER(c_int32)),
        ("max_buf_size", c_size_t),
    ]


# name: (restype, argtypes), as declared in llama.h / ggml-backend.h
LLAMA_FUNCS: dict[str, tuple[Any, list[Any]]] = {
    "llama_backend_init": (None, []),
    "llama_log_set": (None, [ggml_log_callback, c_void_p]),
    "llama_model_default_params": (llama_model_params, []),
    "llama_context_default_params": (llama_context_params, []),
    "llama_model_quantize_default_params": (llama_model_quantize_params, []),
    "llama_model_load_from_file": (c_void_p, [c_char_p, llama_model_params]),
    "llama_model_free": (None, [c_void_p]),
    "llama_init_from_model": (c_void_p, [c_void_p, llama_context_params]),
    "llama_free": (None, [c_void_p]),
    "llama_model_get_vocab": (c_void_p, [c_void_p]),
    "llama_vocab_n_tokens": (c_int32, [c_void_p]),
    "llama_n_ctx": (c_uint32, [c_void_p]),
    "llama_n_batch": (c_uint32, [c_void_p]),
    "llama_tokenize": (c_int32, [c_void_p, c_char_p, c_int32, POINTER(llama_token), c_int32, c_bool, c_bool]),
    "llama_batch_init": (llama_batch, [c_int32, c_int32, c_int32]),
    "llama_batch_free": (None, [llama_batch]),
    "llama_decode": (c_int32, [c_void_p, llama_batch]),
    "llama_get_logits_ith": (POINTER(c_float), [c_void_p, c_int32]),
    "llama_get_memory": (c_void_p, [c_void_p]),
    "llama_memory_clear": (None, [c_void_p, c_bool]),
    "llama_adapter_lora_init": (c_void_p, [c_void_p, c_char_p]),
    "llama_adapter_lora_free": (None, [c_void_p]),
    "llama_set_adapters_lora": (c_int32, [c_void_p, POINTER(c_void_p), c_size_t, POINTER(c_float)]),
    "llama_model_quantize": (c_uint32, [c_char_p, c_char_p, POINTER(llama_model_quantize_params)]),
}
