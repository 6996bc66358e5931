"""Benchmark ``lorasave gguf --type q8_0`` against ``lorasave merge`` + llama.cpp's converter.

Run::

    python benchmarks/gguf.py [--workdir DIR] [--runs 3] [--small] [--converter-dir DIR]

It uses the base + adapter of ``benchmarks/merge.py`` (built once, cached in ``--workdir``,
default ``/tmp/lorasave-bench``: a random bf16 Llama of ~1.1B parameters in two shards and an
r=16 LoRA on q/k/v/o/gate/up/down; ``--small``: the ~20M-parameter one) and gives it a tokenizer:
a byte-level BPE ``tokenizer.json`` trained on a paragraph (``WORKDIR/tokenizer-bpe``), passed to
both tools with ``--tokenizer``. The converter is the ``convert_hf_to_gguf.py`` of the
pinned runtime's llama.cpp (v0.5.0) in its own venv (``lorasave install-llama-cpp --converter``,
installed when missing); its pre-tokenizer table does not know the trained
tokenizer, so it runs through that script's shim, which answers ``tokenizer.ggml.pre``.

Then it times, each step as its own subprocess under ``/usr/bin/time -f %M`` (peak RSS), after one
untimed warm-up (so the base is in the page cache), the median of ``--runs`` runs of:

  (a) ``lorasave gguf BASE ADAPTER -o OUT --type q8_0 --tokenizer TOK``  (one pass)
  (b) ``lorasave merge BASE ADAPTER -o M --tokenizer TOK`` (bf16, what users do), then
      ``convert_hf_to_gguf.py M --outtype q8_0``: wall = sum of both, peak RSS = the larger

Outputs are deleted (and ``sync`` run) between runs. It prints the table, the ratios b/a, the
targets (b/a wall >= 2, peak RSS of (a) <= 1.5 GiB) with PASS/FAIL, lorasave's own time breakdown
(``timings`` in the output's ``lorasave.json``) and the load average, and writes
``WORKDIR/results-gguf.json``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# This file is named gguf.py: keep its folder off sys.path so ``import gguf`` finds gguf-py.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent / "scripts"))


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bench_merge = _load("bench_merge", HERE / "merge.py")
build_fixture, lorasave_command = bench_merge.build_fixture, bench_merge.lorasave_command
remove, safetensors_bytes, timed, verdict = bench_merge.remove, bench_merge.safetensors_bytes, bench_merge.timed, bench_merge.verdict

from gguf_equivalence import SHIM, ensure_converter  # noqa: E402

TARGET_SPEEDUP = 2.0  # (b) wall / (a) wall >= this
TARGET_RSS_MIB = 1.5 * 1024
GGUF_TYPE = "q8_0"
TOKENIZER_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, "
    "polished the great lens, and watched the ships pass safely beyond the rocks. "
) * 8


@dataclass
class Step:
    """One subprocess of a tool run."""

    wall_s: float
    peak_rss_mib: float


@dataclass
class Run:
    """One timed run of a tool: its steps (one for lorasave gguf, two for merge + converter)."""

    steps: list[Step]
    timings: dict[str, float] | None = None  # lorasave's own breakdown

    @property
    def wall_s(self) -> float:
        return sum(s.wall_s for s in self.steps)

    @property
    def peak_rss_mib(self) -> float:
        return max(s.peak_rss_mib for s in self.steps)


@dataclass
class Tool:
    label: str
    commands: list[list[str]]
    runs: list[Run] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return statistics.median(r.wall_s for r in self.runs)

    @property
    def peak_rss_mib(self) -> float:
        return statistics.median(r.peak_rss_mib for r in self.runs)

    def step_median(self, i: int) -> tuple[float, float]:
        return statistics.median(r.steps[i].wall_s for r in self.runs), statistics.median(r.steps[i].peak_rss_mib for r in self.runs)


def build_tokenizer(workdir: Path, vocab_size: int) -> Path:
    """A byte-level BPE tokenizer (``tokenizer.json`` + config) trained once on a paragraph."""
    out = workdir / "tokenizer-bpe"
    if (out / "tokenizer.json").is_file():
        return out
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 512), special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator([TOKENIZER_TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(tmp)
    # transformers 5 writes tokenizer_class "TokenizersBackend", unknown to the converter's 4.57.
    config_path = tmp / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2))
    tmp.rename(out)
    return out


def converter_command(conv: Any, model: Path, out: Path) -> list[str]:
    return list(conv.command(model, out, GGUF_TYPE, prelude=SHIM))


def run_tool(tool: Tool, outputs: list[Path], manifest: Path | None) -> Run:
    steps = []
    for cmd in tool.commands:
        wall, rss, _ = timed(cmd, tool.label)
        steps.append(Step(wall, rss))
    timings = None
    if manifest is not None and manifest.is_file():
        timings = json.loads(manifest.read_text()).get("result", {}).get("timings")
    for out in outputs:
        remove(out)
    return Run(steps, timings)


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (cpus {os.cpu_count()})"


def main() -> None:
    parser = bench_merge.bench_parser(__doc__)
    parser.add_argument("--converter-dir", type=Path, default=None, help="llama.cpp's converter (default: lorasave's, installed when missing)")
    args = parser.parse_args()
    shape_name = bench_merge.bench_setup(args)
    base, adapter = build_fixture(args.workdir, shape_name)
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    tok = build_tokenizer(args.workdir, vocab)
    conv = ensure_converter(args.converter_dir)

    outdir = args.workdir / "out-gguf"
    outdir.mkdir(exist_ok=True)
    out_a, merged_b, out_b = outdir / "a-lorasave-gguf", outdir / "b-merged", outdir / "b-converter.gguf"
    lorasave = lorasave_command()
    a = Tool(
        "(a) lorasave gguf q8_0",
        [[*lorasave, "gguf", str(base), str(adapter), "-o", str(out_a), "--type", GGUF_TYPE, "--tokenizer", str(tok), "--overwrite", "--quiet"]],
    )
    b = Tool(
        "(b) merge + convert_hf_to_gguf",
        [
            [*lorasave, "merge", str(base), str(adapter), "-o", str(merged_b), "--tokenizer", str(tok), "--overwrite", "--quiet"],
            converter_command(conv, merged_b, out_b),
        ],
    )
    # The shim's answer for tokenizer.ggml.pre: what lorasave writes for this tokenizer.
    os.environ["LORASAVE_FALLBACK_PRE"] = "gpt-2"
    print(f"load average before: {load_average()}", flush=True)
    for tool, outputs in ((a, [out_a]), (b, [merged_b, out_b])):
        for out in outputs:
            remove(out)
        print(f"warm-up {tool.label} ...", flush=True)
        run_tool(tool, outputs, None)
    for i in range(args.runs):  # interleaved, so that drift affects both alike
        for tool, outputs, manifest in ((a, [out_a], out_a / "lorasave.json"), (b, [merged_b, out_b], None)):
            run = run_tool(tool, outputs, manifest)
            tool.runs.append(run)
            steps = " + ".join(f"{s.wall_s:.2f}" for s in run.steps)
            print(f"run {i + 1}/{args.runs} {tool.label:<32} {run.wall_s:8.2f} s ({steps}) {run.peak_rss_mib:9.1f} MiB  load {load_average()}", flush=True)

    base_bytes = safetensors_bytes(base)
    print()
    print(f"model {shape_name}: base {base_bytes / 2**30:.2f} GiB bf16, adapter r=16; tokenizer {tok}; median of {args.runs} warm run(s)")
    print(f"{'tool':<34}{'wall s':>10}{'peak RSS MiB':>15}")
    for tool in (a, b):
        print(f"{tool.label:<34}{tool.wall_s:>10.2f}{tool.peak_rss_mib:>15.1f}")
    for i, name in enumerate(("  lorasave merge (bf16)", "  convert_hf_to_gguf q8_0")):
        wall, rss = b.step_median(i)
        print(f"{name:<34}{wall:>10.2f}{rss:>15.1f}")
    speedup = b.wall_s / a.wall_s
    rss_ratio = b.peak_rss_mib / a.peak_rss_mib
    ok_speed, ok_rss = speedup >= TARGET_SPEEDUP, a.peak_rss_mib <= TARGET_RSS_MIB
    print()
    print(f"b/a wall = {speedup:.2f}x   target >= {TARGET_SPEEDUP:.0f}x   {verdict(ok_speed)}")
    print(f"b/a peak RSS = {rss_ratio:.2f}")
    print(f"a peak RSS = {a.peak_rss_mib:.1f} MiB   target <= {TARGET_RSS_MIB:.0f} MiB   {verdict(ok_rss)}")
    breakdown: dict[str, float] = {}
    for key in sorted({k for r in a.runs for k in (r.timings or {})}):
        values = [r.timings[key] for r in a.runs if r.timings and key in r.timings]
        breakdown[key] = statistics.median(values)
    if breakdown:  # on the main thread: read + merge (incl. encoding); start-up, imports, tokenizer, manifest are the rest
        breakdown["other (wall - read - merge)"] = a.wall_s - breakdown.get("read", 0.0) - breakdown.get("merge", 0.0)
    parts = ", ".join(f"{k} {v:.2f} s" for k, v in breakdown.items())
    print(
        "lorasave gguf breakdown (median of its lorasave.json timings; merge includes the q8_0 encoding; write and hash run on a"
        f" writer thread, overlapped with read + merge): {parts or 'none reported'}; wall {a.wall_s:.2f} s"
    )
    print(f"load average after: {load_average()}")
    results = {
        "model": shape_name,
        "base_bytes": base_bytes,
        "type": GGUF_TYPE,
        "runs": args.runs,
        "tools": {
            k: {"label": t.label, "commands": t.commands, "wall_s_median": t.wall_s, "peak_rss_mib_median": t.peak_rss_mib, "runs": [asdict(r) for r in t.runs]}
            for k, t in (("a", a), ("b", b))
        },
        "ratios": {"b_over_a_wall": speedup, "b_over_a_peak_rss": rss_ratio},
        "targets": {"speedup": ok_speed, "a_peak_rss": ok_rss},
        "lorasave_breakdown_median_s": breakdown,
        "load_average": os.getloadavg(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    path = args.workdir / ("results-gguf-small.json" if args.small else "results-gguf.json")
    path.write_text(json.dumps(results, indent=2))
    print(f"all targets met: {ok_speed and ok_rss}")
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
