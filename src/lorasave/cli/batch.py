"""``lorasave batch JOBS``: registered on :data:`lorasave.cli.main.main`; same thin-shell rules."""

from __future__ import annotations

from typing import Any

import click

from lorasave.cli.app import _common, _progress, _ray_option, _run, _threads_option, main
from lorasave.util.printable import escape

#: Exit code when the batch ran but some outputs failed (the summary lists them).
EXIT_SOME_FAILED = 1


@main.command("batch", short_help="Run a JOBS file: many adapters and outputs, one read of each base.")
@click.argument("jobs_file", metavar="JOBS", type=click.Path())
@click.option("--max-jobs-per-pass", type=click.IntRange(min=1), default=None, help="At most this many jobs share one pass over a base (bounds memory).")
@_ray_option("each pass is a task.")
@_threads_option
@_common  # --json, --quiet, --overwrite (each output's OUT), --allow-pickle, --debug
@click.pass_context
def batch_cmd(
    ctx: click.Context,
    jobs_file: str,
    max_jobs_per_pass: int | None,
    ray_address: str | None,
    as_json: bool,
    quiet: bool,
    overwrite: bool,
    allow_pickle: bool,
) -> None:
    """Run every job of JOBS (YAML or JSON); jobs that share a base are written in one pass over it.

    Each output is atomic on its own and byte-identical to what its single command writes; a job that
    fails does not stop the others. The summary lists every output; the exit code is 1 if any failed.
    See README, "Many outputs in one pass", for the JOBS format.
    """
    from lorasave.batch import run_batch

    done: list[Any] = []

    def go() -> Any:
        progress = _progress(quiet=quiet, as_json=as_json)
        done.append(
            run_batch(
                jobs_file, overwrite=overwrite, allow_pickle=allow_pickle, max_jobs_per_pass=max_jobs_per_pass, ray_address=ray_address, progress=progress
            )
        )
        return done[0]

    _run(ctx, go, quiet=quiet, as_json=as_json, interrupted="nothing partial was written; the outputs of passes that finished (noted above) are in place")
    if done and done[0].failed:
        if quiet:  # the summary was not printed: the failures still get their one line each
            for o in done[0].failed:
                click.echo(escape(f"error: job {o.job + 1} {o.format} {o.path}: {o.message}"), err=True)
        ctx.exit(EXIT_SOME_FAILED)
