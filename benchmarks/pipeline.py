"""Benchmark one pass over a base (``lorasave batch``, ``--threads``) against separate runs.

Run::

    python benchmarks/pipeline.py [--workdir DIR] [--runs 3] [--small] [--cases abc]

It uses the base + adapter of ``benchmarks/merge.py`` (built once, cached in ``--workdir``,
default ``/tmp/lorasave-bench``: a random bf16 Llama of ~1.1B parameters in two shards and an
r=16 LoRA; ``--small``: the ~20M-parameter one) and the byte-level BPE tokenizer of
``benchmarks/gguf.py`` (GGUF needs one; every command of case a gets it with ``--tokenizer``).

Cases, each a tool against its reference, ratio = tool wall / reference wall:

  (a) ``lorasave batch JOBS`` with one job writing safetensors + GGUF ``[q8_0, q4_k_m]`` against
      ``lorasave merge`` + ``lorasave gguf --type q8_0`` + ``lorasave gguf --type q4_k_m`` run in
      sequence (wall = sum, peak RSS = the largest; each step is reported too). Target <= 0.5.
  (b) ``lorasave batch JOBS`` with 8 jobs (8 adapter "checkpoints": the fixture adapter with its
      ``lora_B`` scaled by 1..8, cached in ``WORKDIR/<model>/adapters-x8``), each to safetensors,
      against 8 ``lorasave merge`` runs in sequence. Target <= 0.35.
  (c) ``lorasave merge --threads 2`` against ``--threads 1``. Target <= 1 (2 threads not slower).

The comparison with the transformers + PEFT reference is ``python benchmarks/merge.py --runs 3``.

Timing as in merge.py: every command is its own subprocess under ``/usr/bin/time -f %M`` (peak
RSS), each tool gets one untimed warm-up (base in the page cache), the runs go round all the
tools in turn and the median of ``--runs`` is reported; outputs are deleted and ``sync`` run
between runs, outside the timed region. lorasave's ``timings`` (read/merge/write/hash seconds, per
output: from ``--json``, else the output's ``lorasave.json``) are reported per step. It prints a
table and writes every raw run to ``WORKDIR/pipeline-results.json`` (``pipeline-results-small.json``
with ``--small``).
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
# benchmarks/gguf.py would shadow the gguf package: keep this folder off sys.path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bench_merge = _load("bench_merge", HERE / "merge.py")
build_fixture, lorasave_command = bench_merge.build_fixture, bench_merge.lorasave_command
parse_json_stdout, remove, timed, verdict = bench_merge.parse_json_stdout, bench_merge.remove, bench_merge.timed, bench_merge.verdict

N_ADAPTERS = 8
GGUF_TYPES = ["q8_0", "q4_k_m"]
PHASES = ("read", "merge", "write", "hash")


@dataclass
class Command:
    """One subprocess of a tool: ``outputs`` (name -> folder) are where its timings are read."""

    name: str
    argv: list[str]
    outputs: dict[str, Path]


@dataclass
class Step:
    """One timed subprocess: wall, peak RSS and lorasave's timings per output."""

    wall_s: float
    peak_rss_mib: float
    timings: dict[str, dict[str, float]]
    passes: int | None = None  # lorasave batch: passes over the base


@dataclass
class Tool:
    key: str
    label: str
    commands: list[Command]
    runs: list[list[Step]] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return statistics.median(sum(s.wall_s for s in run) for run in self.runs)

    @property
    def peak_rss_mib(self) -> float:
        return statistics.median(max(s.peak_rss_mib for s in run) for run in self.runs)

    def outputs(self) -> list[Path]:
        return [p for c in self.commands for p in c.outputs.values()]


@dataclass
class Case:
    key: str
    title: str
    tool: Tool
    reference: Tool
    target: float

    @property
    def ratio(self) -> float:
        return self.tool.wall_s / self.reference.wall_s


# --------------------------------------------------------------------------- fixtures


def build_adapters(adapter: Path, n: int = N_ADAPTERS) -> list[Path]:
    """``n`` copies of ``adapter`` with ``lora_B`` scaled by 1..n (cached beside the fixture)."""
    root = adapter.parent / f"adapters-x{n}"
    dirs = [root / f"checkpoint-{k}" for k in range(1, n + 1)]
    marker = root / "READY.json"
    stamp = {"n": n, "fixture_marker_mtime": (adapter.parent / "READY.json").stat().st_mtime}
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return dirs
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    shutil.rmtree(root, ignore_errors=True)
    weights = adapter / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(weights)
    for k, d in enumerate(dirs, start=1):
        shutil.copytree(adapter, d)
        scaled = {name: t * k if "lora_B" in name else t for name, t in tensors.items()}
        save_file(scaled, d / "adapter_model.safetensors", metadata=metadata)
    marker.write_text(json.dumps(stamp))
    print(f"built {n} adapter checkpoints (lora_B x 1..{n}) in {root}", flush=True)
    return dirs


def build_tokenizer(workdir: Path, base: Path) -> Path:
    """benchmarks/gguf.py's tokenizer (loaded only when case a runs: it imports the GGUF tooling)."""
    bench_gguf = _load("bench_gguf", HERE / "gguf.py")
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    path: Path = bench_gguf.build_tokenizer(workdir, vocab)
    return path


def write_jobs(path: Path, base: Path, jobs: list[dict[str, Any]]) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"base": str(base), "jobs": jobs}, sort_keys=False))
    return path


# --------------------------------------------------------------------------- tools


def make_cases(cases: str, base: Path, adapter: Path, workdir: Path, root: Path) -> list[Case]:
    """The tools of each selected case; JOBS files go in ``root``, outputs in ``root/out``."""
    ls = lorasave_command()
    flags = ["--overwrite", "--json", "--quiet"]
    out = root / "out"

    def merge(name: str, ad: Path, dest: Path, *extra: str) -> Command:
        return Command(name, [*ls, "merge", str(base), str(ad), "-o", str(dest), *extra, *flags], {name: dest})

    def batch(name: str, jobs_file: Path, outputs: dict[str, Path]) -> Command:
        return Command(name, [*ls, "batch", str(jobs_file), *flags], outputs)

    result: list[Case] = []
    if "a" in cases:
        tok = build_tokenizer(workdir, base)
        st, gg = out / "a-batch" / "ck", out / "a-batch" / "ck-gguf"
        jobs = write_jobs(
            root / "jobs-a.yaml",
            base,
            [
                {
                    "adapters": [str(adapter)],
                    "outputs": [
                        {"format": "safetensors", "path": str(st.relative_to(root)), "tokenizer": str(tok)},
                        {"format": "gguf", "types": GGUF_TYPES, "path": str(gg.relative_to(root)), "tokenizer": str(tok)},
                    ],
                }
            ],
        )
        one_pass = Tool("a1", "batch: safetensors+q8_0+q4_k_m", [batch("batch", jobs, {"safetensors": st, "gguf": gg})])
        seq = [merge("merge", adapter, out / "a-seq" / "merged", "--tokenizer", str(tok))]
        for t in GGUF_TYPES:
            dest = out / "a-seq" / f"gguf-{t}"
            argv = [*ls, "gguf", str(base), str(adapter), "-o", str(dest), "--type", t, "--tokenizer", str(tok), *flags]
            seq.append(Command(f"gguf {t}", argv, {f"gguf {t}": dest}))
        result.append(Case("a", "3 outputs, one pass vs 3 runs", one_pass, Tool("a0", "merge; gguf q8_0; gguf q4_k_m", seq), 0.5))
    if "b" in cases:
        adapters = build_adapters(adapter)
        dests = {f"ck{k}": out / "b-batch" / f"ck{k}" for k in range(1, len(adapters) + 1)}
        pairs = zip(adapters, dests.values(), strict=True)
        entries = [{"adapters": [str(a)], "outputs": [{"format": "safetensors", "path": str(d.relative_to(root))}]} for a, d in pairs]
        jobs = write_jobs(root / "jobs-b.yaml", base, entries)
        one_pass = Tool("b1", f"batch: {len(adapters)} jobs -> safetensors", [batch("batch", jobs, dests)])
        seq = [merge(f"merge ck{k}", a, out / "b-seq" / f"ck{k}") for k, a in enumerate(adapters, start=1)]
        result.append(Case("b", f"{len(adapters)} adapters, one pass vs {len(adapters)} runs", one_pass, Tool("b0", f"{len(adapters)} x merge", seq), 0.35))
    if "c" in cases:
        two = Tool("c2", "merge --threads 2", [merge("merge", adapter, out / "c-threads2", "--threads", "2")])
        one = Tool("c1", "merge --threads 1", [merge("merge", adapter, out / "c-threads1", "--threads", "1")])
        result.append(Case("c", "merge, 2 threads vs 1", two, one, 1.0))
    return result


def output_timings(dest: Path, reported: dict[str, Any] | None) -> dict[str, float]:
    """lorasave's timings of one output: from the ``--json`` result, else the output's lorasave.json."""
    if reported and isinstance(reported.get("timings"), dict):
        return dict(reported["timings"])
    manifest = dest / "lorasave.json"
    if manifest.is_file():
        return dict(json.loads(manifest.read_text()).get("result", {}).get("timings") or {})
    return {}


def run_command(cmd: Command, label: str) -> Step:
    wall, rss, stdout = timed(cmd.argv, f"{label} / {cmd.name}")  # raises on a non-zero exit
    data = parse_json_stdout(stdout)
    if "outputs" in data:  # lorasave batch
        if not data.get("ok") or any(not o.get("ok") for o in data["outputs"]):
            raise RuntimeError(f"{label}: batch reported failed outputs: {json.dumps(data)[:2000]}")
        by_path = {os.path.realpath(o["path"]): o.get("result") for o in data["outputs"]}
        timings = {n: output_timings(p, by_path.get(os.path.realpath(p))) for n, p in cmd.outputs.items()}
        return Step(wall, rss, timings, data.get("passes"))
    return Step(wall, rss, {n: output_timings(p, data) for n, p in cmd.outputs.items()})


def run_tool(tool: Tool) -> list[Step]:
    steps = [run_command(cmd, tool.label) for cmd in tool.commands]
    for dest in tool.outputs():
        remove(dest)
    return steps


def run_benchmark(tools: list[Tool], runs: int) -> None:
    for tool in tools:
        for dest in tool.outputs():
            remove(dest)
        print(f"warm-up {tool.label} ...", flush=True)
        run_tool(tool)
    for i in range(runs):  # interleaved, so that drift affects every tool alike
        for tool in tools:
            steps = run_tool(tool)
            tool.runs.append(steps)
            parts = " + ".join(f"{s.wall_s:.2f}" for s in steps) if len(steps) > 1 else ""
            print(
                f"run {i + 1}/{runs} {tool.label:<32} {sum(s.wall_s for s in steps):8.2f} s {parts}"
                f"  {max(s.peak_rss_mib for s in steps):8.1f} MiB  load {load_average()}",
                flush=True,
            )


# --------------------------------------------------------------------------- report


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def median_timings(tool: Tool, i: int) -> dict[str, dict[str, float]]:
    """Median over the runs of each output's phase seconds, for step ``i``."""
    result: dict[str, dict[str, float]] = {}
    for name in tool.commands[i].outputs:
        per: dict[str, float] = {}
        for phase in PHASES:
            values = [run[i].timings.get(name, {}).get(phase) for run in tool.runs]
            nums = [float(v) for v in values if isinstance(v, (int, float))]
            if nums:
                per[phase] = statistics.median(nums)
        result[name] = per
    return result


def phase_text(t: dict[str, float]) -> str:
    return ", ".join(f"{k} {t[k]:.2f}" for k in PHASES if k in t) or "no timings reported"


def print_phases(tool: Tool) -> dict[str, Any]:
    """Per step: median wall, peak RSS and lorasave's timings per output; returns them."""
    print(f"{tool.key} {tool.label}: wall {tool.wall_s:.2f} s, peak RSS {tool.peak_rss_mib:.1f} MiB")
    steps = []
    for i, cmd in enumerate(tool.commands):
        wall = statistics.median(run[i].wall_s for run in tool.runs)
        rss = statistics.median(run[i].peak_rss_mib for run in tool.runs)
        timings = median_timings(tool, i)
        passes = tool.runs[-1][i].passes
        print(f"  {cmd.name:<14} {wall:8.2f} s {rss:9.1f} MiB" + (f"   ({passes} pass(es) over the base)" if passes is not None else ""))
        for name, t in timings.items():
            print(f"    {name:<12} {phase_text(t)}")
        if len(timings) > 1:
            totals = {k: sum(t.get(k, 0.0) for t in timings.values()) for k in PHASES}
            print(f"    {'sum':<12} {phase_text(totals)}")
        steps.append({"name": cmd.name, "wall_s_median": wall, "peak_rss_mib_median": rss, "timings_median_s": timings, "passes": passes})
    return {"steps": steps}


def report(cases: list[Case], shape_name: str, base: Path, runs: int, load_before: str, path: Path) -> None:
    base_bytes = bench_merge.safetensors_bytes(base)
    print()
    print(f"model {shape_name}: base {base_bytes / 2**30:.2f} GiB bf16, adapter r={bench_merge.LORA_R}; median of {runs} warm run(s); cpus {os.cpu_count()}")
    print(f"load average before {load_before}, after {load_average()} (other work on the machine makes wall times noisy)")
    print()
    print(f"{'case':<5}{'tool':<34}{'wall s':>9}{'peak RSS MiB':>14}{'ratio':>8}{'target':>9}  result")
    out: dict[str, Any] = {"model": shape_name, "base_bytes": base_bytes, "runs": runs, "cpus": os.cpu_count(), "cases": {}}
    for case in cases:
        ok = case.ratio <= case.target
        for tool, ratio, target, result in ((case.tool, f"{case.ratio:.3f}", f"<= {case.target:g}", verdict(ok)), (case.reference, "ref", "", "")):
            print(f"({case.key}){'':<2}{tool.label:<34}{tool.wall_s:>9.2f}{tool.peak_rss_mib:>14.1f}{ratio:>8}{target:>9}  {result}")
        out["cases"][case.key] = {"title": case.title, "ratio": case.ratio, "target": case.target, "pass": ok}
    print("ratio = tool wall / reference wall (the row below it)")
    print()
    print("per step: median wall, peak RSS; lorasave timings per output (median s; phases run on overlapping threads, they do not add up to wall)")
    for case in cases:
        for tool in (case.tool, case.reference):
            phases = print_phases(tool)
            out["cases"][case.key][tool.key] = {
                "label": tool.label,
                "commands": [asdict(c) for c in tool.commands],
                "wall_s_median": tool.wall_s,
                "peak_rss_mib_median": tool.peak_rss_mib,
                **phases,
                "runs": [[asdict(s) for s in run] for run in tool.runs],
            }
    print()
    print("reference comparison (transformers + PEFT, cat): python benchmarks/merge.py --runs 3")
    met = all(c["pass"] for c in out["cases"].values())
    out.update(all_targets_met=met, load_average_before=load_before, load_average_after=load_average(), time=time.strftime("%Y-%m-%d %H:%M:%S"))
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"all targets met: {met}")
    print(f"results written to {path}")


def main() -> None:
    parser = bench_merge.bench_parser(__doc__)
    parser.add_argument("--cases", default="abc", help="which of a (3 outputs), b (8 adapters), c (threads) to run")
    args = parser.parse_args()
    if not args.cases or set(args.cases) - set("abc"):
        sys.exit(f"--cases takes letters from abc, got {args.cases!r}")
    shape_name = bench_merge.bench_setup(args)
    base, adapter = build_fixture(args.workdir, shape_name)
    root = args.workdir / "pipeline" / shape_name
    cases = make_cases(args.cases, base, adapter, args.workdir, root)
    load_before = load_average()
    run_benchmark([t for c in cases for t in (c.tool, c.reference)], args.runs)
    name = "pipeline-results-small.json" if args.small else "pipeline-results.json"
    report(cases, shape_name, base, args.runs, load_before, args.workdir / name)


if __name__ == "__main__":
    main()
