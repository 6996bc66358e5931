"""Helpers that build tiny models, tokenizers and trained LoRA adapters for the tests.

Everything is built from configs with fixed seeds; nothing touches the network.
Reference values in the tests always come from torch / transformers / peft, never
from lorasave itself.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128
HIDDEN = 32
# Small enough that the tiny Llama (~170 KB in fp32) is split over several shards.
SHARD = "50KB"
# Words only the adapter's tokenizer knows.
EXTRA_WORDS = ("adapter_only_a", "adapter_only_b")

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": 2 * HIDDEN,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "initializer_range": 0.1,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


# --------------------------------------------------------------------------- models


def build_llama(seed: int = 0, hidden: int = HIDDEN, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        **{
            **_COMMON,
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
        }
    )
    return LlamaForCausalLM(cfg).eval()


def build_qwen2(seed: int = 1) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**_COMMON)).eval()
    # Qwen2 has q/k/v biases; give them non-trivial values so a bug touching them shows.
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                assert proj.bias is not None
                proj.bias.normal_(0.0, 0.1)
    return model


def build_gpt2(seed: int = 2) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=2,
        n_head=4,
        n_positions=64,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
    )
    return GPT2LMHeadModel(cfg).eval()


def save_model(model: PreTrainedModel, path: Path, max_shard_size: str | int = "5GB") -> Path:
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


# ----------------------------------------------------------------------- tokenizers


def build_tokenizer(extra_words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = [f"w{i}" for i in range(40)] + list(extra_words)
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


# --------------------------------------------------------------------------- LoRA


def train_lora(
    model: PreTrainedModel,
    config: LoraConfig,
    *,
    seed: int,
    steps: int = 8,
    lr: float = 1e-2,
    adapter_name: str = "default",
) -> PeftModel:
    """Wrap ``model`` with LoRA and train a few Adam steps so that lora_B is non-zero."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    peft_model.train()
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (4, 16), generator=gen)
        loss = peft_model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    peft_model.eval()
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            assert p.abs().max() > 0, f"{name} is still zero after training"
    return peft_model


def make_adapter(
    base_dir: Path,
    out_dir: Path,
    config: LoraConfig,
    *,
    seed: int,
    adapter_name: str = "default",
    dtype: torch.dtype = torch.float32,
    safe_serialization: bool = True,
) -> Path:
    """Load the saved base, train a LoRA on it and save the adapter folder."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    peft_model = train_lora(model, config, seed=seed, adapter_name=adapter_name)
    peft_model.save_pretrained(out_dir, safe_serialization=safe_serialization)
    return out_dir


# ------------------------------------------------------------------------ reading


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of every ``*.safetensors`` file in ``folder`` (a model folder)."""
    out: dict[str, torch.Tensor] = {}
    files = sorted(p for p in Path(folder).iterdir() if p.suffix == ".safetensors")
    assert files, f"no safetensors in {folder}"
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                assert k not in out, f"duplicate tensor {k}"
                out[k] = fh.get_tensor(k)
    return out


def read_file_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def file_metadata(path: Path) -> dict[str, str] | None:
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_hashes(folder: Path) -> dict[str, tuple[str, int]]:
    """Relative path -> (sha256, mtime_ns) for every file under ``folder``."""
    out: dict[str, tuple[str, int]] = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            p = Path(root) / name
            out[str(p.relative_to(folder))] = (sha256(p), p.stat().st_mtime_ns)
    return out


# -------------------------------------------------------------- PEFT ground truth


def lora_modules(peft_model: PeftModel, adapter_name: str = "default") -> dict[str, float]:
    """Base-model module name (as in the base checkpoint) -> PEFT's own scaling."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, float] = {}
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.scaling:
            assert name.startswith(prefix), name
            out[name[len(prefix) :]] = float(module.scaling[adapter_name])
    assert out, "no LoRA layers found"
    return out


def peft_scalings(base_dir: Path, adapter_dir: Path) -> dict[str, float]:
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, adapter_dir)
    return lora_modules(peft_model)


def adapter_weights(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Base-model module name -> (lora_A, lora_B) read straight from the adapter file."""
    raw = read_file_tensors(Path(adapter_dir) / "adapter_model.safetensors")
    prefix = "base_model.model."
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in raw.items():
        if key.endswith(".lora_A.weight"):
            module = key[len(prefix) : -len(".lora_A.weight")]
            b = raw[key.replace(".lora_A.weight", ".lora_B.weight")]
            out[module] = (a, b)
    assert out
    return out


def expected_merge(
    w0: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    dtype: torch.dtype,
    *,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """The documented merge formula, computed in float32 and rounded once."""
    delta = b.float() @ a.float()
    if fan_in_fan_out:  # transformers Conv1D stores the weight as (in, out)
        delta = delta.T
    return (w0.float() + scaling * delta).to(dtype)


def resolve_scaling(config: dict[str, Any], module_name: str) -> float:
    """Independent re-implementation of PEFT's per-module r/alpha resolution.

    Used only to cross-check that the PEFT scalings we compare against are the ones the
    adapter config asks for (so a test on a pattern adapter really exercises patterns).
    """
    import re

    def pick(pattern: dict[str, Any], default: Any) -> Any:
        for key, val in (pattern or {}).items():
            if re.match(rf"(.*\.)?({key})$", module_name):
                return val
        return default

    r = pick(config.get("rank_pattern") or {}, config["r"])
    alpha = pick(config.get("alpha_pattern") or {}, config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


# ------------------------------------------------------------------------- logits


def batch_ids() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(3, VOCAB, (3, 12), generator=gen)


@torch.no_grad()
def logits_of(model: torch.nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    ids = batch_ids() if ids is None else ids
    model.eval()
    return model(input_ids=ids).logits.float()


def reference_logits(base_dir: Path, adapter_dirs: list[Path]) -> torch.Tensor:
    """Logits of the *unmerged* PEFT model(s) on an fp32 copy of the base.

    With several adapters they are applied one after the other (each merged by PEFT
    before the next is loaded), which is what stacking adapters means.
    """
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    for i, adapter in enumerate(adapter_dirs):
        peft_model = PeftModel.from_pretrained(model, adapter)
        if i == len(adapter_dirs) - 1:
            return logits_of(peft_model)
        model = peft_model.merge_and_unload()
    raise AssertionError("no adapters")


# -------------------------------------------------------------------- merge cases


@dataclass(frozen=True)
class Case:
    base: str  # fixture name
    adapters: tuple[str, ...]  # fixture names
    dtype: str  # passed to lorasave.merge
    out_dtype: torch.dtype  # what we expect in the output
    max_shard_size: str = SHARD


CASES: dict[str, Case] = {
    "llama_fp32": Case("llama_base", ("llama_plain",), "auto", torch.float32),
    "llama_sharded_base": Case("llama_base_sharded", ("llama_plain",), "auto", torch.float32, "5GB"),
    "llama_rslora": Case("llama_base", ("llama_rslora",), "auto", torch.float32),
    "llama_pattern": Case("llama_base", ("llama_pattern",), "auto", torch.float32),
    "llama_alllinear": Case("llama_base_sharded", ("llama_alllinear",), "auto", torch.float32),
    "llama_bf16": Case("llama_base_bf16", ("llama_bf16_adapter",), "auto", torch.bfloat16),
    "llama_to_bf16": Case("llama_base", ("llama_plain",), "bfloat16", torch.bfloat16),
    "llama_to_fp16": Case("llama_base", ("llama_plain",), "float16", torch.float16),
    "llama_bf16_to_fp32": Case("llama_base_bf16", ("llama_bf16_adapter",), "float32", torch.float32),
    "qwen2": Case("qwen2_base", ("qwen2_adapter",), "auto", torch.float32),
    "gpt2": Case("gpt2_base", ("gpt2_adapter",), "auto", torch.float32),
    # 12 layers: "layers.10" sorts before "layers.2" lexicographically but not naturally,
    # so this case tells apart tensor orders when checking the shard layout.
    "llama_deep": Case("llama_deep_base", ("llama_deep_adapter",), "auto", torch.float32, "20KB"),
    "llama_tokenizer": Case("llama_base", ("adapter_with_tokenizer",), "auto", torch.float32, "5GB"),
}


@dataclass
class Merged:
    name: str
    case: Case
    base: Path
    adapters: list[Path]
    out: Path
    result: Any  # lorasave.MergeResult


# ------------------------------------------------------------- GGUF architectures

#: Training text for the tokenizers of the GGUF architecture tests (spaces, digits, unicode).
GGUF_CORPUS = (
    "LoRA adapts a frozen model by adding a low-rank update to some of its weight matrices. "
    "Merging folds that update into the weights, 12345 times in 2024: naïve café, 日本語のテキスト, ünïcödé!\n"
) * 20
#: Llama 3 and Qwen2 pre-tokenizer regexes (their ``tokenizer.json`` ``Split`` patterns).
BPE_SPLIT = {
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def build_byte_bpe_tokenizer(
    text: str, vocab: int, specials: Sequence[str] = ("<|endoftext|>",), bos: str = "<|endoftext|>", eos: str = "<|endoftext|>"
) -> PreTrainedTokenizerFast:
    """A plain byte-level BPE (GPT-2's ``ByteLevel`` pre-tokenizer, ids < ``vocab``) trained on ``text``:
    the tokenizer the GGUF export tests write. ``specials`` are added first (ids 0, 1, ...)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainer=trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(specials), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=bos)


def build_bpe_tokenizer(style: str, vocab: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on :data:`GGUF_CORPUS` with the ``style`` regex split (``"llama3"``/``"qwen2"``).

    Specials: ``<|endoftext|>`` (BOS/EOS/PAD), ``<|im_start|>``, ``<|im_end|>``; a chat template.
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(BPE_SPLIT[style]), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([GGUF_CORPUS], trainer=trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    out.add_special_tokens({"additional_special_tokens": specials[1:]})
    out.chat_template = CHAT_TEMPLATE
    return out


def build_spm_tokenizer(folder: Path, tokenizer_class: str, vocab: int = 320, keep_model: bool = True) -> PreTrainedTokenizerFast:
    """A SentencePiece BPE (byte fallback) trained on :data:`GGUF_CORPUS`, saved in ``folder``.

    ``tokenizer.model`` + the transformers tokenizer of ``tokenizer_class`` (``"LlamaTokenizer"``,
    ``"GemmaTokenizer"``) converted from it, plus an added special ``<|im_end|>`` and a chat template.
    ``keep_model=False`` leaves only ``tokenizer.json`` (what a transformers 5 ``save_pretrained`` writes).
    """
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text(GGUF_CORPUS, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "sp"),
        vocab_size=vocab - 1,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        minloglevel=2,
    )
    corpus.unlink()
    (folder / "sp.model").rename(folder / "tokenizer.model")
    (folder / "sp.vocab").unlink()
    cfg = {"tokenizer_class": tokenizer_class, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    if not keep_model:
        (folder / "tokenizer.model").unlink()
    return AutoTokenizer.from_pretrained(folder)


def build_arch_model(kind: str, vocab: int, seed: int = 0) -> PreTrainedModel:
    """A tiny float32 model of ``kind``: ``"llama"`` (Llama 3.1 rope scaling), ``"qwen3"``, ``"gemma3"``
    (6 layers: 5 sliding-window + 1 global, head_dim == query_pre_attn_scalar as in Gemma 3 270M) or ``"phi3"``."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Phi3Config, Phi3ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    common: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if kind == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
        model: PreTrainedModel = LlamaForCausalLM(
            LlamaConfig(**common, tie_word_embeddings=False, rope_parameters={**rope, "original_max_position_embeddings": 64})
        )
    elif kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16, tie_word_embeddings=True))
    elif kind == "gemma3":
        common.update(num_hidden_layers=6, head_dim=16)
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, query_pre_attn_scalar=16, sliding_window=8))
    elif kind == "phi3":
        model = Phi3ForCausalLM(Phi3Config(**common, tie_word_embeddings=False))
    else:
        raise ValueError(kind)
    with torch.no_grad():  # non-trivial norm weights (Gemma's +1 and q/k norms must show)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0 if kind == "gemma3" else 1.0, 0.1)
    return model.eval()
