"""Run planned outputs: stage each, execute their jobs in one pass, finish and commit each on its own.

Every command is the same four steps: ``plan_*`` (sources opened, OUT checked, plan made, writers
built: ``PlannedOutput``), :func:`run_outputs` (free space, a staging folder per output, one
``execute_pass`` for all of them), each output's ``finish`` (index, config, tokenizer, card,
``lorasave.json``, verify-before-rename: ``pipeline.finalize``) and the atomic commit. One
output's failure never stops another's; :func:`run_single` raises it for the one-output commands.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec

from lorasave.formats.writer import OutputWriter
from lorasave.merging.stream import Timings
from lorasave.pipeline.execute import PassJob, execute_pass
from lorasave.pipeline.output import StagedOutput, check_free_space
from lorasave.pipeline.progress import pass_bar
from lorasave.plan.merge_plan import MergePlan
from lorasave.sources.adapter import Adapter
from lorasave.sources.stamp import Stamp

logger = logging.getLogger(__name__)

P = ParamSpec("P")


@dataclass
class PlannedOutput:
    """One output folder, planned: OUT checked, writers built, nothing written yet.

    Attributes:
        command: ``"merge"``, ``"gguf"``... (for messages and the batch summary).
        final: OUT.
        overwrite: replace a lorasave output (or an empty folder) at OUT at commit.
        stamps: source file stamps, checked again at commit (``sources.stamp.record``).
        plan: the merge plan whose recipes the pass runs for this output's job; None for an output
            that takes no part in the pass (ONNX, the GGUF adapter: ``finish`` writes everything).
        adapters: the adapters the recipes index into.
        writers: the weight-file writers; they write into the staging folder.
        needed_bytes: bytes its files take (free-space check), carried files excluded.
        carried_bytes: bytes of the files ``finish`` copies from the sources.
        merge_key: outputs of one job with equal keys share one merge (same adapters, weights,
            ``merge_into``); the key never contains paths of the output.
        finish: ``finish(staging folder, job timings)`` writes the side files, the manifest and
            runs verify, then returns the command's result object; raises to fail the output.
        cleanup: called once the output is done, whatever happened (hashers).
        progress: show the pass's progress bar (``pipeline.progress``).
        parts: the names of the files its one writer writes, when it can be split (shards).
        split: a writer of only some ``parts``: a Ray task's share of a split output (``pipeline.ray``).
    """

    command: str
    final: Path
    overwrite: bool
    stamps: dict[Path, Stamp]
    needed_bytes: int
    finish: Callable[[Path, Timings], Any]
    plan: MergePlan | None = None
    adapters: list[Adapter] = field(default_factory=list)
    writers: list[OutputWriter] = field(default_factory=list)
    carried_bytes: int = 0
    merge_key: tuple[Any, ...] = ()
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    progress: bool = False
    parts: list[str] = field(default_factory=list)
    split: Callable[[Collection[str]], OutputWriter] | None = None


@dataclass
class Outcome:
    """What became of one planned output: its ``result``, or the ``error`` that stopped it."""

    output: PlannedOutput
    result: Any = None
    error: BaseException | None = None


def _jobs(outputs: Sequence[PlannedOutput]) -> list[tuple[PassJob, list[int]]]:
    """Group outputs that share adapters and merge options into one pass job each."""
    groups: dict[tuple[Any, ...], tuple[PassJob, list[int]]] = {}
    for i, out in enumerate(outputs):
        if out.plan is None or not out.writers:
            continue
        key = (tuple(id(a) for a in out.adapters), out.merge_key)
        if key not in groups:
            groups[key] = (PassJob(out.plan, out.adapters, []), [])
        groups[key][1].append(i)
    return list(groups.values())


def run_outputs(
    outputs: Sequence[PlannedOutput],
    on_staged: Callable[[], None] | None = None,
    *,
    progress: bool | None = None,
    execute: Callable[[Sequence[PassJob]], None] | None = None,
) -> list[Outcome]:
    """Write every planned output (all sharing one base) with one read of the base.

    Args:
        on_staged: called once the staging folders exist, before the pass (a Ray task's test hook).
        progress: show the pass's bar (``pipeline.progress``); default: if any output asks for it.
        execute: runs the jobs instead of a local ``execute_pass`` (``pipeline.ray.run_split``'s).

    Returns:
        One :class:`Outcome` per output, in order. ``KeyboardInterrupt`` and other non-``Exception``
        errors stop everything (every staging folder removed) and propagate.
    """
    outcomes = [Outcome(out) for out in outputs]
    stages: dict[int, StagedOutput] = {}
    reserved: dict[int, int] = {}  # device -> bytes promised to the outputs before (they share its free space)
    try:
        for i, out in enumerate(outputs):
            try:
                check_free_space(out.final, out.needed_bytes, carried=out.carried_bytes, reserved=reserved)
                stage = StagedOutput(out.final, overwrite=out.overwrite, sources=out.stamps)
                stage.__enter__()
                stages[i] = stage
            except Exception as e:
                outcomes[i].error = e
        jobs = _jobs(outputs)
        live: list[tuple[PassJob, list[tuple[int, int]]]] = []  # job, [(output index, writer index in job)]
        for job, members in jobs:
            where = []
            for i in members:
                if i in stages:
                    for w in outputs[i].writers:
                        where.append((i, len(job.writers)))
                        job.writers.append((w, stages[i].path))
            if job.writers:
                live.append((job, where))
        if on_staged is not None:
            on_staged()
        if live:
            show = any(out.progress for out in outputs) if progress is None else progress
            advance, close = pass_bar([job.plan for job, _ in live], enabled=show)
            try:
                if execute is None:
                    execute_pass([job for job, _ in live], on_tensor=advance)
                else:
                    execute([job for job, _ in live])
            finally:
                close()
        for job, where in live:
            for i, k in where:
                if k in job.failures and outcomes[i].error is None:
                    outcomes[i].error = job.failures[k]
        for i, out in enumerate(outputs):
            stage = stages.get(i)
            if stage is None or outcomes[i].error is not None:
                continue
            try:
                timings = next((job.timings for job, where in live if any(j == i for j, _ in where)), Timings())
                outcomes[i].result = out.finish(stage.path, timings)
                stage.commit()
            except Exception as e:
                outcomes[i].error = e
    except BaseException as e:
        for i in list(stages):
            _exit(stages.pop(i), e)
        raise
    finally:
        for out in outputs:
            for fn in out.cleanup:
                fn()
    for i, stage in stages.items():
        try:
            _exit(stage, outcomes[i].error)
        except Exception as e:  # ENOSPC mapped to DiskFullError naming OUT's file system
            outcomes[i].error = e
            outcomes[i].result = None
    return outcomes


def _exit(stage: StagedOutput, error: BaseException | None) -> None:
    stage.__exit__(type(error) if error else None, error, error.__traceback__ if error else None)


def run_single(out: PlannedOutput, execute: Callable[[Sequence[PassJob]], None] | None = None) -> Any:
    """Run one planned output (``execute``: ``run_outputs``'s); returns its result or raises its error."""
    (outcome,) = run_outputs([out], execute=execute)
    if outcome.error is not None:
        raise outcome.error
    return outcome.result


def single_output(plan: Callable[P, PlannedOutput], name: str, summary: str, returns: str) -> Callable[P, Any]:
    """The one-output command ``name`` of a plan function: ``run_single(plan(*args, **kwargs))``.

    ``lorasave.merge`` is ``single_output(plan_merge, ...)``, ``export_gguf`` is ``single_output(plan_gguf, ...)``:
    the arguments and errors are the plan function's, the result (``returns``, a class name) its ``finish``'s.
    ``summary`` is the first line of the command's docstring.
    """

    @wraps(plan)
    def command(*args: P.args, **kwargs: P.kwargs) -> Any:
        return run_single(plan(*args, **kwargs))

    command.__doc__ = f"{summary}\n\n``{plan.__name__}`` (its arguments and errors are these) run as one pass (``pipeline.run``).\n\nReturns:\n    {returns}.\n"
    command.__name__ = command.__qualname__ = name
    return command
