"""Run batch passes as Ray tasks: ``lorasave batch JOBS --ray [ADDRESS]``.

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
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorasave.batch import JobSpec, OutputOutcome, run_pass
from lorasave.errors import LorasaveError
from lorasave.pipeline.threads import use_threads

logger = logging.getLogger(__name__)

#: How many times Ray runs a pass again after its worker died.
MAX_RETRIES = 2


class RemoteOutputError(LorasaveError, RuntimeError):
    """An output failed in a Ray task; the message is the task's one-line error."""


@dataclass(frozen=True)
class RemoteResult:
    """A command's result as a Ray task returned it (its ``summary()`` line and ``to_dict()``)."""

    line: str
    data: dict[str, Any]

    def summary(self) -> str:
        return self.line

    def to_dict(self) -> dict[str, Any]:
        return self.data


def _record(o: OutputOutcome) -> dict[str, Any]:
    if o.ok:
        return {"job": o.job, "format": o.format, "path": str(o.path), "summary": o.result.summary(), "result": o.result.to_dict()}
    err = o.error
    return {"job": o.job, "format": o.format, "path": str(o.path), "error": str(err) if isinstance(err, LorasaveError) else f"{type(err).__name__}: {err}"}


def _outcome(rec: dict[str, Any]) -> OutputOutcome:
    oc = OutputOutcome(rec["job"], rec["format"], Path(rec["path"]))
    if "error" in rec:
        oc.error = RemoteOutputError(rec["error"])
    else:
        oc.result = RemoteResult(rec["summary"], rec["result"])
    return oc


def _pause_first_attempt(pid_file: str) -> Callable[[], None]:
    """Test hook: write this worker's pid to ``pid_file``; on the first attempt, wait (≤ 120 s) to be killed."""

    def hook() -> None:
        first = not os.path.exists(pid_file)
        Path(pid_file).write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while first and time.monotonic() < deadline:
            time.sleep(0.05)

    return hook


def pass_task(jobs: list[JobSpec], overwrite: bool, allow_pickle: bool, threads: int, pid_file: str | None = None) -> list[dict[str, Any]]:
    """One pass, run in a Ray worker; returns one record per output (``_record``)."""
    hook = _pause_first_attempt(pid_file) if pid_file else None
    with use_threads(threads):
        return [_record(o) for o in run_pass(jobs, overwrite=overwrite, allow_pickle=allow_pickle, on_staged=hook)]


def run_passes_on_ray(
    groups: Sequence[Sequence[JobSpec]],
    address: str,
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    cpus_per_pass: int = 1,
    max_retries: int = MAX_RETRIES,
    pid_file: str | None = None,
) -> list[list[OutputOutcome]]:
    """Run each group of jobs (one pass) as a Ray task on the cluster at ``address``.

    Args:
        groups: the passes (``batch.passes``).
        address: a Ray address (``"auto"``: the cluster this machine belongs to, ``ray://host:10001``...).
        cpus_per_pass: CPUs each task reserves and the worker threads it runs.
        max_retries: Ray runs a task again this many times after its worker died.
        pid_file: test hook (``_pause_first_attempt``).

    Returns:
        The outcomes of each pass, in order.

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
        refs = [task.remote(list(g), overwrite, allow_pickle, cpus_per_pass, pid_file) for g in groups]
        logger.info("%d pass(es) submitted to the Ray cluster at %s", len(refs), address)
        return [[_outcome(r) for r in ray.get(ref)] for ref in refs]
    finally:
        if started:
            ray.shutdown()
