"""``lorasave imatrix``: an importance matrix of the merged model from calibration text (a thin shell).

Registered on :data:`lorasave.cli.main.main` when ``lorasave.cli.main`` is imported; same thin-shell rules.
"""

from __future__ import annotations

import click

from lorasave.cli.app import _common, _deferred, _output_option, _run, _sources_argument, _tokenizer_option, _with_sources, main


@main.command("imatrix", short_help="Compute an importance matrix (llama-imatrix's GGUF) of the merge from calibration text.")
@_sources_argument(adapter_required=False)
@_output_option
@click.option("--text", required=True, type=click.Path(), help="Calibration text file (UTF-8), tokenized whole and cut into chunks.")
@click.option(
    "--chunk-size",
    "-c",
    type=click.IntRange(min=16),
    default=512,
    show_default=True,
    help="Tokens per chunk, each evaluated on its own (llama-imatrix's -c).",
)
@click.option("--chunks", type=click.IntRange(min=1), default=None, help="Evaluate at most this many chunks (default: all the text gives).")
@click.option("--process-output", is_flag=True, help="Also record output.weight (llama-imatrix's --process-output).")
@_tokenizer_option("Take")
@_common
@click.pass_context
def imatrix_cmd(
    ctx: click.Context,
    sources: tuple[str, ...],
    output: str,
    text: str,
    chunk_size: int,
    chunks: int | None,
    process_output: bool,
    tokenizer: str | None,
    overwrite: bool,
    quiet: bool,
    as_json: bool,
    allow_pickle: bool,
) -> None:
    """Merge ADAPTER(s) into BASE (float32) and write OUT/imatrix.gguf, the importance matrix of the merge on --text.

    The layout is llama-imatrix's GGUF (<weight>.in_sum2, <weight>.counts, imatrix.* keys): give it to
    `lorasave gguf --imatrix OUT` or to llama-quantize --imatrix OUT/imatrix.gguf for the i-quants.
    """
    compute = _with_sources(_deferred("lorasave.formats.gguf.calibrate", "compute_imatrix"), sources, adapter_required=False)
    options = {"text": text, "chunk_size": chunk_size, "chunks": chunks, "process_output": process_output, "tokenizer": tokenizer}
    _run(ctx, lambda: compute(output, overwrite=overwrite, allow_pickle=allow_pickle, **options), quiet=quiet, as_json=as_json)
