"""Benchmark ``lorasave merge`` against the transformers + PEFT reference path and ``cat``.

Run::

    python benchmarks/merge.py [--workdir DIR] [--runs 3] [--small] [--tools abc]

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

and, only when asked for with ``--tools`` (the default is ``abc``), the 4-bit cases:

  (d) ``lorasave merge BASE_NF4 ADAPTER -o OUT --overwrite --json --quiet``: the same adapter
      merged into the 4-bit version of the base, written as a bf16 checkpoint
      (dequantize -> merge -> round once)
  (e) ``lorasave merge BASE ADAPTER -o OUT --save-method merged_4bit --overwrite --json --quiet``:
      the bf16 base merged and written as bitsandbytes 4-bit

``BASE_NF4`` is built once (cached in ``WORKDIR/<model>-nf4``) by transformers +
bitsandbytes on CPU: ``from_pretrained(BASE, quantization_config=BitsAndBytesConfig(nf4,
double quant, bf16 compute), device_map="cpu", dtype=bf16)`` then ``save_pretrained``.

Outputs are deleted (and ``sync`` run) between runs. It prints a table and writes
``WORKDIR/results.json``. Targets: a/b <= 0.2, a/c <= 2, peak RSS of (a) <= 1 GiB; d/a and e/a
are reported without a target.
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
# The 4-bit version of the base (tool d): BitsAndBytesConfig arguments, bf16 load dtype.
NF4_CONFIG: dict[str, Any] = {
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "bnb_4bit_compute_dtype": "bfloat16",
}
LORASAVE_TOOLS = "ade"  # tools that are `lorasave merge` runs (JSON output, breakdown)
NF4_TOOLS = "d"  # tools that need the 4-bit base

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
    input_bytes: int = 0  # safetensors bytes of the base this tool reads (for GB/s)
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


def safetensors_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def build_nf4_fixture(workdir: Path, shape_name: str, base_dir: Path) -> tuple[Path, float, bool]:
    """Save the 4-bit (nf4) version of the base once; return (dir, build seconds, built now)."""
    root = workdir / f"{shape_name}-nf4"
    marker = root / "READY.json"
    signature = {
        "shape": MODEL_SHAPES[shape_name],
        "lora_r": LORA_R,
        "lora_alpha": LORA_ALPHA,
        "quantization": NF4_CONFIG,
        "dtype": "bfloat16",
    }
    # The bf16 base's marker: rebuilding the base makes this copy stale.
    base_marker = (base_dir.parent / "READY.json").stat().st_mtime
    if marker.is_file():
        data = json.loads(marker.read_text())
        if data.get("signature") == signature and data.get("base_marker_mtime") == base_marker:
            return root / "base", float(data.get("build_s", float("nan"))), False

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    out_dir = root / "base"
    print(f"building the nf4 4-bit version of {base_dir} in {out_dir} (once; bitsandbytes on CPU) ...", flush=True)
    start = time.perf_counter()
    quant_args = {**NF4_CONFIG, "bnb_4bit_compute_dtype": getattr(torch, NF4_CONFIG["bnb_4bit_compute_dtype"])}
    model = AutoModelForCausalLM.from_pretrained(
        base_dir,
        quantization_config=BitsAndBytesConfig(**quant_args),
        device_map="cpu",
        dtype=torch.bfloat16,
    )
    loaded = time.perf_counter() - start
    model.save_pretrained(out_dir)
    build_s = time.perf_counter() - start
    del model
    print(
        f"built nf4 base {safetensors_bytes(out_dir) / 2**30:.2f} GiB in {build_s:.1f} s (load + quantize {loaded:.1f} s, save {build_s - loaded:.1f} s)",
        flush=True,
    )
    marker.write_text(
        json.dumps(
            {
                "signature": signature,
                "base_marker_mtime": base_marker,
                "build_s": build_s,
                "load_quantize_s": loaded,
            }
        )
    )
    return out_dir, build_s, True


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


def lorasave_merge(base: Path, adapter: Path, out: Path, *extra: str) -> list[str]:
    return [
        *lorasave_command(),
        "merge",
        str(base),
        str(adapter),
        "-o",
        str(out),
        *extra,
        "--overwrite",
        "--json",
        "--quiet",
    ]


def make_tools(base: Path, adapter: Path, outdir: Path, tools: str, nf4_base: Path | None = None) -> list[tuple[str, ToolResult, Path]]:
    shards = sorted(base.glob("*.safetensors"))
    out_a, out_b, out_c, out_d, out_e = (
        outdir / "a-lorasave",
        outdir / "b-reference",
        outdir / "c-cat.bin",
        outdir / "d-lorasave-nf4-base",
        outdir / "e-lorasave-merged-4bit",
    )
    cat_cmd = "cat " + " ".join(shlex.quote(str(s)) for s in shards)
    cat_cmd += " > " + shlex.quote(str(out_c))
    base_bytes = safetensors_bytes(base)
    candidates = [
        ("a", ToolResult("(a) lorasave merge", lorasave_merge(base, adapter, out_a), base_bytes), out_a),
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
                base_bytes,
            ),
            out_b,
        ),
        ("c", ToolResult("(c) cat (I/O floor)", ["bash", "-c", cat_cmd], base_bytes), out_c),
    ]
    if nf4_base is not None:
        candidates.append(
            (
                "d",
                ToolResult(
                    "(d) lorasave, 4-bit base",
                    lorasave_merge(nf4_base, adapter, out_d),
                    safetensors_bytes(nf4_base),
                ),
                out_d,
            )
        )
    candidates.append(
        (
            "e",
            ToolResult(
                "(e) lorasave, merged_4bit",
                lorasave_merge(base, adapter, out_e, "--save-method", "merged_4bit"),
                base_bytes,
            ),
            out_e,
        )
    )
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
            if key in LORASAVE_TOOLS:
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


def lorasave_breakdown(result: ToolResult) -> dict[str, float]:
    """Medians of lorasave's own JSON timings over the runs of ``result``."""
    breakdown: dict[str, float] = {}
    for key in (*BREAKDOWN_KEYS, "seconds"):
        values: list[float] = []
        for run in result.runs:
            data = run.lorasave_json or {}
            value = data.get(key) if key == "seconds" else data.get("timings", {}).get(key)
            if isinstance(value, (int, float)):
                values.append(float(value))
        if values:
            breakdown[key] = statistics.median(values)
    return breakdown


def print_breakdown(key: str, result: ToolResult, breakdown: dict[str, float]) -> None:
    parts = ", ".join(f"{k} {breakdown[k]:.2f} s" for k in BREAKDOWN_KEYS if k in breakdown)
    missing = [k for k in BREAKDOWN_KEYS if k not in breakdown]
    print(
        f"lorasave breakdown ({key}, median): {parts or 'none reported'}"
        + (f"; own total {breakdown['seconds']:.2f} s" if "seconds" in breakdown else "")
        + (f"; missing keys: {', '.join(missing)}" if missing else "")
    )
    if result.runs and result.runs[-1].lorasave_json:
        last = result.runs[-1].lorasave_json
        total = last.get("total_bytes")
        size = f", {total / 2**30:.2f} GiB" if isinstance(total, (int, float)) else ""
        print(f"lorasave output ({key}, last run): {last.get('files')}, dtype {last.get('dtype')}{size}")
        for note in last.get("notes") or []:
            print(f"  note ({key}): {note}")


def report(
    tools: dict[str, ToolResult],
    base: Path,
    shape_name: str,
    workdir: Path,
    runs: int,
    nf4: dict[str, Any] | None = None,
) -> dict[str, Any]:
    base_bytes = safetensors_bytes(base)
    print()
    print(f"model {shape_name}: base {base_bytes / 2**30:.2f} GiB in {len(list(base.glob('*.safetensors')))} shard(s); median of {runs} warm run(s)")
    if nf4 is not None:
        built = f"built in {nf4['build_s']:.1f} s" + ("" if nf4["built_now"] else " (cached)")
        print(f"4-bit base (d): nf4, double quant, {nf4['bytes'] / 2**30:.2f} GiB in {nf4['n_files']} file(s); {built}")
    print(f"{'tool':<28}{'wall s':>10}{'peak RSS MiB':>15}{'GB/s':>8}")
    for result in tools.values():
        print(f"{result.label:<28}{result.wall_s:>10.2f}{result.peak_rss_mib:>15.1f}{result.input_bytes / 1e9 / result.wall_s:>8.2f}")
    print("(GB/s: safetensors bytes of the base the tool reads / wall time)")

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
                "input_bytes": r.input_bytes,
                "wall_s_median": r.wall_s,
                "peak_rss_mib_median": r.peak_rss_mib,
                "runs": [asdict(x) for x in r.runs],
            }
            for k, r in tools.items()
        },
        "ratios": {},
        "targets": {},
    }
    if nf4 is not None:
        out["nf4_base"] = nf4
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
    for key in ("d", "e"):
        other = tools.get(key)
        if a and other:
            wall_ratio = other.wall_s / a.wall_s
            rss_ratio = other.peak_rss_mib / a.peak_rss_mib
            out["ratios"][f"{key}_over_a"] = wall_ratio
            out["ratios"][f"{key}_over_a_peak_rss"] = rss_ratio
            print(f"{key}/a wall = {wall_ratio:.3f}   {key}/a peak RSS = {rss_ratio:.3f}   (no target)")
    breakdowns: dict[str, dict[str, float]] = {}
    for key, result in tools.items():
        if key in LORASAVE_TOOLS:
            breakdowns[key] = lorasave_breakdown(result)
            print_breakdown(key, result, breakdowns[key])
    if "a" in breakdowns:
        out["lorasave_breakdown_median_s"] = breakdowns["a"]
    if breakdowns:
        out["lorasave_breakdowns_median_s"] = breakdowns
    if out["targets"]:
        met = all(out["targets"].values())
        out["all_targets_met"] = met
        print(f"all targets met: {met}")
    results_path = workdir / "results.json"
    results_path.write_text(json.dumps(out, indent=2))
    print(f"results written to {results_path}")
    return out


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark here takes: --workdir, --runs, --small."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lorasave-bench"))
    parser.add_argument("--runs", type=int, default=3, help="timed runs per tool (median)")
    parser.add_argument("--small", action="store_true", help="tiny model: a quick smoke run")
    return parser


def bench_setup(args: argparse.Namespace) -> str:
    """Check ``/usr/bin/time`` and ``--runs``, create ``--workdir``; return the fixture's shape name."""
    if not Path(TIME_BIN).is_file():
        sys.exit(f"{TIME_BIN} not found (Debian: apt-get install time)")
    if args.runs < 1:
        sys.exit("--runs must be >= 1")
    args.workdir.mkdir(parents=True, exist_ok=True)
    return "llama-small" if args.small else "llama-1.1b"


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument(
        "--tools",
        default="abc",
        help="which of a (lorasave), b (reference), c (cat), d (lorasave, 4-bit base -> bf16), e (lorasave, bf16 base -> merged_4bit) to run",
    )
    args = parser.parse_args()
    unknown = sorted(set(args.tools) - set("abcde"))
    if unknown or not args.tools:
        sys.exit(f"--tools takes letters from abcde, got {args.tools!r}")
    shape_name = bench_setup(args)
    base, adapter = build_fixture(args.workdir, shape_name)
    nf4_base, nf4 = None, None
    if any(t in args.tools for t in NF4_TOOLS):
        nf4_base, build_s, built_now = build_nf4_fixture(args.workdir, shape_name, base)
        nf4 = {
            "path": str(nf4_base),
            "quantization": NF4_CONFIG,
            "bytes": safetensors_bytes(nf4_base),
            "n_files": len(list(nf4_base.glob("*.safetensors"))),
            "build_s": build_s,
            "built_now": built_now,
        }
    outdir = args.workdir / "out"
    outdir.mkdir(exist_ok=True)
    tools = make_tools(base, adapter, outdir, args.tools, nf4_base)
    run_benchmark(tools, args.runs)
    report({k: r for k, r, _ in tools}, base, shape_name, args.workdir, args.runs, nf4)


if __name__ == "__main__":
    main()
