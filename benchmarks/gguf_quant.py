"""Benchmark ``lorasave gguf --type q4_k_m`` (k-quants in the stream) against the two-pass paths.

Run::

    python benchmarks/gguf_quant.py [--workdir DIR] [--runs 3] [--small] [--threads N] [--tools abcd]
                                    [--converter-dir DIR]

It uses the base + adapter of ``benchmarks/merge.py`` (built once, cached in ``--workdir``,
default ``/tmp/lorasave-bench``: a random bf16 Llama of ~1.1B parameters in two shards and an r=16
LoRA; ``--small``: the ~20M-parameter one) and the byte-level BPE tokenizer of
``benchmarks/gguf.py`` (``WORKDIR/tokenizer-bpe``), which every tool gets. The k-quant steps need
the llama.cpp runtime (``lorasave install-llama-cpp``).

Tools, each a sequence of subprocesses, all with the same thread count (``--threads``, default the
machine's cores):

  (a)  ``lorasave gguf BASE ADAPTER --type q4_k_m`` (every block encoded by ggml_quantize_chunk in
       the pass, no intermediate file)
  (b)  the two-pass path: ``lorasave gguf --type f16`` to a file, then ``llama_model_quantize``
       q4_k_m on it (``lorasave.runtimes.llama_cpp.lib.quantize``)
  (c)  Unsloth's path on CPU: ``lorasave merge`` (bf16 checkpoint), then llama.cpp v0.5.0's own
       ``convert_hf_to_gguf.py --outtype bf16`` in its own venv, then ``llama_model_quantize`` q4_k_m
  (d1) the ladder in one pass: ``lorasave gguf --type q8_0,q6_k,q5_k_m,q4_k_m``
  (d4) the same four types as four ``lorasave gguf --type X`` runs

The converter of (c) is llama.cpp v0.5.0's, from the git bundle of the npm package
``node-llama-cpp@3.22.1``, in its own venv with its own requirements (torch 2.11.0, transformers
4.57.6, ...) and gguf-py: ``lorasave install-llama-cpp --converter``
(``lorasave.runtimes.llama_cpp.converter``), installed once when missing (``--converter-dir``).

Timing is that of merge.py: every command under ``/usr/bin/time -f %M`` (peak RSS), one untimed
warm-up per tool, the runs going round the tools in turn, the median of ``--runs``; a tool's wall is
the sum of its steps, its peak RSS the largest. Peak extra disk: every tool writes only below its
own folder (``TMPDIR`` points there too), and a thread sums the sizes of the files below it every
0.1 s while the tool runs; "temporary" is that peak less the tool's deliverables at the end (the
q4_k_m file(s), plus README/lorasave.json for lorasave's folders; the 16-bit GGUF of (b), the merged
checkpoint and bf16 GGUF of (c) count as temporary). Outputs are
deleted and ``sync`` run between runs, outside the timed region. Targets: (a) at least 3x faster
than (c), no temporary file and peak RSS <= 1.5 GiB; (d1) <= 1.6x the wall of (a). Results, raw runs
included, go to ``WORKDIR/results-gguf-quant.json`` (``-small`` with ``--small``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# benchmarks/gguf.py would shadow the gguf package: keep this folder off sys.path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
_spec = importlib.util.spec_from_file_location("bench_pipeline", HERE / "pipeline.py")
assert _spec is not None and _spec.loader is not None
bench_pipeline = importlib.util.module_from_spec(_spec)
sys.modules["bench_pipeline"] = bench_pipeline
_spec.loader.exec_module(bench_pipeline)
bench_gguf = bench_pipeline._load("bench_gguf", HERE / "gguf.py")  # puts scripts/ on sys.path
bench_merge = bench_pipeline.bench_merge
Command, Step, load_average = bench_pipeline.Command, bench_pipeline.Step, bench_pipeline.load_average
from gguf_equivalence import SHIM, ensure_converter  # noqa: E402

from lorasave.runtimes.llama_cpp.converter import Converter  # noqa: E402

QUANT_TYPE = "q4_k_m"
LADDER = ["q8_0", "q6_k", "q5_k_m", "q4_k_m"]
CONVERTER_OUTTYPE = "bf16"
TARGET_C_OVER_A = 3.0  # (c) wall / (a) wall >= this
TARGET_RSS_MIB = 1.5 * 1024
TARGET_LADDER = 1.6  # (d1) wall / (a) wall <= this
TEMP_TOLERANCE = 1 << 20  # bytes: "no temporary file" = peak - deliverables below this
# The two-pass path's second step, llama.cpp's llama_model_quantize through lorasave's ctypes wrapper.
QUANTIZE_SCRIPT = (
    "import sys\nfrom lorasave.runtimes.llama_cpp.lib import quantize\nquantize(sys.argv[1], sys.argv[2], sys.argv[3], nthread=int(sys.argv[4]))\n"
)


# --------------------------------------------------------------------------- running


class DiskPeak:
    """The largest total size (bytes, ``st_size``) of the files below ``folder`` while in use.

    A thread walks ``folder`` every ``interval`` seconds; ``final`` is the size at exit.
    """

    def __init__(self, folder: Path, interval: float = 0.1) -> None:
        self.folder, self.interval = folder, interval
        self.peak = self.final = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def size(self) -> int:
        total = 0
        for root, _, files in os.walk(self.folder):
            for name in files:
                with contextlib.suppress(FileNotFoundError):  # renamed or deleted since the listing
                    total += os.lstat(os.path.join(root, name)).st_size
        return total

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.size())

    def __enter__(self) -> DiskPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.final = self.size()
        self.peak = max(self.peak, self.final)


@dataclass
class Run:
    """One timed run of a tool: its steps and the disk used below its folder."""

    steps: list[Step]
    peak_disk_bytes: int
    output_bytes: int  # the tool's deliverables (the quantized files) at the end

    def summary(self) -> str:
        steps = " + ".join(f"{s.wall_s:.2f}" for s in self.steps) if len(self.steps) > 1 else ""
        rss, mib = max(s.peak_rss_mib for s in self.steps), 2**20
        disk = f"disk peak {self.peak_disk_bytes / mib:.0f} MiB (output {self.output_bytes / mib:.0f})"
        return f"{sum(s.wall_s for s in self.steps):8.2f} s {steps}  {rss:8.1f} MiB  {disk}"


@dataclass
class Tool:
    key: str
    label: str
    commands: list[Command]
    folder: Path
    deliverables: list[Path]  # what the user keeps; the rest of the folder's peak is temporary
    runs: list[Run] = field(default_factory=list)

    def median(self, value: Any) -> float:
        return float(statistics.median(value(r) for r in self.runs))

    @property
    def wall_s(self) -> float:
        return self.median(lambda r: sum(s.wall_s for s in r.steps))

    @property
    def peak_rss_mib(self) -> float:
        return self.median(lambda r: max(s.peak_rss_mib for s in r.steps))

    @property
    def peak_disk(self) -> float:
        return self.median(lambda r: r.peak_disk_bytes)

    @property
    def temporary(self) -> float:
        return self.median(lambda r: r.peak_disk_bytes - r.output_bytes)

    @property
    def output(self) -> float:
        return self.median(lambda r: r.output_bytes)


def run_tool(tool: Tool) -> Run:
    bench_merge.remove(tool.folder)
    tool.folder.mkdir(parents=True)
    steps = []
    tempfile.gettempdir()  # fixed for this process (merge.timed's files) before TMPDIR changes for the children
    os.environ["TMPDIR"] = str(tool.folder)  # a temporary file in a tool's TMPDIR counts as its disk
    try:
        with DiskPeak(tool.folder) as disk:
            for cmd in tool.commands:
                if cmd.outputs:  # a lorasave command: JSON on stdout, timings per output
                    steps.append(bench_pipeline.run_command(cmd, tool.label))
                else:
                    wall, rss, _ = bench_merge.timed(cmd.argv, f"{tool.label} / {cmd.name}")
                    steps.append(Step(wall, rss, {}))
    finally:
        os.environ.pop("TMPDIR", None)
    output = sum(bench_merge.dir_size(p) if p.is_dir() else p.stat().st_size for p in tool.deliverables)
    bench_merge.remove(tool.folder)
    return Run(steps, disk.peak, output)


def make_tools(tools: str, base: Path, adapter: Path, tok: Path, conv: Converter | None, root: Path, threads: int) -> list[Tool]:
    ls = [*bench_merge.lorasave_command()]
    flags = ["--tokenizer", str(tok), "--threads", str(threads), "--name", "bench", "--overwrite", "--json", "--quiet"]

    def gguf(name: str, dest: Path, types: str) -> Command:
        return Command(name, [*ls, "gguf", str(base), str(adapter), "-o", str(dest), "--type", types, *flags], {name: dest})

    def quantize(src: Path, dst: Path) -> Command:
        return Command(f"llama_model_quantize {QUANT_TYPE}", [sys.executable, "-c", QUANTIZE_SCRIPT, str(src), str(dst), QUANT_TYPE, str(threads)], {})

    result = []
    if "a" in tools:
        result.append(
            Tool("a", f"(a) lorasave gguf {QUANT_TYPE}", [gguf(f"gguf {QUANT_TYPE}", root / "a" / "out", QUANT_TYPE)], root / "a", [root / "a" / "out"])
        )
    if "b" in tools:
        f16, dst = root / "b" / "f16", root / "b" / f"bench-{QUANT_TYPE}.gguf"
        steps = [gguf("gguf f16", f16, "f16"), quantize(f16 / "bench-f16.gguf", dst)]
        result.append(Tool("b", "(b) gguf f16 + quantize", steps, root / "b", [dst]))
    if "c" in tools:
        assert conv is not None
        merged, bf16, dst = root / "c" / "merged", root / "c" / f"bench-{CONVERTER_OUTTYPE}.gguf", root / "c" / f"bench-{QUANT_TYPE}.gguf"
        merge = [*ls, "merge", str(base), str(adapter), "-o", str(merged), *flags[:4], "--overwrite", "--json", "--quiet"]
        convert = conv.command(merged, bf16, CONVERTER_OUTTYPE, prelude=SHIM)
        steps = [Command("lorasave merge", merge, {"merge": merged}), Command(f"convert_hf_to_gguf {CONVERTER_OUTTYPE}", convert, {}), quantize(bf16, dst)]
        result.append(Tool("c", "(c) merge + convert + quantize", steps, root / "c", [dst]))
    if "d" in tools:
        ladder = ",".join(LADDER)
        result.append(Tool("d1", "(d1) ladder, one pass", [gguf("gguf ladder", root / "d1" / "out", ladder)], root / "d1", [root / "d1"]))
        result.append(Tool("d4", "(d4) ladder, 4 runs", [gguf(f"gguf {t}", root / "d4" / t, t) for t in LADDER], root / "d4", [root / "d4"]))
    return result


def run_benchmark(tools: list[Tool], runs: int) -> None:
    for tool in tools:
        print(f"warm-up {tool.label} ...", flush=True)
        run_tool(tool)
    for i in range(runs):  # interleaved, so that drift affects every tool alike
        for tool in tools:
            tool.runs.append(run_tool(tool))
            print(f"run {i + 1}/{runs} {tool.label:<32} {tool.runs[-1].summary()}  load {load_average()}", flush=True)


# --------------------------------------------------------------------------- report


def check(out: dict[str, Any], name: str, text: str, ok: bool) -> None:
    out["targets"][name] = ok
    print(f"{text:<88}{bench_merge.verdict(ok)}")


def report(tools: list[Tool], info: dict[str, Any], path: Path) -> None:
    mib = 2**20  # MiB
    print()
    print(f"model {info['model']}: base {info['base_bytes'] / 2**30:.2f} GiB bf16, adapter r={bench_merge.LORA_R}; tokenizer {info['tokenizer']}")
    print(f"cpus {info['cpus']}, threads {info['threads']}; median of {info['runs']} warm run(s); converter: {info['converter']}")
    print(f"load average before {info['load_before']}, after {load_average()} (other work on the machine makes wall times noisy)")
    print()
    print("| tool | wall s | peak RSS MiB | peak extra disk MiB | temporary MiB | output MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    out: dict[str, Any] = {**info, "tools": {}, "ratios": {}, "targets": {}}
    for tool in tools:
        disk = f"{tool.peak_disk / mib:.0f} | {tool.temporary / mib:.0f} | {tool.output / mib:.0f}"
        print(f"| {tool.label} | {tool.wall_s:.2f} | {tool.peak_rss_mib:.0f} | {disk} |")
        steps = []
        for i, cmd in enumerate(tool.commands):
            wall = statistics.median(r.steps[i].wall_s for r in tool.runs)
            rss = statistics.median(r.steps[i].peak_rss_mib for r in tool.runs)
            timings = bench_pipeline.median_timings(bench_pipeline.Tool(tool.key, tool.label, tool.commands, [r.steps for r in tool.runs]), i)
            if len(tool.commands) > 1:
                print(f"| &nbsp;&nbsp;{cmd.name} | {wall:.2f} | {rss:.0f} | | | |")
            steps.append({"name": cmd.name, "argv": cmd.argv, "wall_s_median": wall, "peak_rss_mib_median": rss, "timings_median_s": timings})
        out["tools"][tool.key] = {
            "label": tool.label,
            "wall_s_median": tool.wall_s,
            "peak_rss_mib_median": tool.peak_rss_mib,
            "peak_disk_bytes_median": tool.peak_disk,
            "temporary_bytes_median": tool.temporary,
            "output_bytes_median": tool.output,
            "steps": steps,
            "runs": [asdict(r) for r in tool.runs],
        }
    print()
    by = {t.key: t for t in tools}
    a, b, c, d1, d4 = (by.get(k) for k in ("a", "b", "c", "d1", "d4"))
    if a and b:
        out["ratios"]["b_over_a"] = b.wall_s / a.wall_s
        print(f"b/a wall = {b.wall_s / a.wall_s:.2f}x (no target)")
    if a and c:
        ratio = out["ratios"]["c_over_a"] = c.wall_s / a.wall_s
        check(out, "a_3x_faster_than_c", f"c/a wall = {ratio:.2f}x   target >= {TARGET_C_OVER_A:g}x", ratio >= TARGET_C_OVER_A)
    if a:
        check(out, "a_no_temporary_file", f"a temporary disk = {a.temporary / mib:.1f} MiB (peak - output)   target < 1 MiB", a.temporary < TEMP_TOLERANCE)
        check(out, "a_peak_rss", f"a peak RSS = {a.peak_rss_mib:.0f} MiB   target <= {TARGET_RSS_MIB:.0f} MiB", a.peak_rss_mib <= TARGET_RSS_MIB)
    if a and d1:
        ratio = out["ratios"]["d1_over_a"] = d1.wall_s / a.wall_s
        check(
            out,
            "ladder_le_1.6x_one_type",
            f"d1/a wall = {ratio:.2f}x (4 types, one pass / {QUANT_TYPE} alone)   target <= {TARGET_LADDER:g}x",
            ratio <= TARGET_LADDER,
        )
    if d1 and d4:
        out["ratios"]["d4_over_d1"] = d4.wall_s / d1.wall_s
        print(f"d4/d1 wall = {d4.wall_s / d1.wall_s:.2f}x (4 runs vs one pass; no target)")
    # The tools of one round ran minutes apart, those of different rounds up to an hour: on a shared
    # machine the ratio within each round is the steadier figure.
    out["ratios_per_round"] = {}
    for x, y in ((b, a), (c, a), (d1, a), (d4, d1)):
        if x and y:
            per = [sum(s.wall_s for s in rx.steps) / sum(s.wall_s for s in ry.steps) for rx, ry in zip(x.runs, y.runs, strict=True)]
            out["ratios_per_round"][f"{x.key}_over_{y.key}"] = per
            print(f"{x.key}/{y.key} wall per round: {' '.join(f'{v:.2f}' for v in per)} (median {statistics.median(per):.2f})")
    print()
    print("lorasave's own timings (median s, from each output's lorasave.json; read + merge run on the main thread or the")
    print("merge pool, merge includes the ggml encoding, write + hash on a writer thread overlapped with them):")
    for tool in tools:
        for step in out["tools"][tool.key]["steps"]:
            for name, t in step["timings_median_s"].items():
                print(f"  {tool.key:<3} {name:<16} {bench_pipeline.phase_text(t)}")
    met = all(out["targets"].values())
    out.update(all_targets_met=met, load_average_after=load_average(), time=time.strftime("%Y-%m-%d %H:%M:%S"))
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"all targets met: {met}")
    print(f"results written to {path}")


def main() -> None:
    parser = bench_merge.bench_parser(__doc__)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for every tool (default: the cores)")
    parser.add_argument("--tools", default="abcd", help="which of a (streamed), b (f16 + quantize), c (Unsloth's path), d (ladder) to run")
    parser.add_argument("--converter-dir", type=Path, default=None, help="llama.cpp's converter (default: lorasave's, installed when missing)")
    args = parser.parse_args()
    if args.threads < 1:
        sys.exit("--threads must be >= 1")
    if not args.tools or set(args.tools) - set("abcd"):
        sys.exit(f"--tools takes letters from abcd, got {args.tools!r}")
    shape_name = bench_merge.bench_setup(args)
    base, adapter = bench_merge.build_fixture(args.workdir, shape_name)
    tok = bench_gguf.build_tokenizer(args.workdir, json.loads((base / "config.json").read_text())["vocab_size"])
    conv, versions = None, "not run"
    if "c" in args.tools:
        conv = ensure_converter(args.converter_dir)
        versions = f"{conv.source / 'convert_hf_to_gguf.py'} ({conv.versions()})"
        os.environ["LORASAVE_FALLBACK_PRE"] = "gpt-2"  # the shim's tokenizer.ggml.pre for the trained BPE: lorasave's
        os.environ.pop("NO_LOCAL_GGUF", None)
    tools = make_tools(args.tools, base, adapter, tok, conv, args.workdir / "gguf-quant" / shape_name, args.threads)
    info = {
        "model": shape_name,
        "base_bytes": bench_merge.safetensors_bytes(base),
        "tokenizer": str(tok),
        "runs": args.runs,
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "converter": versions,
        "load_before": load_average(),
    }
    run_benchmark(tools, args.runs)
    report(tools, info, args.workdir / ("results-gguf-quant-small.json" if args.small else "results-gguf-quant.json"))


if __name__ == "__main__":
    main()
