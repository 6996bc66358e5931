"""The ``lorasave`` command line: ``lorasave COMMAND BASE [ADAPTER ...] -o OUT [options]``.

A thin shell: parse options, call the function of the same name in ``lorasave.api``, print a
summary (or ``--json``), and map errors to one line on stderr and a non-zero exit code
(``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from . import __version__
from .errors import LorasaveError
from .printable import escape, escape_lines
from .sizes import DEFAULT_MAX_SHARD_SIZE

EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130

_DTYPE = click.Choice(["auto", "bfloat16", "float16", "float32"], case_sensitive=False)


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


#: Optional packages -> the install command that brings them (``[project.optional-dependencies]``).
_INSTALL_HINTS = {
    "gguf": "pip install 'lorasave[gguf]'",
    "sentencepiece": "pip install 'lorasave[gguf]'",
    "onnx": "pip install 'lorasave[onnx]'",
    "onnxruntime": "pip install 'lorasave[onnx]'",
    "onnxscript": "pip install 'lorasave[onnx]'",
    "bitsandbytes": "pip install 'lorasave[bnb]'",
    "peft": "pip install 'lorasave[verify]'",
}


class _OneLineFormatter(logging.Formatter):
    """Log lines with names from files escaped (a newline in a tensor name cannot fake another line)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape(super().formatMessage(record))


def _hub_handlers() -> list[logging.Handler]:
    """huggingface_hub's own stderr handler(s), when it is imported."""
    return list(logging.getLogger("huggingface_hub").handlers) if "huggingface_hub" in sys.modules else []


def _run(ctx: click.Context, fn: Callable[[], Any], *, quiet: bool, as_json: bool) -> None:
    from .hints import INVOKED_AS
    from .redact import add_filter, remove_filter, scrub

    debug = ctx.obj.get("debug", False)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter("%(levelname)s: %(message)s" if debug else "note: %(message)s"))
    add_filter([handler])  # no token in any log line (lorasave.redact)
    log = logging.getLogger("lorasave")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else (logging.WARNING if quiet or as_json else logging.INFO))
    if not debug:  # bitsandbytes warns at import about optional CPU kernels it does not need here
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    signal.signal(signal.SIGTERM, _sigterm)
    invoked = INVOKED_AS.set(ctx.info_name or "merge")
    hub_handlers = add_filter(_hub_handlers())

    def fail(line: str, code: int, *, trace: bool = True) -> None:
        if debug and trace:
            click.echo(scrub(traceback.format_exc()).rstrip("\n"), err=True)
        click.echo(escape(scrub(line)), err=True)  # names from files: control characters escaped, one line
        ctx.exit(code)

    try:
        result = fn()
    except LorasaveError as e:
        fail(f"error: {e}", e.exit_code)
    except OSError as e:  # disk full, permission denied, a source that vanished mid-run
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        fail(f"error: {e.strerror or e}{where}; no output was written", 1)
    except KeyboardInterrupt:
        fail("error: interrupted; no output was written", EXIT_INTERRUPTED, trace=False)
    except ModuleNotFoundError as e:  # an optional dependency this command needs
        root = (e.name or "").split(".")[0]
        hint = _INSTALL_HINTS.get(root, f"pip install {root}") if root else "install lorasave's optional dependencies"
        fail(f"error: this command needs the {root or 'missing'} package; install it with: {hint}", 2)
    except Exception as e:  # a bug: still one line unless --debug
        fail(f"error: internal error ({type(e).__name__}: {e}); rerun with --debug and report it", EXIT_INTERNAL)
    finally:
        log.removeHandler(handler)
        remove_filter(hub_handlers + _hub_handlers())
        INVOKED_AS.reset(invoked)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    elif not quiet:
        click.echo(escape_lines(result.summary()))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lorasave")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Save LoRA fine-tuned models for deployment.

    Grammar: lorasave COMMAND BASE [ADAPTER ...] -o OUT [options]
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:  # `lorasave COMMAND ... --debug` works like `lorasave --debug COMMAND ...`
        ctx.ensure_object(dict)["debug"] = True


#: The hidden ``--debug`` every command also accepts after its arguments.
_debug_option = click.option("--debug", is_flag=True, hidden=True, expose_value=False, callback=_set_debug)


def _common(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")(f)
    f = click.option("--quiet", "-q", is_flag=True, help="No progress bar, notes or summary.")(f)
    f = click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (only once the new output is complete).")(f)
    f = click.option("--allow-pickle", is_flag=True, help="Accept .bin pickle weights, loaded with torch.load(weights_only=True).")(f)
    f = _debug_option(f)
    return f


def _parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r}: give numbers separated by commas, e.g. 0.7,0.3", param_hint="--weights") from None


class _SavedAndPushed:
    """A save's result followed by its push: one summary line each, one JSON object."""

    def __init__(self, saved: Any, pushed: Any) -> None:
        self.saved = saved
        self.pushed = pushed

    def summary(self) -> str:
        return f"{self.saved.summary()}\n{self.pushed.summary()}"

    def to_dict(self) -> dict[str, Any]:
        return {**self.saved.to_dict(), "push": self.pushed.to_dict()}


def _push_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--push-to-hub REPO_ID`` and ``--private`` for a command that saves an output."""
    f = click.option("--private", is_flag=True, help="With --push-to-hub: create the Hub repo private.")(f)
    f = click.option("--push-to-hub", "push_to_hub", default=None, metavar="REPO_ID", help="Push OUT to this Hub model repo once it is complete.")(f)
    return f


def _hub_quiet(debug: bool) -> None:
    # huggingface_hub has its own stderr handler (e.g. "No files have been modified since last commit"):
    # lorasave's summary says it in one line already
    # imported either way, so that _run finds its handler and scrubs tokens from it (lorasave.redact)
    from huggingface_hub.utils import logging as hf_logging

    if not debug:
        hf_logging.set_verbosity_error()


def _save_then_push(save: Callable[[], Any], repo_id: str | None, *, private: bool, progress: bool) -> Callable[[], Any]:
    """``save``, then push its output to ``repo_id`` (when given); the push checks run before the save."""
    if repo_id is None:
        return save

    def go() -> Any:
        from .hub import check_push_options, push

        check_push_options(repo_id)  # bad id, no token, offline: fail before a long save
        saved = save()
        try:
            pushed = push(saved.output, repo_id, private=private, progress=progress)
        except LorasaveError as e:
            e.message = f"{e.message} (the output is complete in {saved.output}; to retry: lorasave push {saved.output} {repo_id})"
            raise
        return _SavedAndPushed(saved, pushed)

    return go


def _save(ctx: click.Context, save: Callable[[], Any], push_to_hub: str | None, *, private: bool, quiet: bool, as_json: bool) -> None:
    """Run a saving command: the save, then the push when ``--push-to-hub`` was given."""
    if push_to_hub:
        _hub_quiet(ctx.obj["debug"])
    progress = not (quiet or as_json) and sys.stderr.isatty()
    _run(ctx, _save_then_push(save, push_to_hub, private=private, progress=progress), quiet=quiet, as_json=as_json)


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
    from .api import merge

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
    from .api import save_adapter

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
    from .onnx_export import export_onnx

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
    from .errors import NothingCheckedError
    from .verify import verify

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
    from .inspect import inspect_path

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
    from .hub import push

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


from . import cli_gguf  # noqa: E402  (registers gguf, gguf-adapter, install-llama-cpp on main)

GGUF_TYPE_CHOICES = cli_gguf.GGUF_TYPE_CHOICES


def run() -> None:
    """Console entry point: click usage errors become one ``error:`` line too (exit 2)."""
    try:
        rc = main.main(standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.UsageError as e:
        hint = f" (see: lorasave {e.ctx.command_path.split(' ', 1)[1] if e.ctx and ' ' in e.ctx.command_path else ''} --help)".replace("  ", " ")
        click.echo(f"error: {e.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.Abort:
        click.echo("error: interrupted; no output was written", err=True)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":  # pragma: no cover
    run()
