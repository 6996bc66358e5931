"""The cases of ``scripts/gguf_equivalence.py``: tiny models of every native GGUF architecture, as data.

:func:`default_cases` lists one case per ``model_type`` of ``lorasave.formats.gguf.arch.ARCHITECTURES`` (so an
architecture added there is picked up) and the SentencePiece variants of :data:`EXTRA_CASES`; :func:`build_case` builds
one: a tiny base from transformers' default config of that type with :data:`TINY`'s sizes and the per-type
:data:`OVERRIDES`, its tokenizer, and a LoRA on every linear layer trained a few steps.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def tiny_bpe(vocab_size: int, specials: tuple[str, ...] = ("<|endoftext|>",)) -> Any:
    """A byte-level BPE tokenizer trained on a sentence (its hash is unknown to the converter), ``specials`` first."""
    import _models

    return _models.build_byte_bpe_tokenizer("LoRA adapts a frozen model by adding a low-rank update to some of its weight matrices. " * 4, vocab_size, specials)


def tiny_spm(out: Path, vocab_size: int) -> None:
    """A SentencePiece BPE ``tokenizer.model`` (+ config naming ``LlamaTokenizer``) trained on a sentence."""
    import io

    import sentencepiece as spm

    text = "LoRA adapts a frozen model by adding a low-rank update to some of its weight matrices."
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([text, text.upper(), text.lower()] * 4),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        hard_vocab_limit=False,
        minloglevel=2,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


#: Sizes every tiny model gets, for the keys its default config has (its ``text_config`` and
#: ``vision_config`` too): small, with the real models' relations kept where a key says so (head_dim
#: 16 with 4 heads over hidden 64; 4 experts, top-2; MLA ranks below hidden). ``vocab_size`` and
#: ``vocab_size_per_layer_input`` (Gemma 4's per-layer embeddings: llama.cpp loads them with the token
#: vocabulary's rows, as E2B's 262144 = 262144 does) become the tokenizer's size.
TINY: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "initializer_range": 0.1,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "kv_lora_rank": 32,
    "q_lora_rank": 48,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "sliding_window": 16,
    "query_pre_attn_scalar": 16,
    "hidden_size_per_layer_input": 16,
    # vision towers
    "depth": 1,
    "out_hidden_size": 64,
    "image_size": 32,
    "patch_size": 8,
}
QWEN35: dict[str, Any] = {
    "num_hidden_layers": 4,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25, "mrope_section": [1, 1, 0], "mrope_interleaved": True},
}
LLAMA4_ROPE = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0}
LLAMA4_ROPE["original_max_position_embeddings"] = 8192
LLAMA4: dict[str, Any] = {
    **{"num_hidden_layers": 4, "interleave_moe_layer_step": 2, "intermediate_size_mlp": 192, "rope_parameters": LLAMA4_ROPE},
    **{"no_rope_layers": None, "moe_layers": None},  # regenerated for the new layer count
}
#: A tiny Llama 4 vision tower (its projector sizes are not among :data:`TINY`'s keys).
LLAMA4_VISION: dict[str, Any] = {
    **{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
    **{"vision_output_dim": 32, "projector_input_dim": 32, "projector_output_dim": 32},
}
#: Gemma 4 E2B's relations (tests/test_gguf_arch_gemma.py): 4 layers sliding / global alternating, the
#: global head twice the sliding one (E2B's ``per_layer_config``), proportional RoPE on global layers (the
#: default's), the last half sharing KV with a double-wide MLP, per-layer inputs, a final softcap that bites.
GEMMA4_PER_LAYER = {"1": {"head_dim": 32}, "3": {"head_dim": 32}}
GEMMA4: dict[str, Any] = {
    **{"num_hidden_layers": 4, "layer_types": ["sliding_attention", "full_attention"] * 2, "per_layer_config": GEMMA4_PER_LAYER},
    **{"intermediate_size": 128, "sliding_window": 8, "num_kv_shared_layers": 2, "use_double_wide_mlp": True},
    **{"hidden_size_per_layer_input": 8, "final_logit_softcapping": 8.0, "max_position_embeddings": 256},
}
#: A one-layer Gemma 4 vision tower (no audio tower), and the multimodal token ids inside the vocabulary
#: (a callable gets the vocabulary size: the last 7 ids, as the test's checkpoint has them).
GEMMA4_VISION: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}
GEMMA4_VISION["head_dim"] = 16
GEMMA4_IDS = ("boi_token_id", "eoi_token_id", "image_token_id", "video_token_id", "boa_token_id", "eoa_token_index", "audio_token_id")
DEEPSEEK_YARN = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0}
#: Per ``model_type`` changes to the tiny config (after :data:`TINY`; into its ``text_config`` too). A
#: callable value is called with the vocabulary size.
OVERRIDES: dict[str, dict[str, Any]] = {
    "gemma4_text": GEMMA4,
    "gemma4": {**GEMMA4, "vision_config": GEMMA4_VISION, "audio_config": None, **{k: (lambda n, i=i: n - 1 - i) for i, k in enumerate(GEMMA4_IDS)}},
    "mistral": {"sliding_window": None},
    "mistral3": {"sliding_window": None},
    "ministral3": {"sliding_window": None},
    "phi3": {"pad_token_id": None},
    "qwen3_moe": {"norm_topk_prob": True},
    # Llama 4: 4 layers (RoPE skipped on layer 3), MoE every 2nd layer (Maverick), Scout's llama3 RoPE, dense MLP 2x the expert's
    "llama4_text": LLAMA4,
    "llama4": {**LLAMA4, "vision_config": LLAMA4_VISION},
    # mrope_section sums to head_dim / 2 (16 / 2), as [16, 24, 24] does for Qwen2.5-VL's 128
    "qwen2_5_vl": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}},
    "qwen3_vl": {"rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2], "mrope_interleaved": True}},
    # Qwen3.5: 4 layers (3 linear attention, 1 full); twice as many linear value heads as key heads (32 / 16),
    # head size hidden / value heads; a quarter of head_dim rotated, mrope_section summing to its half ([11, 11, 10])
    **dict.fromkeys(("qwen3_5_text", "qwen3_5", "qwen3_5_moe_text", "qwen3_5_moe"), QWEN35),
    # MLA needs one K/V head per head; one leading dense layer; 4 experts in 2 groups, 1 kept; DeepSeek-V3's
    # config.json names its sigmoid gating (scoring_func), and its YaRN has mscale = mscale_all_dim
    "deepseek_v3": {
        **{
            "num_key_value_heads": 4,
            "head_dim": 8,
            "first_k_dense_replace": 1,
            "n_group": 2,
            "topk_group": 1,
            "scoring_func": "sigmoid",
            "routed_scaling_factor": 2.5,
        },
        "rope_parameters": {**DEEPSEEK_YARN, "mscale": 1.0, "mscale_all_dim": 1.0},
    },
    # DeepSeek-V2-Lite's shape: q_proj without a q_lora_rank, which llama.cpp reads only with 26 or 27 layers;
    # no padding row (its zero embedding gave NaN gradients when the LoRA of this 26-layer case was trained)
    "deepseek_v2": {
        **{
            "num_key_value_heads": 4,
            "head_dim": 8,
            "num_hidden_layers": 26,
            "q_lora_rank": None,
            "first_k_dense_replace": 1,
            "n_shared_experts": 2,
            "pad_token_id": None,
        },
        "rope_parameters": {**DEEPSEEK_YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
    },
}
#: Options the converter runs with per model type: Qwen3.5 without its MTP block, as lorasave writes it
#: (without ``--no-mtp`` the converter stops on a checkpoint that has none, any transformers save).
#: GLM-4.5 too: lorasave leaves its MTP layers out; without ``--no-mtp`` ``Glm4MoeModel`` counts
#: ``num_nextn_predict_layers`` into ``block_count`` and writes ``nextn_predict_layers``, tensors or not.
CONVERTER_ARGS: dict[str, tuple[str, ...]] = dict.fromkeys(("qwen3_5_text", "qwen3_5", "qwen3_5_moe_text", "qwen3_5_moe", "glm4_moe"), ("--no-mtp",))
#: Special tokens the converter's ``set_vocab`` looks up, per model type (``Glm4Model``: ``<|user|>`` ...).
SPECIALS: dict[str, tuple[str, ...]] = {
    "glm4": ("<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"),
}
SPECIALS["glm4_moe"] = SPECIALS["glm4"]
#: Modules left out of the case's LoRA (``LoraConfig.exclude_modules``): vision towers and projectors, and
#: Llama 4's router (an ``nn.Linear`` whose forward returns a tuple, which a LoRA layer cannot add to).
VISION_MODULES = r".*(vision|visual|multi_modal_projector|patch_embed|merger|feed_forward\.router).*"
#: Fused expert parameters the case's LoRA also targets (PEFT ``target_parameters``), per model type.
TARGET_PARAMETERS: dict[str, list[str]] = {
    "llama4_text": ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"],
}
TARGET_PARAMETERS["llama4"] = TARGET_PARAMETERS["llama4_text"]
#: Model types run with a SentencePiece ``tokenizer.model``: the converter's class reads only that
#: (``conversion/phi.py``) or lorasave's rules take no byte-level BPE (gemma2).
SPM_ONLY = frozenset({"phi3", "gemma2"})
#: Model types run with a SentencePiece BPE (byte fallback) saved as ``tokenizer.json`` alone (what
#: transformers 5 saves): ``Gemma4Model.set_vocab`` reads it with gguf-py's ``LlamaHfVocab``, which takes
#: no byte-level BPE.
HF_SPM = frozenset({"gemma4_text", "gemma4"})
#: Multimodal model types whose config ``AutoModelForCausalLM`` builds as the text model alone
#: (``llama4`` -> ``Llama4ForCausalLM``): built as image-text-to-text, the checkpoint users have.
IMAGE_TEXT = frozenset({"llama4", "gemma4"})
#: Cases beyond one per model type: ``<model_type>-spm`` runs it with a SentencePiece ``tokenizer.model``.
EXTRA_CASES = ("llama-spm", "gemma3_text-spm")


def default_cases() -> list[str]:
    """One case per ``model_type`` of ARCHITECTURES (``SPM_ONLY`` ones as ``-spm``), then :data:`EXTRA_CASES`."""
    from lorasave.formats.gguf.arch import ARCHITECTURES

    cases = [f"{m}-spm" if m in SPM_ONLY else m for m in ARCHITECTURES]
    return cases + [c for c in EXTRA_CASES if c.removesuffix("-spm") in ARCHITECTURES and c not in cases]


def tiny_config(model_type: str, vocab: int) -> Any:
    """transformers' default config of ``model_type`` with :data:`TINY`'s sizes and :data:`OVERRIDES`."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type).to_dict()
    extra = copy.deepcopy(OVERRIDES.get(model_type, {}))  # transformers rewrites rope dicts in place
    extra = {k: v(vocab) if callable(v) else v for k, v in extra.items()}

    def shrink(d: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in TINY.items() if k in d}
        for sub in ("text_config", "vision_config"):
            if isinstance(d.get(sub), dict):
                mine = {k: v for k, v in extra.items() if k in d[sub]} if sub == "text_config" else {}  # overrides are the language model's
                out[sub] = {**d[sub], **shrink(d[sub])}
                out[sub].pop("layer_types", None)  # regenerated for the new layer count
                out[sub].update(mine)
        for key in ("vocab_size", "vocab_size_per_layer_input"):
            if key in d:
                out[key] = vocab
        if "layer_types" in d:
            out["layer_types"] = None
        return out

    kwargs = shrink(default)
    subs = [k for k in ("text_config", "vision_config") if isinstance(kwargs.get(k), dict)]
    # an override goes where its key is: the top level, else the sub-configs that have it (done in shrink)
    kwargs.update({k: v for k, v in extra.items() if k in default or not any(k in kwargs[sub] for sub in subs if sub == "text_config")})
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, vocab: int) -> Any:
    """A tiny float32 model of ``model_type`` (seed 3): :func:`tiny_config`, causal LM head, else (and for
    :data:`IMAGE_TEXT`) image-text-to-text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    config = tiny_config(model_type, vocab)
    torch.manual_seed(3)
    try:
        if model_type in IMAGE_TEXT:
            raise ValueError(model_type)
        model = AutoModelForCausalLM.from_config(config)
    except ValueError:
        model = AutoModelForImageTextToText.from_config(config)
    return model.float().eval()


def build_case(name: str, root: Path, tokenizer_dir: Path | None, base_dtype: str = "float32") -> tuple[Path, Path]:
    """Tiny base (``base_dtype``, with tokenizer) and a LoRA on every linear layer trained a few steps (in float32); cached in ``root``."""
    base, lora = root / "base", root / "lora"
    if (lora / "adapter_config.json").is_file():
        return base, lora
    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT / "tests"))
    import _models

    shutil.rmtree(root, ignore_errors=True)
    model_type = name.removesuffix("-spm")
    if name.endswith("-spm"):
        tiny_spm(base, _models.VOCAB)
        model = tiny_model(model_type, _models.VOCAB)
        bos, eos = 1, 2  # sentencepiece: <unk> 0, <s> 1, </s> 2
    elif model_type in HF_SPM and not tokenizer_dir:
        tok = _models.build_spm_tokenizer(base, "GemmaTokenizer", keep_model=False)  # <pad> 0, <s> 1, </s> 2
        model = tiny_model(model_type, len(tok))
        bos, eos = tok.bos_token_id, tok.eos_token_id
    else:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else tiny_bpe(_models.VOCAB, SPECIALS.get(model_type, ("<|endoftext|>",)))
        model = tiny_model(model_type, len(tok) if tokenizer_dir else _models.VOCAB)
        bos, eos = tok.bos_token_id, tok.eos_token_id
        tok.save_pretrained(base)
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None:
            cfg.bos_token_id, cfg.eos_token_id = bos, eos
    model.to(getattr(torch, base_dtype)).save_pretrained(base)
    model.float()
    # transformers 5 saves tokenizer_class "TokenizersBackend", unknown to the converter's
    # pinned transformers 4.57: name the class both versions load a tokenizer.json with; and it
    # saves added specials as a list "extra_special_tokens", which 4.57 reads as a dict (AttributeError):
    # write them as "additional_special_tokens", which both versions read.
    tok_config = base / "tokenizer_config.json"
    data = json.loads(tok_config.read_text()) if tok_config.is_file() else {}
    if data.get("tokenizer_class") == "TokenizersBackend":
        data["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(data.get("extra_special_tokens"), list):
        data["additional_special_tokens"] = data.pop("extra_special_tokens")
    if data:
        tok_config.write_text(json.dumps(data, indent=2))
    # every linear layer of the language model (a vision tower gets no gradient from text)
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", exclude_modules=VISION_MODULES,
        target_parameters=TARGET_PARAMETERS.get(model_type), task_type="CAUSAL_LM",
    )  # fmt: skip
    _models.train_lora(model, config, seed=5).save_pretrained(lora)
    return base, lora
