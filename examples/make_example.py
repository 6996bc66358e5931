"""Build the tiny example shipped in examples/: a base model and a LoRA adapter trained with PEFT.

    python examples/make_example.py            # rewrites examples/tiny-llama and examples/tiny-llama-lora

The base is a random 2-layer Llama (hidden 64, vocab 256, bf16) with a byte-level BPE tokenizer;
the adapter is a LoRA (r=8, lora_alpha=16, attention and MLP projections) trained for 30 steps on
a short text, so that its lora_B matrices are non-zero. Both are a few hundred KB. Everything is
seeded, and nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TEXT = (
    "LoRA adapts a frozen model by adding a low-rank update to some of its weight matrices. "
    "Merging folds that update into the weights, so the model runs without the adapter. "
) * 8


def make_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on TEXT (deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator([TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = make_tokenizer(256)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    base_dir = args.out / "tiny-llama"
    lora_dir = args.out / "tiny-llama-lora"
    for d in (base_dir, lora_dir):
        shutil.rmtree(d, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)

    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :128]
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(30):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft_model.save_pretrained(lora_dir)
    # record the base as the sibling folder name, not this machine's path
    cfg_path = lora_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "tiny-llama"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    print(f"wrote {base_dir} and {lora_dir} (final loss {loss.item():.3f})")


if __name__ == "__main__":
    main()
