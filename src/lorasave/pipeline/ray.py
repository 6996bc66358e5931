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
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lorasave.errors import InvalidOptionError, LorasaveError
from lorasave.merging.stream import Timings
from lorasave.pipeline.execute import PassJob, execute_pass, raise_first
from lorasave.pipeline.run import PlannedOutput, run_single
from lorasave.pipeline.threads import use_threads
from lorasave.util.printable import escape

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


class RemoteOutputError(LorasaveError):
    """An output failed in a Ray task; the message is the task's one-line error."""


class RayTaskError(LorasaveError, ConnectionError):
    """A Ray task failed (its worker died more than ``max_retries`` times, or the cluster went away)."""


def _connect(address: str) -> bool:
    """``ray.init(address)`` unless connected; returns whether this call connected (then shut down after).

    A ``host:port`` address is tried with a plain TCP connection first (5 s): Ray itself retries an
    unreachable cluster for minutes.

    Raises:
        RayTaskError: nothing listens at ``address``, or Ray cannot connect.
    """
    import ray

    if ray.is_initialized():
        return False
    host, sep, port = address.rpartition(":")
    if sep and port.isdigit() and "://" not in address:
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
        except OSError as e:
            raise RayTaskError(f"no Ray cluster at {address} ({e.strerror or e}); start one with ray start --head, or give its address") from None
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RayTaskError(f"cannot connect to a Ray cluster at {address}: {str(e).splitlines()[0][:200]}; start one with ray start --head") from None
    return True


def _cpus(wanted: int) -> int:
    """``wanted`` CPUs per task, at most the largest node's: a task no node can hold would wait forever."""
    import ray

    largest = max((int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=1)
    if wanted > largest:
        logger.info("each task asks for %d CPUs; the largest node has %d: using %d", wanted, largest, largest)
    return max(1, min(wanted, largest))


def _gather(refs: list[Any]) -> list[Any]:
    """``ray.get`` of each ref, in order; Ctrl-C cancels every task (their staging folders are swept by the next run).

    Raises:
        RayTaskError: a task failed in Ray itself (one line; the outputs' own errors come back as records).
    """
    import ray
    from ray.exceptions import RayError

    try:
        return [ray.get(ref) for ref in refs]
    except KeyboardInterrupt:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise
    except RayError as e:
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise RayTaskError(f"a Ray task failed: {type(e).__name__}: {escape(first)[:300]}") from None


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
        RayTaskError: no Ray cluster at ``address``, or a task failed in Ray itself.
    """
    import ray

    started = _connect(address)
    try:
        cpus = _cpus(cpus_per_pass)
        task = ray.remote(num_cpus=cpus, max_retries=max_retries, retry_exceptions=False)(pass_task)
        refs = [task.remote(fn, list(g), cpus, pid_file, options or {}) for g in groups]
        logger.info("%d pass(es) submitted to the Ray cluster at %s", len(refs), address)
        return [list(recs) for recs in _gather(refs)]
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
    try:
        return _write_parts(plan, args, kwargs, parts, staging, threads)
    except Exception as e:  # back as a record: the error class may not unpickle on the driver
        return {"error": str(e) if isinstance(e, LorasaveError) else f"{type(e).__name__}: {e}"}


def _write_parts(
    plan: Callable[..., PlannedOutput], args: tuple[Any, ...], kwargs: dict[str, Any], parts: list[str], staging: Path, threads: int
) -> dict[str, Any]:
    with use_threads(threads):
        planned = plan(*args, **kwargs)
        try:
            assert planned.split is not None and planned.plan is not None
            writer = planned.split(parts)
            job = PassJob(planned.plan, planned.adapters, [(writer, staging)])
            execute_pass([job])
            raise_first(job)
            return {"files": job.files[0], "timings": vars(job.timings.add(writer.timings))}
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
    started = _connect(address)

    def execute(jobs: Sequence[PassJob]) -> None:
        ((writer, folder),) = jobs[0].writers
        n = tasks or max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus_per_task)
        groups = [planned.parts[i :: min(n, len(planned.parts))] for i in range(min(n, len(planned.parts)))]
        cpus = _cpus(cpus_per_task)
        task = ray.remote(num_cpus=cpus, max_retries=max_retries, retry_exceptions=False)(shard_task)
        refs = [task.remote(plan, args, kwargs, g, str(folder), cpus) for g in groups]
        logger.info("%d file(s) of %s split over %d Ray task(s)", len(planned.parts), planned.final, len(refs))
        files: dict[str, str] = {}
        timings = Timings()
        records = _gather(refs)
        failed = [r["error"] for r in records if "error" in r]
        if failed:
            raise RemoteOutputError(failed[0])
        for rec in records:
            files.update(rec["files"])
            timings.add(Timings(**rec["timings"]))
        writer.adopt(files, timings)

    try:
        return run_single(planned, execute=execute)
    finally:
        if started:
            ray.shutdown()
