"""``lorasave batch JOBS``: many jobs, many outputs; jobs that share a base run in one pass over it.

A JOBS file (YAML or JSON) lists jobs; a job is adapters + merge options + outputs::

    base: path/or/hub-id          # default for jobs that name none
    jobs:
      - adapters: [runs/checkpoint-500]
        outputs:
          - {format: safetensors, path: out/ck500, dtype: bfloat16}
          - {format: gguf, types: [q8_0, q4_k_m], path: out/ck500-gguf}
      - adapters: [runs/checkpoint-1000]
        outputs: [{format: safetensors, path: out/ck1000}]

Each output is planned by its command's own plan function (``outputs.FORMATS``), so its files are
the single command's; the jobs of one base (at most ``max_jobs_per_pass`` at a time) are written
by one ``pipeline.run.run_outputs``: each base tensor read once, merged once per job, handed to
every writer of the job. Every output is atomic on its own; a job or output that fails is
reported and the others go on. Relative paths in JOBS are relative to the JOBS file's folder, never
to the current folder; a base or adapter that is no folder there may be a Hub id in the local cache.
A job with no ``base`` (and no top-level one) takes the base its adapters name in
``adapter_config.json`` (``sources.named_base``: as PEFT resolves ``base_model_name_or_path``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorasave.errors import InvalidOptionError, LorasaveError
from lorasave.outputs import FORMATS, check_options, plan_output
from lorasave.pipeline.run import PlannedOutput, run_outputs

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: JOBS files larger than this (bytes) are refused before they are parsed.
MAX_JOBS_FILE_BYTES = 4 << 20
#: At most this many jobs in one file, and outputs and adapters in one job (YAML aliases can multiply lists).
MAX_JOBS = 10_000
MAX_OUTPUTS_PER_JOB = 64
MAX_ADAPTERS_PER_JOB = 64
#: At most this many outputs in one file.
MAX_OUTPUTS = 10_000
_JOB_KEYS = {"base", "adapters", "weights", "outputs"}
#: Output options that name folders or files (resolved beside JOBS like every other relative path).
PATH_OPTIONS = {"tokenizer", "quantization_from", "imatrix"}


@dataclass(frozen=True)
class OutputSpec:
    """One output of a job: ``format`` (a key of ``outputs.FORMATS``), ``path`` and that command's options."""

    format: str
    path: Path
    options: dict[str, Any]


@dataclass(frozen=True)
class JobSpec:
    """One job: a base, its adapters, merge weights and outputs."""

    index: int
    base: str
    adapters: list[str]
    weights: list[float] | None
    outputs: list[OutputSpec]


@dataclass
class OutputOutcome:
    """What became of one output of a batch: ``result`` (the command's result) or ``error``."""

    job: int
    format: str
    path: Path
    result: Any = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.result is not None

    @property
    def message(self) -> str:
        """The one-line error of a failed output."""
        return _message(self.error)


@dataclass
class BatchResult:
    """What ``run_batch`` did.

    Attributes:
        outputs: every output of every job, in JOBS order.
        passes: number of passes over a base (one per base and ``max_jobs_per_pass`` jobs).
    """

    outputs: list[OutputOutcome] = field(default_factory=list)
    passes: int = 0

    @property
    def failed(self) -> list[OutputOutcome]:
        return [o for o in self.outputs if not o.ok]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``--json``)."""
        return {
            "passes": self.passes,
            "ok": not self.failed,
            "outputs": [
                {
                    "job": o.job + 1,
                    "format": o.format,
                    "path": str(o.path),
                    "ok": o.ok,
                    **({"result": o.result.to_dict()} if o.ok else {"error": _message(o.error)}),
                }
                for o in self.outputs
            ],
        }

    def summary(self) -> str:
        """One line per output, then a total."""
        lines = [f"job {o.job + 1} {o.format} {o.path}: " + (f"ok ({o.result.summary()})" if o.ok else f"FAILED: {_message(o.error)}") for o in self.outputs]
        n_ok = len(self.outputs) - len(self.failed)
        failed = f"; {len(self.failed)} failed" if self.failed else ""
        lines.append(f"{n_ok} of {len(self.outputs)} outputs written in {self.passes} pass(es) over the base(s){failed}")
        return "\n".join(lines)


def _message(e: BaseException | None) -> str:
    from lorasave.util.hints import missing_package_message

    if isinstance(e, ModuleNotFoundError):
        return missing_package_message(e)
    return "no result" if e is None else str(e) if isinstance(e, LorasaveError) else f"{type(e).__name__}: {e}"


def load_jobs(path: PathLike) -> list[JobSpec]:
    """Read and check a JOBS file (YAML or JSON; JSON is YAML too).

    Returns:
        The jobs in file order, paths resolved (module docstring).

    Raises:
        SourceNotFoundError: no such file.
        InvalidOptionError: not YAML, too large, or a job/output that does not follow the format
            (the message names the job and the key).
    """
    import yaml

    from lorasave.errors import SourceNotFoundError

    p = Path(path)
    if p.is_dir():
        raise InvalidOptionError(f"jobs file {p} is a folder; give the YAML or JSON file")
    if not p.is_file():
        raise SourceNotFoundError(f"jobs file {p} does not exist")
    if p.stat().st_size > MAX_JOBS_FILE_BYTES:
        raise InvalidOptionError(f"jobs file {p} is larger than {MAX_JOBS_FILE_BYTES >> 20} MiB")
    try:
        text = p.read_text(encoding="utf-8")
        _check_nesting(text, p)
        doc = yaml.safe_load(text)  # safe_load: plain data only, no Python objects
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InvalidOptionError(f"jobs file {p} is not YAML or JSON: {what}{where}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("jobs"), list):
        raise InvalidOptionError(f"jobs file {p} needs a top-level 'jobs:' list (see README, 'Many outputs in one pass')")
    unknown = set(doc) - {"base", "jobs"}
    if unknown:
        raise InvalidOptionError(f"jobs file {p}: unknown top-level key(s) {', '.join(sorted(map(str, unknown)))}; expected base, jobs")
    if len(doc["jobs"]) > MAX_JOBS:
        raise InvalidOptionError(f"jobs file {p} has {len(doc['jobs'])} jobs; at most {MAX_JOBS}")
    root = p.resolve().parent
    default_base = doc.get("base")
    jobs = [_job(i, j, default_base, root) for i, j in enumerate(doc["jobs"])]
    if sum(len(j.outputs) for j in jobs) > MAX_OUTPUTS:
        raise InvalidOptionError(f"jobs file {p} has more than {MAX_OUTPUTS} outputs")
    check_paths(jobs)
    return jobs


def check_paths(jobs: Sequence[JobSpec]) -> None:
    """Every output path once, none inside another, none overlapping any job's base, adapter or tokenizer.

    A batch runs jobs in passes: one job's output must not land in (or replace) another job's source.

    Raises:
        UnsafePathError: the first overlap found.
    """
    from lorasave.errors import UnsafePathError

    outs: list[tuple[str, Path]] = []
    for job in jobs:
        for o in job.outputs:
            outs.append((f"job {job.index + 1} {o.format} output", Path(os.path.realpath(o.path))))
    sources = [Path(os.path.realpath(s)) for job in jobs for s in [job.base, *job.adapters] if os.path.exists(s)]
    sources += [Path(os.path.realpath(o.options[k])) for job in jobs for o in job.outputs for k in PATH_OPTIONS & set(o.options)]
    seen: dict[Path, str] = {}
    for what, path in sorted(outs, key=lambda x: len(x[1].parts)):
        for other, taken in seen.items():
            if path == other or other in path.parents:
                raise UnsafePathError(f"{what} {path} is also, or lies inside, {taken} {other}; give every output its own folder", path=path)
        for src in sources:
            if path == src or src in path.parents or path in src.parents:
                raise UnsafePathError(f"{what} {path} overlaps the source folder {src}; choose an output folder outside every job's sources", path=path)
        seen[path] = what


def _check_nesting(text: str, path: Path) -> None:
    """Refuse YAML nested deeper than ``jsonio.MAX_DEPTH`` or with aliases, before PyYAML's recursive composer sees it.

    ``yaml.parse`` yields events from a state machine (no recursion), so the depth is counted safely.
    Aliases (``*name``) are refused: they let a few bytes stand for an exponential structure.

    Raises:
        InvalidOptionError: too deep, or an alias. yaml.YAMLError: not YAML.
    """
    import yaml

    from lorasave.util.jsonio import MAX_DEPTH

    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):  # *name repeats a value: a few bytes can stand for gigabytes
            mark = event.start_mark
            raise InvalidOptionError(f"jobs file {path} uses a YAML alias (*{event.anchor}, line {mark.line + 1}); write the values out")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise InvalidOptionError(f"jobs file {path} nests deeper than {MAX_DEPTH} levels")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidOptionError(f"{what} must be a non-empty string")
    return value


def _source(value: str, root: Path) -> str:
    """A base or adapter of JOBS: an absolute path as given; a relative one beside JOBS; else a Hub id in the
    local cache; else the path beside JOBS (the error then names it). Never relative to the current folder."""
    from lorasave.sources.checkpoint import cached_hub_folder

    value = os.path.expanduser(value)
    if os.path.isabs(value):
        return value
    local = root / value
    if local.exists() or cached_hub_folder(value) is None:
        return str(local)
    return value


def _job(i: int, job: Any, default_base: Any, root: Path) -> JobSpec:
    where = f"job {i + 1}"
    if not isinstance(job, dict):
        raise InvalidOptionError(f"{where} must be a mapping with adapters and outputs")
    unknown = set(job) - _JOB_KEYS
    if unknown:
        raise InvalidOptionError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; expected {', '.join(sorted(_JOB_KEYS))}")
    base = job.get("base", default_base)
    adapters = job.get("adapters", [])
    adapters = [adapters] if isinstance(adapters, str) else adapters
    if not isinstance(adapters, list):
        raise InvalidOptionError(f"{where}: adapters must be a list of adapter folders")
    if len(adapters) > MAX_ADAPTERS_PER_JOB:
        raise InvalidOptionError(f"{where} has {len(adapters)} adapters; at most {MAX_ADAPTERS_PER_JOB}")
    weights = job.get("weights")
    if weights is not None and (not isinstance(weights, list) or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)):
        raise InvalidOptionError(f"{where}: weights must be a list of numbers, one per adapter")
    outputs = job.get("outputs")
    if not isinstance(outputs, list) or not outputs:
        raise InvalidOptionError(f"{where}: outputs must be a non-empty list of {{format: ..., path: ...}}")
    if len(outputs) > MAX_OUTPUTS_PER_JOB:
        raise InvalidOptionError(f"{where} has {len(outputs)} outputs; at most {MAX_OUTPUTS_PER_JOB}")
    specs = []
    for k, out in enumerate(outputs):
        w = f"{where}, output {k + 1}"
        if not isinstance(out, dict):
            raise InvalidOptionError(f"{w} must be a mapping {{format: ..., path: ...}}")
        fmt = _str(out.get("format"), f"{w}: format")
        if fmt not in FORMATS:
            raise InvalidOptionError(f"{w}: format {fmt!r} is not one of {', '.join(FORMATS)}")
        path = root / _str(out.get("path"), f"{w}: path")
        options = {str(key): v for key, v in out.items() if key not in ("format", "path")}
        for key in PATH_OPTIONS & set(options):  # folders named in options: beside JOBS too
            options[key] = str(root / os.path.expanduser(_str(options[key], f"{w}: {key}")))
        try:  # a typo fails the JOBS file now, not hours into an earlier pass
            check_options(fmt, {**options, "weights": [float(x) for x in weights] if weights is not None else None})
        except InvalidOptionError as e:
            raise InvalidOptionError(f"{w}: {e}") from None
        specs.append(OutputSpec(fmt, path, options))
    adapter_paths = [_source(_str(a, f"{where}: adapter"), root) for a in adapters]
    return JobSpec(
        i,
        _source(_str(base, f"{where}: base"), root) if base is not None else _named_base(where, adapter_paths),
        adapter_paths,
        [float(w) for w in weights] if weights is not None else None,
        specs,
    )


def _named_base(where: str, adapters: list[str]) -> str:
    """The base a job's adapters name (``sources.named_base``), when neither the job nor the file names one.

    Raises:
        InvalidOptionError: no adapter, or no base to be found from them (the message says why).
    """
    from lorasave.sources.named_base import named_base

    if not adapters:
        raise InvalidOptionError(f"{where} names no base and the jobs file has no top-level base")
    try:
        found = named_base(adapters)
    except LorasaveError as e:
        raise InvalidOptionError(f"{where} names no base and the jobs file has no top-level base; its adapters do not give one: {e}") from None
    logger.info("%s: %s", where, found.note())
    return found.hub_id if found.hub_id and not found.revision else str(found.folder.resolve())


def base_key(base: str) -> str:
    """Jobs with equal keys share a pass: the real path of a folder, else the string (a Hub id)."""
    return os.path.realpath(base) if os.path.isdir(base) else base


def plan_job(job: JobSpec, *, overwrite: bool, allow_pickle: bool) -> list[tuple[OutputSpec, PlannedOutput | BaseException]]:
    """Load the job's adapters once and plan each of its outputs; a failure is returned in place of its plan."""
    from lorasave.sources.adapter import load_adapters

    try:
        ads = load_adapters(job.adapters, allow_pickle=allow_pickle) if job.adapters else []
    except Exception as e:  # the whole job fails; the other jobs go on
        return [(o, e) for o in job.outputs]
    planned: list[tuple[OutputSpec, PlannedOutput | BaseException]] = []
    for o in job.outputs:
        try:
            planned.append((o, plan_output(o.format, job.base, ads, o.path, weights=job.weights, overwrite=overwrite, allow_pickle=allow_pickle, **o.options)))
        except Exception as e:
            planned.append((o, e))
    return planned


def passes(jobs: Sequence[JobSpec], max_jobs_per_pass: int | None = None) -> list[list[JobSpec]]:
    """Group jobs by base (first appearance order), each group cut into passes of ``max_jobs_per_pass`` jobs."""
    if max_jobs_per_pass is not None and max_jobs_per_pass < 1:
        raise InvalidOptionError("--max-jobs-per-pass must be at least 1")
    groups: dict[str, list[JobSpec]] = {}
    for job in jobs:
        groups.setdefault(base_key(job.base), []).append(job)
    step = max_jobs_per_pass or MAX_JOBS
    return [group[i : i + step] for group in groups.values() for i in range(0, len(group), step)]


def run_pass(
    jobs: Sequence[JobSpec], *, overwrite: bool = False, allow_pickle: bool = False, on_staged: Callable[[], None] | None = None, progress: bool = False
) -> list[OutputOutcome]:
    """Plan and write the outputs of ``jobs`` (one base) with one read of the base (``on_staged``: ``run_outputs``'s)."""
    outcomes: list[OutputOutcome] = []
    planned: list[PlannedOutput] = []
    slots: list[OutputOutcome] = []
    for job in jobs:
        for spec, plan in plan_job(job, overwrite=overwrite, allow_pickle=allow_pickle):
            oc = OutputOutcome(job.index, spec.format, spec.path)
            outcomes.append(oc)
            if isinstance(plan, BaseException):
                oc.error = plan
            else:
                planned.append(plan)
                slots.append(oc)
    if planned:
        for oc, done in zip(slots, run_outputs(planned, on_staged, progress=progress), strict=True):
            oc.result, oc.error = done.result, done.error
    return outcomes


@dataclass(frozen=True)
class RemoteResult:
    """A command's result as a Ray task returned it (its ``summary()`` line and ``to_dict()``)."""

    line: str
    data: dict[str, Any]

    def summary(self) -> str:
        return self.line

    def to_dict(self) -> dict[str, Any]:
        return self.data


def pass_records(jobs: Sequence[JobSpec], *, on_staged: Callable[[], None] | None = None, **options: Any) -> list[dict[str, Any]]:
    """:func:`run_pass` with each outcome as a small record (what a Ray task returns: no tensor, no exception object)."""
    out = []
    for o in run_pass(jobs, on_staged=on_staged, **options):
        rec: dict[str, Any] = {"job": o.job, "format": o.format, "path": str(o.path)}
        if o.ok:
            rec.update(summary=o.result.summary(), result=o.result.to_dict())
        else:
            rec["error"] = _message(o.error)
        out.append(rec)
    return out


def from_record(rec: dict[str, Any]) -> OutputOutcome:
    """The :class:`OutputOutcome` of a :func:`pass_records` record."""
    oc = OutputOutcome(rec["job"], rec["format"], Path(rec["path"]))
    if "error" in rec:
        from lorasave.pipeline.ray import RemoteOutputError

        oc.error = RemoteOutputError(rec["error"])
    else:
        oc.result = RemoteResult(rec["summary"], rec["result"])
    return oc


def run_batch(
    jobs_file: PathLike,
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    max_jobs_per_pass: int | None = None,
    ray_address: str | None = None,
    progress: bool = False,
) -> BatchResult:
    """Run every job of ``jobs_file``; outputs of jobs sharing a base are written in one pass.

    Args:
        jobs_file: a JOBS file (module docstring; README "Many outputs in one pass").
        overwrite: replace existing lorasave outputs at the outputs' paths.
        allow_pickle: accept ``adapter_model.bin`` adapters.
        max_jobs_per_pass: at most this many jobs share one pass (memory grows by the writers of
            each job: a few blocks and a 64 MiB queue per writer).
        ray_address: run the passes as Ray tasks on this cluster (``"auto"``: the running one;
            ``pipeline.ray``); None runs them here, one after the other.
        progress: a progress bar per local pass on stderr (``pipeline.progress``).

    Returns:
        BatchResult; it lists failed outputs, it does not raise for them.

    Raises:
        InvalidOptionError, SourceNotFoundError: the JOBS file itself is wrong (nothing is run).
        RayNotInstalledError: ``ray_address`` without the ``ray`` package.
    """
    jobs = load_jobs(jobs_file)
    groups = passes(jobs, max_jobs_per_pass)
    result = BatchResult(passes=len(groups))
    if ray_address is not None:
        from lorasave.pipeline.ray import run_passes_on_ray
        from lorasave.pipeline.threads import requested_threads

        cpus = requested_threads() or 1  # a task per pass; --threads N reserves N CPUs for each
        records = run_passes_on_ray(pass_records, groups, ray_address, options={"overwrite": overwrite, "allow_pickle": allow_pickle}, cpus_per_pass=cpus)
        done = [[from_record(r) for r in recs] for recs in records]
    else:
        done = []
        for n, group in enumerate(groups):
            logger.info("pass %d of %d: %d job(s) over %s", n + 1, len(groups), len(group), group[0].base)
            done.append(run_pass(group, overwrite=overwrite, allow_pickle=allow_pickle, progress=progress))
            for o in done[-1]:
                logger.info("pass %d of %d: job %d %s %s: %s", n + 1, len(groups), o.job + 1, o.format, o.path, "written" if o.ok else "FAILED")
    by_job = sorted((o for outs in done for o in outs), key=lambda o: o.job)
    result.outputs = by_job
    return result
