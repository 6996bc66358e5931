"""``lorasave merge``, ``adapter``, ``onnx``, ``verify``, ``inspect`` and ``push``: thin shells over the library."""

from __future__ import annotations

import sys
from typing import Any

import click

from lorasave.cli.app import _DTYPE, _common, _debug_option, _hub_quiet, _parse_weights, _push_options, _run, _save, _threads_option, main
from lorasave.util.sizes import DEFAULT_MAX_SHARD_SIZE


@main.command("merge", short_help="Merge adapter(s) into a base; write a sharded checkpoint.")
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder (created atomically).")
@click.option("--dtype", type=_DTYPE, default="auto", show_default=True, help="Floating dtype of the output; auto = the base's.")
@click.option(
    "--max-shard-size",
    default="5GB",
    show_default=True,
    help=f"Largest shard, decimal units as transformers ({DEFAULT_MAX_SHARD_SIZE:,} bytes = 5GB; transformers 5 defaults to 50GB).",
)
@click.option("--tokenizer", type=click.Path(), default=None, help="Copy the tokenizer from this folder (default: the adapter's, else the base's).")
@click.option(
    "--save-method",
    type=click.Choice(["merged_16bit", "merged_4bit"]),
    default="merged_16bit",
    show_default=True,
    help="merged_16bit: plain checkpoint in --dtype; merged_4bit: Linear weights as bitsandbytes 4-bit.",
)
@click.option(
    "--merge-into",
    type=click.Choice(["base", "dequantized"]),
    default="base",
    show_default=True,
    help="dequantized: round-trip each targeted weight of a 16-bit BASE through the 4-bit quantization QLoRA trained on.",
)
@click.option("--quant-type", type=click.Choice(["nf4", "fp4"]), default="nf4", show_default=True, help="4-bit data type.")
@click.option("--blocksize", type=int, default=64, show_default=True, help="4-bit block size in elements.")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True, help="Quantize the block scales too.")
@click.option(
    "--quant-input-dtype",
    type=click.Choice(["bfloat16", "float16", "float32"]),
    default="bfloat16",
    show_default=True,
    help="dtype the base was in when it was quantized (--merge-into).",
)
@click.option("--quantization-from", type=click.Path(), default=None, help="Read the 4-bit settings from this 4-bit checkpoint's config.json.")
@_threads_option
@click.option("--weights", default=None, help="Comma-separated weight per adapter: W0 + Σ wᵢ·ΔWᵢ (default 1 each).")
@click.option("--verify", "verify_output", is_flag=True, help="Verify the output (tensors level) before it is renamed into place.")
@_push_options
@_common
@click.pass_context
def merge_cmd(
    ctx: click.Context,
    base: str,
    adapters: tuple[str, ...],
    output: str,
    dtype: str,
    max_shard_size: str,
    tokenizer: str | None,
    save_method: str,
    merge_into: str,
    quant_type: str,
    blocksize: int,
    double_quant: bool,
    quant_input_dtype: str,
    quantization_from: str | None,
    weights: str | None,
    verify_output: bool,
    push_to_hub: str | None,
    private: bool,
    overwrite: bool,
    quiet: bool,
    as_json: bool,
    allow_pickle: bool,
) -> None:
    """Merge ADAPTER(s) into BASE and write a sharded safetensors checkpoint to OUT.

    BASE is a Hugging Face model folder or a Hub id in the local cache; ADAPTER a PEFT folder.
    """
    from lorasave.api import merge

    parsed_weights = _parse_weights(weights)
    quant_flags = [
        f
        for f, given in (
            ("--quant-type", ctx.get_parameter_source("quant_type")),
            ("--blocksize", ctx.get_parameter_source("blocksize")),
            ("--double-quant", ctx.get_parameter_source("double_quant")),
            ("--quant-input-dtype", ctx.get_parameter_source("quant_input_dtype")),
            ("--quantization-from", ctx.get_parameter_source("quantization_from")),
        )
        if given is click.core.ParameterSource.COMMANDLINE
    ]
    if quant_flags and save_method != "merged_4bit" and merge_into != "dequantized":
        click.echo(f"note: {', '.join(quant_flags)} only apply with --save-method merged_4bit or --merge-into dequantized; ignored", err=True)
    _save(
        ctx,
        lambda: merge(
            base,
            list(adapters),
            output,
            dtype=dtype,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            tokenizer=tokenizer,
            allow_pickle=allow_pickle,
            progress=not (quiet or as_json) and sys.stderr.isatty(),
            save_method=save_method,
            merge_into=merge_into,
            quant_type=quant_type,
            blocksize=blocksize,
            double_quant=double_quant,
            quant_input_dtype=quant_input_dtype,
            quantization_from=quantization_from,
            weights=parsed_weights,
            verify=verify_output,
        ),
        push_to_hub,
        private=private,
        quiet=quiet,
        as_json=as_json,
    )


@main.command("adapter", short_help="Re-save a PEFT adapter as safetensors.")
@click.argument("adapter")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder (created atomically).")
@click.option("--dtype", type=_DTYPE, default="auto", show_default=True, help="Cast floating tensors; auto keeps them.")
@_push_options
@_common
@click.pass_context
def adapter_cmd(
    ctx: click.Context,
    adapter: str,
    output: str,
    dtype: str,
    push_to_hub: str | None,
    private: bool,
    overwrite: bool,
    quiet: bool,
    as_json: bool,
    allow_pickle: bool,
) -> None:
    """Re-save ADAPTER as PEFT safetensors (adapter_config.json + adapter_model.safetensors)."""
    from lorasave.api import save_adapter

    _save(
        ctx,
        lambda: save_adapter(adapter, output, dtype=dtype, overwrite=overwrite, allow_pickle=allow_pickle),
        push_to_hub,
        private=private,
        quiet=quiet,
        as_json=as_json,
    )


@main.command("onnx", short_help="Merge and export an ONNX decoder with KV cache.")
@click.argument("base")
@click.argument("adapters", nargs=-1)
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder (created atomically).")
@click.option(
    "--dtype", type=click.Choice(["float32", "float16"], case_sensitive=False), default="float32", show_default=True, help="Weights, KV cache and logits."
)
@click.option("--quantize", type=click.Choice(["int8"]), default=None, help="Experimental: onnxruntime dynamic int8 (--dtype float32); check the verification.")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset of the default domain (18 or newer).")
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Compare onnxruntime with transformers; refuse the output beyond tolerance.",
)
@click.option("--weights", default=None, help="Comma-separated weight per adapter: W0 + Σ wᵢ·ΔWᵢ (default 1 each).")
@click.option("--tokenizer", type=click.Path(), default=None, help="Copy the tokenizer from this folder (default: the adapter's, else the base's).")
@_push_options
@_common
@click.pass_context
def onnx_cmd(
    ctx: click.Context,
    base: str,
    adapters: tuple[str, ...],
    output: str,
    dtype: str,
    quantize: str | None,
    opset: int,
    verify: bool,
    weights: str | None,
    tokenizer: str | None,
    push_to_hub: str | None,
    private: bool,
    overwrite: bool,
    quiet: bool,
    as_json: bool,
    allow_pickle: bool,
) -> None:
    """Merge ADAPTER(s) into BASE in float32 and export an ONNX decoder with KV cache to OUT.

    optimum's layout, run by onnxruntime. With no ADAPTER, BASE itself is exported. Needs pip install 'lorasave[onnx]'.
    """
    from lorasave.formats.onnx.export import export_onnx

    parsed_weights = _parse_weights(weights)
    _save(
        ctx,
        lambda: export_onnx(
            base,
            list(adapters),
            output,
            dtype=dtype,
            quantize=quantize,
            opset=opset,
            overwrite=overwrite,
            verify=verify,
            weights=parsed_weights,
            tokenizer=tokenizer,
            allow_pickle=allow_pickle,
        ),
        push_to_hub,
        private=private,
        quiet=quiet,
        as_json=as_json,
    )


@main.command("verify", short_help="Check an output against its manifest and sources.")
@click.argument("output")
@click.option(
    "--level",
    type=click.Choice(["files", "tensors", "logits"]),
    default="tensors",
    show_default=True,
    help="files: sha256; tensors: probe each tensor; logits: compare with base + adapter under PEFT.",
)
@click.option("--base", default=None, help="Where the base is now, if it moved since the merge.")
@click.option("--adapter", "adapters", multiple=True, help="Where the adapter(s) are now (repeat for several).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object on stdout.")
@_debug_option
@click.pass_context
def verify_cmd(ctx: click.Context, output: str, level: str, base: str | None, adapters: tuple[str, ...], as_json: bool) -> None:
    """Check OUTPUT against its lorasave.json and (tensors level) an independent recomputation from its sources.

    Exit status: 0 verified, 1 a check failed, 5 the level checked nothing (the line says why).
    """
    from lorasave.errors import NothingCheckedError
    from lorasave.verify.run import verify

    reports: list[Any] = []

    def go() -> Any:
        reports.append(verify(output, level=level, base=base, adapters=list(adapters) or None))
        if reports[0].ok and not reports[0].checked and not as_json:
            raise NothingCheckedError(reports[0].summary(), path=output)
        return reports[0]

    _run(ctx, go, quiet=False, as_json=as_json)
    if reports and not reports[0].ok:
        ctx.exit(1)
    if reports and not reports[0].checked:
        ctx.exit(NothingCheckedError.exit_code)


@main.command("inspect", short_help="Describe a checkpoint, adapter, safetensors or GGUF file.")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as one JSON object on stdout.")
@_debug_option
@click.pass_context
def inspect_cmd(ctx: click.Context, path: str, as_json: bool) -> None:
    """Describe a checkpoint folder, safetensors file, PEFT adapter or GGUF file."""
    from lorasave.verify.inspect import inspect_path

    _run(ctx, lambda: inspect_path(path), quiet=False, as_json=as_json)


@main.command("push", short_help="Upload a folder to the Hugging Face Hub.")
@click.argument("folder")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (an existing public repo is refused, not made private).")
@click.option("--revision", default=None, metavar="BRANCH", help="Branch to push to (created from main when missing); default main.")
@click.option("--commit-message", default=None, help="Commit summary; default: what was pushed, from lorasave.json.")
@click.option("--create-pr", is_flag=True, help="Open a pull request against main instead of committing to it.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress display, notes or summary.")
@_debug_option
@click.pass_context
def push_cmd(
    ctx: click.Context,
    folder: str,
    repo_id: str,
    private: bool,
    revision: str | None,
    commit_message: str | None,
    create_pr: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Push FOLDER (a lorasave output, a PEFT adapter, any model folder) to the Hub model repo REPO_ID.

    The token comes from HF_TOKEN or `hf auth login`. Files listed in FOLDER/lorasave.json must
    match their sha256; README.md must pass the Hub's metadata validation. Re-running a push that
    failed resumes it.
    """
    from lorasave.hub.push import push

    _hub_quiet(ctx.obj["debug"])
    _run(
        ctx,
        lambda: push(
            folder,
            repo_id,
            private=private,
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
            progress=not (quiet or as_json) and sys.stderr.isatty(),
        ),
        quiet=quiet,
        as_json=as_json,
    )
