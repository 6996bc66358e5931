"""``lorasave merge``, ``adapter``, ``onnx``, ``onnx-adapter``, ``verify``, ``inspect`` and ``push``: thin shells over the library."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import click

from lorasave.cli.app import (
    _DTYPE,
    _choice_option,
    _debug_option,
    _deferred,
    _gather,
    _hub_quiet,
    _output_option,
    _progress,
    _ray_option,
    _run,
    _save_options,
    _SaveOptions,
    _sources_argument,
    _threads_option,
    _tokenizer_option,
    _weights_option,
    _with_sources,
    main,
)
from lorasave.util.sizes import DEFAULT_MAX_SHARD_SIZE

#: ``lorasave.util.options.SaveMethod``'s values (not imported here: it imports torch).
_SAVE_METHODS = ("merged_16bit", "merged_4bit", "fp8_dynamic", "fp8_block", "w8a16", "w4a16", "w8a8", "nvfp4a16", "mxfp4a16", "mxfp4")
#: ``merge``'s 4-bit settings, named as ``lorasave.api.merge``'s keywords and as their options (``--quant-type``...).
_QUANT_PARAMS = ("quant_type", "blocksize", "double_quant", "quant_input_dtype", "quantization_from")


def _method_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``merge``'s ``--save-method``, ``--merge-into`` and 4-bit options, handed to ``f`` as one keyword ``method``.

    ``method`` is a dict keyed by ``save_method``, ``merge_into`` and :data:`_QUANT_PARAMS`: ``lorasave.api.merge``'s keywords.
    """
    f = _gather("method", ("save_method", "merge_into", *_QUANT_PARAMS))(f)
    f = click.option("--quantization-from", type=click.Path(), default=None, help="Read the 4-bit settings from this 4-bit checkpoint's config.json.")(f)
    f = _choice_option("--quant-input-dtype", ["bfloat16", "float16", "float32"], "dtype the base was in when it was quantized (--merge-into).")(f)
    f = click.option("--double-quant/--no-double-quant", default=True, show_default=True, help="Quantize the block scales too.")(f)
    f = click.option("--blocksize", type=int, default=64, show_default=True, help="4-bit block size in elements.")(f)
    f = _choice_option("--quant-type", ["nf4", "fp4"], "4-bit data type.")(f)
    into = "dequantized: round-trip each targeted weight of a 16-bit BASE through the 4-bit quantization QLoRA trained on."
    f = _choice_option("--merge-into", ["base", "dequantized"], into)(f)
    method = (
        "merged_16bit: plain checkpoint in --dtype; merged_4bit: Linear weights as bitsandbytes 4-bit; "
        "fp8_dynamic, fp8_block, w8a16, w4a16, w8a8, nvfp4a16, mxfp4a16: compressed-tensors for vLLM / SGLang (data-free); "
        "mxfp4: gpt-oss's own MXFP4 experts."
    )
    return _choice_option("--save-method", list(_SAVE_METHODS), method)(f)


@main.command("merge", short_help="Merge adapter(s) into a base; write a sharded checkpoint.")
@_sources_argument(adapter_required=True)
@_output_option
@click.option("--dtype", type=_DTYPE, default="auto", show_default=True, help="Floating dtype of the output; auto = the base's.")
@click.option(
    "--max-shard-size",
    default="5GB",
    show_default=True,
    help=f"Largest shard, decimal units as transformers ({DEFAULT_MAX_SHARD_SIZE:,} bytes = 5GB; transformers 5 defaults to 50GB).",
)
@_tokenizer_option("Copy")
@_method_options
@_threads_option
@_ray_option("the shards are split over tasks, the driver writes the index, card and manifest.")
@_weights_option
@click.option("--verify", "verify_output", is_flag=True, help="Verify the output (tensors level) before it is renamed into place.")
@_save_options
@click.pass_context
def merge_cmd(
    ctx: click.Context,
    sources: tuple[str, ...],
    output: str,
    dtype: str,
    max_shard_size: str,
    tokenizer: str | None,
    method: dict[str, Any],
    ray_address: str | None,
    weights: list[float] | None,
    verify_output: bool,
    opts: _SaveOptions,
) -> None:
    """Merge ADAPTER(s) into BASE and write a sharded safetensors checkpoint to OUT.

    BASE is a Hugging Face model folder or a Hub id in the local cache; ADAPTER a PEFT folder.
    Without BASE, the base is the one the adapters' adapter_config.json name (base_model_name_or_path).
    """
    from lorasave.api import merge

    given = [n for n in _QUANT_PARAMS if ctx.get_parameter_source(n) is click.core.ParameterSource.COMMANDLINE]
    if given and method["save_method"] != "merged_4bit" and method["merge_into"] != "dequantized":
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        click.echo(f"note: {flags} only apply with --save-method merged_4bit or --merge-into dequantized; ignored", err=True)
    if ray_address is not None:
        from lorasave.api import plan_merge
        from lorasave.pipeline.ray import run_split

        def merge(base: str | None, adapters: list[str], output: str, **kwargs: Any) -> Any:  # the shards written by Ray tasks
            if base is None:  # resolved here: the tasks run in other folders
                from lorasave.sources.named_base import named_base

                named = named_base(adapters)
                logging.getLogger("lorasave").info("%s", named.note())
                base = named.hub_id or str(named.folder)
            # the tasks plan again in other processes, maybe on other nodes: local paths made absolute
            here = [os.path.abspath(p) if os.path.exists(p) else p for p in (base, *adapters)]
            for key in ("tokenizer", "quantization_from"):
                if kwargs.get(key) is not None:
                    kwargs[key] = os.path.abspath(kwargs[key])
            args = (here[0], here[1:], os.path.abspath(output))
            return run_split(plan_merge, args, {**kwargs, "progress": False}, ray_address)

    opts.save(
        ctx,
        _with_sources(merge, sources),
        output,
        dtype=dtype,
        max_shard_size=max_shard_size,
        tokenizer=tokenizer,
        weights=weights,
        verify=verify_output,
        progress=opts.progress,
        **method,
    )


@main.command("adapter", short_help="Re-save a PEFT adapter as safetensors.")
@click.argument("adapter")
@_output_option
@click.option("--dtype", type=_DTYPE, default="auto", show_default=True, help="Cast floating tensors; auto keeps them.")
@_save_options
@click.pass_context
def adapter_cmd(ctx: click.Context, adapter: str, output: str, dtype: str, opts: _SaveOptions) -> None:
    """Re-save ADAPTER as PEFT safetensors (adapter_config.json + adapter_model.safetensors)."""
    from lorasave.api import save_adapter

    opts.save(ctx, save_adapter, adapter, output, dtype=dtype)


@main.command("onnx", short_help="Merge and export an ONNX decoder with KV cache.")
@_sources_argument(adapter_required=False)
@_output_option
@click.option(
    "--dtype", type=click.Choice(["float32", "float16"], case_sensitive=False), default="float32", show_default=True, help="Weights, KV cache and logits."
)
@click.option(
    "--quantize",
    type=click.Choice(["int4", "int8"]),
    default=None,
    help="Weight-only MatMulNBits (every Linear and lm_head), onnxruntime's block quantizer.",
)
@click.option("--block-size", type=int, default=32, show_default=True, help="MatMulNBits block along the input axis (32, 128...).")
@click.option("--asymmetric", is_flag=True, help="MatMulNBits with zero points (default symmetric).")
@click.option("--opset", type=int, default=21, show_default=True, help="ONNX opset of the default domain (20 or newer).")
@click.option(
    "--verify/--no-verify",
    default=False,
    show_default=True,
    help="Compare onnxruntime with the unmerged PeftModel in float32 (loads the base); refuse the output beyond tolerance.",
)
@click.option(
    "--lora-inputs",
    multiple=True,
    metavar="PROJ[,PROJ...]|all-linear|ADAPTER",
    help="Give these Linears LoRA weights as graph inputs (Olive's names, rank 0 when not fed), for `lorasave onnx-adapter` files: "
    "projection names (q_proj,v_proj), all-linear, or an adapter folder whose modules to take. Repeatable.",
)
@_weights_option
@_tokenizer_option("Copy")
@_save_options
@click.pass_context
def onnx_cmd(
    ctx: click.Context,
    sources: tuple[str, ...],
    output: str,
    dtype: str,
    quantize: str | None,
    block_size: int,
    asymmetric: bool,
    opset: int,
    verify: bool,
    lora_inputs: tuple[str, ...],
    weights: list[float] | None,
    tokenizer: str | None,
    opts: _SaveOptions,
) -> None:
    """Merge ADAPTER(s) into BASE and export an ONNX decoder with KV cache to OUT, weights streamed.

    optimum's layout, run by onnxruntime and (genai_config.json) onnxruntime-genai. With no ADAPTER,
    BASE itself is exported; with no BASE, the adapters' adapter_config.json names it. With --lora-inputs the graph
    also takes LoRA weights as inputs, so `lorasave onnx-adapter` files switch fine-tunes at run time. Needs pip
    install 'lorasave[onnx]'.
    """
    export = _deferred("lorasave.formats.onnx.export", "export_onnx")
    quant = {"quantize": quantize, "block_size": block_size, "symmetric": not asymmetric} if quantize else {}
    if lora_inputs:
        quant["lora_inputs"] = list(lora_inputs)
    opts.save(
        ctx,
        _with_sources(export, sources, adapter_required=False),
        output,
        dtype=dtype,
        opset=opset,
        verify=verify,
        weights=weights,
        tokenizer=tokenizer,
        progress=opts.progress,
        **quant,
    )


@main.command("onnx-adapter", short_help="Write a LoRA adapter as an .onnx_adapter for an ONNX base with LoRA inputs.")
@_sources_argument(adapter_required=True)
@_output_option
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16"], case_sensitive=False),
    default=None,
    help="Parameter dtype (default: the ONNX base's LoRA inputs', float32 for a Hugging Face BASE).",
)
@click.option("--name", default=None, help="File stem (default: the output folder's name).")
@_save_options
@click.pass_context
def onnx_adapter_cmd(ctx: click.Context, sources: tuple[str, ...], output: str, dtype: str | None, name: str | None, opts: _SaveOptions) -> None:
    """Write ADAPTER as OUT/<name>.onnx_adapter, which onnxruntime-genai (og.Adapters) and onnxruntime (LoraAdapter)
    apply at run time to an ONNX base exported with `lorasave onnx BASE --lora-inputs ...`.

    BASE is that ONNX base folder (checked against its graph inputs) or the Hugging Face base; without BASE, the
    Hugging Face base adapter_config.json names (base_model_name_or_path). PEFT's scaling is
    folded into lora_B exactly. DoRA, modules_to_save, new tokens and LoRA on embeddings or lm_head are refused.
    """
    export = _deferred("lorasave.formats.onnx.adapter", "export_onnx_adapter")
    opts.save(ctx, _with_sources(export, sources), output, dtype=dtype, name=name)


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
            progress=_progress(quiet=quiet, as_json=as_json),
        ),
        quiet=quiet,
        as_json=as_json,
    )
