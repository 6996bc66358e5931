"""Execute a pass: read each tensor once, merge it once per job, hand its blocks to every writer.

A pass serves one base and any number of jobs (a job = adapters + options + outputs). For each
tensor name in the pass order, each job that has it merges it in row blocks
(``merging.stream.tensor_blocks``) and every writer of that job converts and writes the blocks
(``formats.writer.OutputWriter``), each behind the arithmetic on a thread of its own. The base
bytes of a tensor are read from disk once: the jobs that follow read them again from the page
cache, one tensor apart. Peak memory is a few blocks per job plus each writer's queue.

A writer that fails is aborted and left out of the rest of the pass; a job whose sources fail
(a shard changed, a read error) fails all its writers; the other jobs go on. ``execute_pass``
returns the failures; the single-output API raises the first one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorasave.formats.writer import OutputWriter, TensorSink
from lorasave.merging.stream import ExecContext, Timings, tensor_blocks
from lorasave.pipeline.threads import worker_threads
from lorasave.plan.merge_plan import MergePlan
from lorasave.sources.adapter import Adapter
from lorasave.sources.checkpoint import TensorReader

logger = logging.getLogger(__name__)


@dataclass
class PassJob:
    """One job of a pass.

    Attributes:
        plan: the plan whose recipes the pass merges by (any of the job's plans: every output of a
            job has the same tensors and operations, only their dtypes differ).
        adapters: the adapters its recipes index into.
        writers: ``(writer, staging folder)`` of each output of the job.
        timings: reading and merging seconds of this job (the writers keep their own).
        failures: writer index -> the error that stopped it.
        files: writer index -> ``{file name: sha256}`` its ``end`` returned.
    """

    plan: MergePlan
    adapters: list[Adapter]
    writers: list[tuple[OutputWriter, Path]]
    timings: Timings = field(default_factory=Timings)
    failures: dict[int, BaseException] = field(default_factory=dict)
    files: dict[int, dict[str, str]] = field(default_factory=dict)


def pass_order(jobs: Sequence[PassJob]) -> list[str]:
    """The order tensors are produced in.

    A lone writer that prefers an order (a safetensors output: its file order) gets it; otherwise
    the plan order of the jobs (the first job's, then names only later jobs have), which is the
    order writers that need one (GGUF: tensor data follows the tensor infos) ask for, unless one
    needs another (GGUF of a mixture of experts: each stacked tensor's experts one after the
    other): then that writer's order, followed by the names it leaves out in plan order.

    Raises:
        AssertionError: writers need orders the pass cannot give both of (a bug: the GGUF writers of
            one pass share a base, so they need the same order).
    """
    writers = [w for job in jobs for w, _ in job.writers]
    if len(writers) == 1 and (pref := writers[0].preferred_order()) is not None:
        return pref
    order = list(dict.fromkeys(name for job in jobs for name in job.plan.tensors))
    needs = [need for w in writers if (need := w.order()) is not None]
    for need in needs:
        if not _follows(order, need):
            order = list(dict.fromkeys([*need, *order]))
            break
    for w, need in zip([w for w in writers if w.order() is not None], needs, strict=True):
        if not _follows(order, need):
            raise AssertionError(f"{type(w).__name__} needs an order this pass does not give")
    return order


def _follows(order: list[str], need: list[str]) -> bool:
    """Whether ``need`` comes in ``order``'s order (names ``order`` lacks are not produced)."""
    position = {n: i for i, n in enumerate(order)}
    at = [position[n] for n in need if n in position]
    return at == sorted(at)


def execute_pass(jobs: Sequence[PassJob], order: list[str] | None = None, on_tensor: Callable[[str], None] | None = None) -> None:
    """Run every job of a pass; failures are recorded in each job's ``failures`` (see module doc).

    Args:
        jobs: the jobs; their plans share one base.
        order: tensor names in the order to produce them (default :func:`pass_order`); a writer
            that needs another order fails.
        on_tensor: called with each tensor's name once every job handed it on (the progress bar).

    Merged blocks are computed on a pool of ``pipeline.threads.worker_threads()`` threads (none for
    1), each writer converts and writes on its own thread, and torch runs with one intra-op thread
    meanwhile: OpenMP threads spinning at barriers beside the workers would slow the arithmetic
    tenfold on 2 cores. The output bytes do not depend on the number of threads.
    """
    order = pass_order(jobs) if order is None else order
    for job in jobs:
        for w, _ in job.writers:
            w.set_order(order)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    workers = worker_threads()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="lorasave-merge") if workers > 1 else None
    try:
        with TensorReader() as reader:
            ctxs = [ExecContext(reader, job.adapters, job.timings, job.plan.converter, pool=pool, workers=workers) for job in jobs]
            for job in jobs:
                for k, (w, folder) in enumerate(job.writers):
                    _guard(job, k, w, lambda w=w, folder=folder: w.begin(folder))
            for name in order:
                for job, ctx in zip(jobs, ctxs, strict=True):
                    _tensor(job, ctx, name)
                if on_tensor is not None:
                    on_tensor(name)
            for job in jobs:
                for k, (w, _) in enumerate(job.writers):
                    _guard(job, k, w, lambda job=job, k=k, w=w: job.files.__setitem__(k, w.end()))
    except BaseException as e:  # interrupted, or a bug: stop every writer
        for job in jobs:
            for k, (w, _) in enumerate(job.writers):
                if k not in job.failures:
                    job.failures[k] = e
                    w.abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def _guard(job: PassJob, k: int, w: OutputWriter, step: Any) -> None:
    if k in job.failures:
        return
    try:
        step()
    except Exception as e:
        job.failures[k] = e
        w.abort()


def _tensor(job: PassJob, ctx: ExecContext, name: str) -> None:
    """Merge tensor ``name`` for ``job`` and feed its blocks to the job's live writers."""
    t = job.plan.tensors.get(name)
    if t is None:
        return
    sinks: list[tuple[int, TensorSink]] = []
    for k, (w, _) in enumerate(job.writers):
        if k not in job.failures:
            try:
                sink = w.open_tensor(name)
            except Exception as e:
                job.failures[k] = e
                w.abort()
                continue
            if sink is not None:
                sinks.append((k, sink))
    if not sinks:
        return
    try:
        for block in tensor_blocks(t, ctx):
            for k, sink in sinks:
                if k not in job.failures:
                    _guard(job, k, job.writers[k][0], lambda sink=sink, block=block: sink.add(block))
    except Exception as e:  # the job's sources: every writer of the job stops
        for k, (w, _) in enumerate(job.writers):
            if k not in job.failures:
                job.failures[k] = e
                w.abort()
        return
    for k, sink in sinks:
        _guard(job, k, job.writers[k][0], sink.close)


def raise_first(job: PassJob) -> None:
    """Raise the job's first failure (the single-output API's behaviour)."""
    if job.failures:
        raise job.failures[min(job.failures)]
