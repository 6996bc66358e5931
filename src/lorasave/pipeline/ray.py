"""Run passes as Ray tasks: ``lorasave batch JOBS --ray [ADDRESS]``, ``lorasave merge ... --ray [ADDRESS]``.

Each pass (the jobs of one base, ``batch.passes``) is one Ray task that runs ``batch.run_pass`` on
a node: it plans, stages, reads the base once and commits each output atomically, exactly as a
local batch does, so the outputs are byte-identical to local runs. The nodes must share the
file system the JOBS paths are on. Tasks receive job descriptions (paths and options) and return
one small record per output: no tensor ever goes through the object store.

A task whose worker dies (killed, out of memory, node lost) is retried by Ray (``max_retries``);
the dead attempt's staging folders are swept by the retry (their locks died with it), and
nothing appears under a final name until an output is complete. An output committed by an
attempt that died later in the same pass is reported by the retry as already existing unless
``--overwrite`` was given.

One very large output can also be split (``run_split``, ``lorasave merge --ray``): the driver plans
it and makes the staging folder, each task plans it again and writes a disjoint set of its shards
into that folder (a retried task first removes the files of its own shards), and the driver adopts
the shards' hashes, writes the index, config, card and manifest, verifies and renames, as a local
run does: the bytes are those of a local merge.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lorasave.errors import InvalidOptionError
from lorasave.merging.stream import Timings
from lorasave.pipeline.execute import PassJob, execute_pass, raise_first
from lorasave.pipeline.run import PlannedOutput, run_single
from lorasave.pipeline.threads import use_threads

logger = logging.getLogger(__name__)

#: How many times Ray runs a pass again after its worker died.
MAX_RETRIES = 2


def _pause_first_attempt(pid_file: str) -> Callable[[], None]:
    """Test hook: write this worker's pid to ``pid_file``; on the first attempt, wait (≤ 120 s) to be killed."""

    def hook() -> None:
        first = not os.path.exists(pid_file)
        Path(pid_file).write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while first and time.monotonic() < deadline:
            time.sleep(0.05)

    return hook


def pass_task(fn: Callable[..., list[dict[str, Any]]], group: list[Any], threads: int, pid_file: str | None, options: dict[str, Any]) -> list[dict[str, Any]]:
    """One pass, run in a Ray worker: ``fn(group, on_staged=..., **options)`` with ``threads`` worker threads."""
    hook = _pause_first_attempt(pid_file) if pid_file else None
    with use_threads(threads):
        return fn(group, on_staged=hook, **options)


def run_passes_on_ray(
    fn: Callable[..., list[dict[str, Any]]],
    groups: Sequence[Sequence[Any]],
    address: str,
    *,
    options: dict[str, Any] | None = None,
    cpus_per_pass: int = 1,
    max_retries: int = MAX_RETRIES,
    pid_file: str | None = None,
) -> list[list[dict[str, Any]]]:
    """Run ``fn`` on each group of jobs (one pass) as a Ray task on the cluster at ``address``.

    Args:
        fn: the pass (``batch.pass_records``): a module-level function, shipped to the workers by
            reference; it returns one small JSON-like record per output.
        groups: the passes (``batch.passes``): job descriptions, paths and options only.
        address: a Ray address (``"auto"``: the cluster this machine belongs to, ``ray://host:10001``...).
        options: keyword arguments for ``fn``.
        cpus_per_pass: CPUs each task reserves and the worker threads it runs.
        max_retries: Ray runs a task again this many times after its worker died.
        pid_file: test hook (``_pause_first_attempt``).

    Returns:
        The records of each pass, in order.

    Raises:
        ModuleNotFoundError: ``ray`` is not installed (``pip install 'lorasave[ray]'``).
        ConnectionError: no Ray cluster at ``address`` (Ray's own error).
    """
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, configure_logging=False)
    try:
        task = ray.remote(num_cpus=cpus_per_pass, max_retries=max_retries, retry_exceptions=False)(pass_task)
        refs = [task.remote(fn, list(g), cpus_per_pass, pid_file, options or {}) for g in groups]
        logger.info("%d pass(es) submitted to the Ray cluster at %s", len(refs), address)
        return [list(ray.get(ref)) for ref in refs]
    finally:
        if started:
            ray.shutdown()


def shard_task(
    plan: Callable[..., PlannedOutput], args: tuple[Any, ...], kwargs: dict[str, Any], parts: list[str], folder: str, threads: int
) -> dict[str, Any]:
    """A Ray task of a split output: plan it again, write only ``parts`` into the driver's staging ``folder``.

    Returns:
        ``{"files": {file name: sha256}, "timings": {phase: seconds}}``.
    """
    staging = Path(folder)
    for name in parts:  # a retried attempt: the dead one's files of these parts (lorasave's, in lorasave's staging folder)
        for leftover in (staging / name, staging / (name + ".scratch")):
            leftover.unlink(missing_ok=True)
    with use_threads(threads):
        planned = plan(*args, **kwargs)
        try:
            assert planned.split is not None and planned.plan is not None
            writer = planned.split(parts)
            job = PassJob(planned.plan, planned.adapters, [(writer, staging)])
            execute_pass([job])
            raise_first(job)
            timings = job.timings
            for phase in ("merge", "write", "hash"):
                setattr(timings, phase, getattr(timings, phase) + getattr(writer.timings, phase))
            return {"files": job.files[0], "timings": vars(timings)}
        finally:
            for fn in planned.cleanup:
                fn()


def run_split(
    plan: Callable[..., PlannedOutput],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    address: str,
    *,
    tasks: int | None = None,
    cpus_per_task: int = 1,
    max_retries: int = MAX_RETRIES,
) -> Any:
    """Write one output with its files split over Ray tasks (module docstring); returns the command's result.

    Args:
        plan: the output's plan function (``api.plan_merge``); ``plan(*args, **kwargs)`` runs on the
            driver and again in every task, so its arguments must be paths and options.
        address: the Ray cluster.
        tasks: how many tasks (default: the cluster's CPUs / ``cpus_per_task``, at most one per file).

    Raises:
        InvalidOptionError: the output cannot be split (not a sharded safetensors output).
        Everything ``plan`` and the write raise; ModuleNotFoundError without ``ray``.
    """
    import ray

    planned = plan(*args, **kwargs)
    if planned.split is None or not planned.parts:
        raise InvalidOptionError(f"a {planned.command} output cannot be split over Ray tasks; run it as a batch pass instead (lorasave batch --ray)")
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, configure_logging=False)

    def execute(jobs: Sequence[PassJob]) -> None:
        ((writer, folder),) = jobs[0].writers
        n = tasks or max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus_per_task)
        groups = [planned.parts[i :: min(n, len(planned.parts))] for i in range(min(n, len(planned.parts)))]
        task = ray.remote(num_cpus=cpus_per_task, max_retries=max_retries, retry_exceptions=False)(shard_task)
        refs = [task.remote(plan, args, kwargs, g, str(folder), cpus_per_task) for g in groups]
        logger.info("%d file(s) of %s split over %d Ray task(s)", len(planned.parts), planned.final, len(refs))
        files: dict[str, str] = {}
        timings = Timings()
        for rec in ray.get(refs):
            files.update(rec["files"])
            for phase, sec in rec["timings"].items():
                setattr(timings, phase, getattr(timings, phase) + sec)
        jobs[0].timings.read += timings.read
        writer.adopt(files, timings)

    try:
        return run_single(planned, execute=execute)
    finally:
        if started:
            ray.shutdown()
