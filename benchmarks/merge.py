"""Benchmark ``lorasave merge`` against the transformers + PEFT reference path and ``cat``.

Run::

    python benchmarks/merge.py [--workdir DIR] [--runs 3] [--small]

It builds (once, cached in ``--workdir``, default ``/tmp/lorasave-bench``) a random bf16 Llama
of ~1.1B parameters (TinyLlama shape: hidden 2048, 22 layers, intermediate 5632, 32 heads,
4 KV heads, vocab 32000), saved by transformers ``save_pretrained`` with
``max_shard_size="2GB"`` so the base is a realistic two-shard checkpoint with an index, and an
r=16 PEFT LoRA adapter on q/k/v/o/gate/up/down with non-zero random ``lora_B``, saved by PEFT.
``--small`` uses a ~20M-parameter model of the same shape family for a quick smoke run.

Then it times, each as its own subprocess under ``/usr/bin/time -f %M`` (peak RSS), after one
untimed warm-up of each (so the base is in the page cache), the median of ``--runs`` runs of:

  (a) ``lorasave merge BASE ADAPTER -o OUT --overwrite --json --quiet``
  (b) transformers ``from_pretrained(bf16)`` + ``PeftModel.from_pretrained`` +
      ``merge_and_unload()`` + ``save_pretrained`` (the reference path)
  (c) ``cat BASE/*.safetensors > OUT`` (the I/O floor)

Outputs are deleted (and ``sync`` run) between runs. It prints a table and writes
``WORKDIR/results.json``. Targets: a/b <= 0.2, a/c <= 2, peak RSS of (a) <= 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TIME_BIN = "/usr/bin/time"
TARGET_A_OVER_B = 0.2
TARGET_A_OVER_C = 2.0
TARGET_RSS_MIB = 1024.0
BREAKDOWN_KEYS = ("read", "merge", "write", "hash")
TARGET_MODULES = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]

MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "llama-1.1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 22,
        "intermediate_size": 5632,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "max_shard_size": "2GB",
    },
    "llama-small": {
        "hidden_size": 512,
        "num_hidden_layers": 4,
        "intermediate_size": 1408,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 8000,
        "max_shard_size": "20MB",
    },
}
LORA_R = 16
LORA_ALPHA = 32

# The reference path (b), run as `python -c REFERENCE_SCRIPT BASE ADAPTER OUT`.
REFERENCE_SCRIPT = """
import sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter)
model = model.merge_and_unload()
model.save_pretrained(out)
"""


@dataclass
class Run:
    """One timed subprocess."""

    wall_s: float
    peak_rss_mib: float
    lorasave_json: dict[str, Any] | None = None


@dataclass
class ToolResult:
    """All timed runs of one tool and their medians."""

    label: str
    command: list[str]
    runs: list[Run] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return statistics.median(r.wall_s for r in self.runs)

    @property
    def peak_rss_mib(self) -> float:
        return statistics.median(r.peak_rss_mib for r in self.runs)


# --------------------------------------------------------------------------- fixtures


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_fixture(workdir: Path, shape_name: str) -> tuple[Path, Path]:
    """Create the random base checkpoint and LoRA adapter once; return (base, adapter)."""
    root = workdir / shape_name
    base_dir, adapter_dir = root / "base", root / "adapter"
    marker = root / "READY.json"
    signature = {"shape": MODEL_SHAPES[shape_name], "lora_r": LORA_R, "lora_alpha": LORA_ALPHA}
    if marker.is_file() and json.loads(marker.read_text()) == signature:
        return base_dir, adapter_dir

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    shape = dict(MODEL_SHAPES[shape_name])
    max_shard_size = shape.pop("max_shard_size")
    print(f"building random {shape_name} base + r={LORA_R} adapter in {root} (once) ...")
    start = time.perf_counter()
    torch.manual_seed(0)
    config = LlamaConfig(**shape, tie_word_embeddings=False, max_position_embeddings=2048)
    # Built directly in bf16: ~2.2 GB for the 1.1B model, never an fp32 copy.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(base_dir, max_shard_size=max_shard_size)

    lora_config = LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        target_modules=TARGET_MODULES,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora_config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT initialises B to zero: make the delta non-zero
                param.copy_(torch.randn_like(param) * 0.01)
    peft_model.save_pretrained(adapter_dir)
    adapter_config_path = adapter_dir / "adapter_config.json"
    adapter_config = json.loads(adapter_config_path.read_text())
    adapter_config["base_model_name_or_path"] = str(base_dir)
    adapter_config_path.write_text(json.dumps(adapter_config, indent=2))
    del peft_model, model
    print(
        f"built {n_params / 1e9:.3f}B params, base {dir_size(base_dir) / 2**30:.2f} GiB, "
        f"adapter {dir_size(adapter_dir) / 2**20:.1f} MiB in {time.perf_counter() - start:.1f} s"
    )
    marker.write_text(json.dumps(signature))
    return base_dir, adapter_dir


# --------------------------------------------------------------------------- running


def lorasave_command() -> list[str]:
    """The ``lorasave`` console script of this interpreter's environment, else ``-m lorasave``."""
    script = Path(sys.executable).parent / "lorasave"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lorasave"]


def parse_json_stdout(stdout: str) -> dict[str, Any]:
    """The JSON object that ``lorasave merge --json`` prints on stdout."""
    text = stdout.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        for line in reversed(text.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        raise


def timed(cmd: list[str], label: str) -> tuple[float, float, str]:
    """Run ``cmd`` under /usr/bin/time; return (wall seconds, peak RSS MiB, stdout)."""
    with tempfile.NamedTemporaryFile(prefix="lorasave-bench-", suffix=".time") as tf:
        full = [TIME_BIN, "-f", "%M", "-o", tf.name, *cmd]
        start = time.perf_counter()
        proc = subprocess.run(full, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        rss_text = Path(tf.name).read_text().strip().splitlines()
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise RuntimeError(f"{label} failed with status {proc.returncode}: {shlex.join(cmd)}\n{tail}")
    return wall, int(rss_text[-1]) / 1024, proc.stdout


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    os.sync()  # flush dirty pages so that one run's write-back doesn't land in the next


def make_tools(base: Path, adapter: Path, outdir: Path, tools: str) -> list[tuple[str, ToolResult, Path]]:
    shards = sorted(base.glob("*.safetensors"))
    out_a, out_b, out_c = (
        outdir / "a-lorasave",
        outdir / "b-reference",
        outdir / "c-cat.bin",
    )
    cat_cmd = "cat " + " ".join(shlex.quote(str(s)) for s in shards)
    cat_cmd += " > " + shlex.quote(str(out_c))
    candidates = [
        (
            "a",
            ToolResult(
                "(a) lorasave merge",
                [
                    *lorasave_command(),
                    "merge",
                    str(base),
                    str(adapter),
                    "-o",
                    str(out_a),
                    "--overwrite",
                    "--json",
                    "--quiet",
                ],
            ),
            out_a,
        ),
        (
            "b",
            ToolResult(
                "(b) transformers+peft",
                [
                    sys.executable,
                    "-c",
                    REFERENCE_SCRIPT,
                    str(base),
                    str(adapter),
                    str(out_b),
                ],
            ),
            out_b,
        ),
        ("c", ToolResult("(c) cat (I/O floor)", ["bash", "-c", cat_cmd]), out_c),
    ]
    return [t for t in candidates if t[0] in tools]


def run_benchmark(tools: list[tuple[str, ToolResult, Path]], runs: int) -> None:
    for key, result, out in tools:
        remove(out)
        print(f"warm-up {result.label} ...", flush=True)
        timed(result.command, result.label)
        if key == "b":  # check that the reference really wrote a checkpoint
            assert any(out.glob("*.safetensors")), f"reference wrote nothing to {out}"
        remove(out)
    for i in range(runs):  # interleaved, so that drift affects every tool alike
        for key, result, out in tools:
            wall, rss, stdout = timed(result.command, result.label)
            run = Run(wall_s=wall, peak_rss_mib=rss)
            if key == "a":
                run.lorasave_json = parse_json_stdout(stdout)
            result.runs.append(run)
            remove(out)
            print(
                f"run {i + 1}/{runs} {result.label:<24} {wall:8.2f} s {rss:9.1f} MiB",
                flush=True,
            )


# --------------------------------------------------------------------------- report


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(tools: dict[str, ToolResult], base: Path, shape_name: str, workdir: Path, runs: int) -> dict[str, Any]:
    base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    print()
    print(f"model {shape_name}: base {base_bytes / 2**30:.2f} GiB in {len(list(base.glob('*.safetensors')))} shard(s); median of {runs} warm run(s)")
    print(f"{'tool':<26}{'wall s':>10}{'peak RSS MiB':>15}{'GB/s':>8}")
    for result in tools.values():
        print(f"{result.label:<26}{result.wall_s:>10.2f}{result.peak_rss_mib:>15.1f}{base_bytes / 1e9 / result.wall_s:>8.2f}")

    out: dict[str, Any] = {
        "model": shape_name,
        "shape": MODEL_SHAPES[shape_name],
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "target_modules": TARGET_MODULES},
        "base_bytes": base_bytes,
        "runs": runs,
        "tools": {
            k: {
                "label": r.label,
                "command": r.command,
                "wall_s_median": r.wall_s,
                "peak_rss_mib_median": r.peak_rss_mib,
                "runs": [asdict(x) for x in r.runs],
            }
            for k, r in tools.items()
        },
        "ratios": {},
        "targets": {},
    }
    a, b, c = tools.get("a"), tools.get("b"), tools.get("c")
    print()
    if a and b:
        ratio = a.wall_s / b.wall_s
        out["ratios"]["a_over_b"] = ratio
        out["targets"]["a_over_b"] = ok = ratio <= TARGET_A_OVER_B
        print(f"a/b wall = {ratio:.3f}   target <= {TARGET_A_OVER_B}   {verdict(ok)}")
    if a and c:
        ratio = a.wall_s / c.wall_s
        out["ratios"]["a_over_c"] = ratio
        out["targets"]["a_over_c"] = ok = ratio <= TARGET_A_OVER_C
        print(f"a/c wall = {ratio:.3f}   target <= {TARGET_A_OVER_C}     {verdict(ok)}")
    if a:
        out["targets"]["a_peak_rss"] = ok = a.peak_rss_mib <= TARGET_RSS_MIB
        print(f"a peak RSS = {a.peak_rss_mib:.1f} MiB   target <= {TARGET_RSS_MIB:.0f} MiB  {verdict(ok)}")
        breakdown: dict[str, float] = {}
        for key in (*BREAKDOWN_KEYS, "seconds"):
            values: list[float] = []
            for run in a.runs:
                data = run.lorasave_json or {}
                value = data.get(key) if key == "seconds" else data.get("timings", {}).get(key)
                if isinstance(value, (int, float)):
                    values.append(float(value))
            if values:
                breakdown[key] = statistics.median(values)
        out["lorasave_breakdown_median_s"] = breakdown
        parts = ", ".join(f"{k} {breakdown[k]:.2f} s" for k in BREAKDOWN_KEYS if k in breakdown)
        missing = [k for k in BREAKDOWN_KEYS if k not in breakdown]
        print(
            f"lorasave breakdown (median): {parts or 'none reported'}"
            + (f"; own total {breakdown['seconds']:.2f} s" if "seconds" in breakdown else "")
            + (f"; missing keys: {', '.join(missing)}" if missing else "")
        )
        if a.runs and a.runs[-1].lorasave_json:
            files = a.runs[-1].lorasave_json.get("files")
            print(f"lorasave output files (last run): {files}")
    if out["targets"]:
        met = all(out["targets"].values())
        out["all_targets_met"] = met
        print(f"all targets met: {met}")
    results_path = workdir / "results.json"
    results_path.write_text(json.dumps(out, indent=2))
    print(f"results written to {results_path}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lorasave-bench"))
    parser.add_argument("--runs", type=int, default=3, help="timed runs per tool (median)")
    parser.add_argument("--small", action="store_true", help="tiny model: a quick smoke run")
    parser.add_argument(
        "--tools",
        default="abc",
        help="which of a (lorasave), b (reference), c (cat) to run",
    )
    args = parser.parse_args()
    if not Path(TIME_BIN).is_file():
        sys.exit(f"{TIME_BIN} not found (Debian: apt-get install time)")
    if args.runs < 1:
        sys.exit("--runs must be >= 1")
    args.workdir.mkdir(parents=True, exist_ok=True)

    shape_name = "llama-small" if args.small else "llama-1.1b"
    base, adapter = build_fixture(args.workdir, shape_name)
    outdir = args.workdir / "out"
    outdir.mkdir(exist_ok=True)
    tools = make_tools(base, adapter, outdir, args.tools)
    run_benchmark(tools, args.runs)
    report({k: r for k, r, _ in tools}, base, shape_name, args.workdir, args.runs)


if __name__ == "__main__":
    main()
