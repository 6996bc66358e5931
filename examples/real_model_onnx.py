"""Export a real small model + LoRA to ONNX with lorasave and compare onnxruntime with transformers.

Uses the SmolLM2 checkpoint and adapter that ``examples/real_model.py`` caches in its workdir
(``WORKDIR/smollm2-hf``, a bf16 safetensors checkpoint, and ``WORKDIR/smollm2-lora``, a PEFT LoRA
trained a few steps). Run that script once first::

    python examples/real_model.py --model smollm2
    pip install 'lorasave[onnx]'        # onnx, onnxruntime, onnxscript
    python examples/real_model_onnx.py [--workdir DIR] [--variants float32,float16,int8]

For each variant this:

1. runs ``lorasave.formats.onnx.export.export_onnx`` (float32 streaming merge, then a KV-cache decoder in
   optimum's layout) into ``WORKDIR/smollm2-onnx-<variant>``, with lorasave's own verification
   (onnxruntime against transformers: prefill, decode step with the cache, left-padded batch);
2. generates a greedy 20-token continuation of "The capital of France is" with onnxruntime alone
   (``onnx_generate``) and with transformers ``generate`` on the float32 merge
   (``WORKDIR/smollm2-onnx-reference``, written by ``lorasave.merge``), and prints both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorasave
from lorasave.formats.onnx.export import export_onnx, onnx_generate

PROMPT = "The capital of France is"
NEW_TOKENS = 20
VARIANTS = {"float32": {"dtype": "float32"}, "float16": {"dtype": "float16"}, "int8": {"dtype": "float32", "quantize": "int8"}}


def sources(workdir: Path, name: str) -> tuple[Path, Path]:
    """The base checkpoint and adapter ``examples/real_model.py`` cached, or exit with how to make them."""
    base, adapter = workdir / f"{name}-hf", workdir / f"{name}-lora"
    if not (base / "config.json").is_file() or not (adapter / "adapter_config.json").is_file():
        sys.exit(f"{base} or {adapter} is missing: run python examples/real_model.py --model {name} --workdir {workdir} first")
    return base, adapter


@torch.no_grad()
def transformers_greedy(merged: Path, prompt: str, new_tokens: int) -> str:
    """transformers' greedy continuation (new text only) on the float32 merged checkpoint."""
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def run_onnx(name: str, workdir: Path, variants: list[str]) -> dict[str, Any]:
    """Export each variant, generate with onnxruntime and transformers, print and return the numbers."""
    base, adapter = sources(workdir, name)
    reference_dir = workdir / f"{name}-onnx-reference"
    print(f"[{name}] float32 merge for the transformers reference -> {reference_dir}")
    print("    " + lorasave.merge(base, adapter, reference_dir, dtype="float32", overwrite=True).summary())
    start = time.perf_counter()
    reference = transformers_greedy(reference_dir, PROMPT, NEW_TOKENS)
    print(f"    transformers greedy in {time.perf_counter() - start:.1f} s")
    results: dict[str, Any] = {"prompt": PROMPT, "transformers": reference, "variants": {}}
    for variant in variants:
        out = workdir / f"{name}-onnx-{variant}"
        print(f"\n[{name} {variant}] export_onnx({base.name}, {adapter.name}) -> {out}")
        res = export_onnx(base, adapter, out, overwrite=True, **VARIANTS[variant])
        print("    " + res.summary())
        print("    timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in res.timings.items()))
        v = res.verification or {}
        print(
            f"    verification: max |dlogit| {v['max_abs_diff']:.4g} (max |logit| {v['max_abs_logit']:.4g}, "
            f"relative {v['relative_diff']:.3g}, tolerance {v['tolerance']}), top-1 {v['top1_agreement']:.1%}, passed {v['passed']}"
        )
        print("    per step: " + ", ".join(f"{k} {d:.3g}" for k, d in v["checks"].items()))
        start = time.perf_counter()
        text = onnx_generate(out, PROMPT, max_new_tokens=NEW_TOKENS)
        gen_seconds = time.perf_counter() - start
        print(f"    onnxruntime  {PROMPT!r} -> {text!r}  ({gen_seconds:.2f} s)")
        print(f"    transformers {PROMPT!r} -> {reference!r}")
        print(f"    identical: {text == reference}")
        results["variants"][variant] = {
            "onnx": text,
            "identical": text == reference,
            "export_seconds": res.seconds,
            "timings": res.timings,
            "onnx_megabytes": round(res.total_bytes / 1e6, 1),
            "verification": v,
            "generate_seconds": round(gen_seconds, 2),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lorasave-real"))
    parser.add_argument("--model", default="smollm2", help="name prefix of the cached folders (<name>-hf, <name>-lora)")
    parser.add_argument("--variants", default="float32", help=f"comma-separated, from {', '.join(VARIANTS)}")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    results = run_onnx(args.model, args.workdir, variants)
    path = args.workdir / f"{args.model}-onnx-results.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults written to {path}")
    if not results["variants"].get("float32", {"identical": True})["identical"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
