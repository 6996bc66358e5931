"""The ``lorasave`` command group and what every command shares: option sets, error mapping, ``run``.

A thin shell: parse options, call the function of the same name in ``lorasave.api``, print a
summary (or ``--json``), and map errors to one line on stderr and a non-zero exit code
(``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import click

from lorasave import __version__
from lorasave.errors import LorasaveError
from lorasave.util.printable import escape, escape_lines

EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130

_DTYPE = click.Choice(["auto", "bfloat16", "float16", "float32"], case_sensitive=False)


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


class _OneLineFormatter(logging.Formatter):
    """Log lines with names from files escaped (a newline in a tensor name cannot fake another line)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape(super().formatMessage(record))


def _hub_handlers() -> list[logging.Handler]:
    """huggingface_hub's own stderr handler(s), when it is imported."""
    return list(logging.getLogger("huggingface_hub").handlers) if "huggingface_hub" in sys.modules else []


def _run(ctx: click.Context, fn: Callable[[], Any], *, quiet: bool, as_json: bool, interrupted: str = "no output was written") -> None:
    from lorasave.util.hints import INVOKED_AS, missing_package_message
    from lorasave.util.notes import VERBOSE
    from lorasave.util.redact import add_filter, remove_filter, scrub

    debug = ctx.obj.get("debug", False)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter("%(levelname)s: %(message)s" if debug else "note: %(message)s"))
    add_filter([handler])  # no token in any log line (lorasave.util.redact)
    log = logging.getLogger("lorasave")
    log.addHandler(handler)
    # --verbose: also the notes that say the same on every run (lorasave.util.notes.Detail)
    level = logging.WARNING if quiet or as_json else VERBOSE if ctx.obj.get("verbose") else logging.INFO
    log.setLevel(logging.DEBUG if debug else level)
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
        from lorasave.pipeline.threads import use_threads

        with use_threads(ctx.obj.get("threads")):
            result = fn()
    except LorasaveError as e:
        fail(f"error: {e}", e.exit_code)
    except OSError as e:  # disk full, permission denied, a source that vanished mid-run
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        fail(f"error: {e.strerror or e}{where}; no output was written", 1)
    except KeyboardInterrupt:
        fail(f"error: interrupted; {interrupted}", EXIT_INTERRUPTED, trace=False)
    except ModuleNotFoundError as e:  # an optional dependency this command needs
        fail(f"error: {missing_package_message(e)}", 2)
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
@click.option("--verbose", "-v", is_flag=True, help="Also show the notes that say the same on every run (defaults spelled out, how a type is encoded).")
@click.pass_context
def main(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """Save LoRA fine-tuned models for deployment.

    Grammar: lorasave COMMAND [BASE] ADAPTER... -o OUT [options]. BASE may be left out when the
    adapter's adapter_config.json names it (base_model_name_or_path).
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    ctx.obj["verbose"] = verbose


def _set_verbose(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:  # `lorasave COMMAND ... --verbose` works like `lorasave --verbose COMMAND ...`
        ctx.ensure_object(dict)["verbose"] = True


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:  # `lorasave COMMAND ... --debug` works like `lorasave --debug COMMAND ...`
        ctx.ensure_object(dict)["debug"] = True


def _deferred(module: str, name: str) -> Callable[..., Any]:
    """``module.name``, imported when called: inside ``_run``, so a missing optional package (gguf, onnx) is one line."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    return call


def _ray_option(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--ray [ADDRESS]`` (``ray_address``; alone: ``auto``, the running cluster); ``what`` ends its help."""
    return click.option(
        "--ray",
        "ray_address",
        is_flag=False,
        flag_value="auto",
        default=None,
        metavar="[ADDRESS]",
        help=f"Run on a Ray cluster (address default: auto, the running one; needs lorasave[ray]): {what}",
    )


def _set_threads(ctx: click.Context, param: click.Parameter, value: int | None) -> None:
    ctx.ensure_object(dict)["threads"] = value


#: ``--threads N`` of the commands that run a pass (``_run`` applies it: ``pipeline.threads.use_threads``).
_threads_option = click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    expose_value=False,
    callback=_set_threads,
    help="Worker threads for the merge (default: the machine's cores); the output does not depend on it.",
)

#: The hidden ``--debug`` every command also accepts after its arguments.
_debug_option = click.option("--debug", is_flag=True, hidden=True, expose_value=False, callback=_set_debug)
#: ``--verbose`` of the commands that write an output (also ``lorasave --verbose COMMAND``).
_verbose_option = click.option(
    "--verbose", "-v", is_flag=True, expose_value=False, callback=_set_verbose, help="Also show the notes that say the same on every run."
)


def _common(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")(f)
    f = click.option("--quiet", "-q", is_flag=True, help="No progress bar, notes or summary.")(f)
    f = click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (only once the new output is complete).")(f)
    f = click.option("--allow-pickle", is_flag=True, help="Accept .bin pickle weights, loaded with torch.load(weights_only=True).")(f)
    f = _verbose_option(f)
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


def _sources_argument(adapter_required: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``[BASE] ADAPTER...`` as one argument ``sources``, split when the command runs (:func:`_with_sources`)."""
    return click.argument("sources", nargs=-1, required=True, metavar="[BASE] ADAPTER..." if adapter_required else "[BASE] [ADAPTER]...")


def _with_sources(fn: Callable[..., Any], sources: Sequence[str], *, adapter_required: bool = True) -> Callable[..., Any]:
    """``fn(base, adapters, *args, **kwargs)`` with BASE and the adapters split from ``sources`` when called (inside ``_run``).

    The rule is ``sources.named_base.split_sources``: a first folder with ``adapter_config.json`` and no model
    weights is an adapter, and BASE is then None (the adapters name it).
    """

    def call(*args: Any, **kwargs: Any) -> Any:
        from lorasave.sources.named_base import split_sources

        base, adapters = split_sources(sources, adapter_required=adapter_required)
        return fn(base, adapters, *args, **kwargs)

    return call


#: ``-o/--output OUT`` of every saving command.
_output_option = click.option("-o", "--output", required=True, type=click.Path(), help="Output folder (created atomically).")


def _tokenizer_option(verb: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--tokenizer FOLDER`` of the commands that write a tokenizer; ``verb`` (``"Copy"``, ``"Take"``) says how it is used."""
    return click.option(
        "--tokenizer", type=click.Path(), default=None, help=f"{verb} the tokenizer from this folder (default: the adapter's, else the base's)."
    )


def _choice_option(flag: str, choices: Sequence[str], help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``flag`` taking one of ``choices``, the first by default (shown in ``--help``)."""
    return click.option(flag, type=click.Choice(list(choices)), default=choices[0], show_default=True, help=help_text)


def _progress(*, quiet: bool, as_json: bool) -> bool:
    """Whether to show a progress display: neither ``--quiet`` nor ``--json``, and stderr is a terminal."""
    return not (quiet or as_json) and sys.stderr.isatty()


@dataclass(frozen=True)
class _SaveOptions:
    """The options every saving command shares (:func:`_save_options`): ``_push_options`` and ``_common``; :meth:`save` runs the command."""

    push_to_hub: str | None
    private: bool
    overwrite: bool
    quiet: bool
    as_json: bool
    allow_pickle: bool

    @property
    def progress(self) -> bool:
        """Whether to show a progress display (:func:`_progress`)."""
        return _progress(quiet=self.quiet, as_json=self.as_json)

    def save(self, ctx: click.Context, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
        """Run the command: ``fn(*args, **kwargs)`` with ``overwrite`` and ``allow_pickle``, then the push when ``--push-to-hub`` was given."""
        if self.push_to_hub:
            _hub_quiet(ctx.obj["debug"])
        save = functools.partial(fn, *args, overwrite=self.overwrite, allow_pickle=self.allow_pickle, **kwargs)
        _run(ctx, _save_then_push(save, self.push_to_hub, private=self.private, progress=self.progress), quiet=self.quiet, as_json=self.as_json)


def _gather(keyword: str, names: Sequence[str], make: Callable[..., Any] = dict) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Hand the command the values of its parameters ``names`` as one keyword: ``keyword=make(name=value, ...)``.

    Apply it below the options it gathers (click adds them to the function it returns).
    """

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def gathered(*args: Any, **kwargs: Any) -> Any:
            kwargs[keyword] = make(**{n: kwargs.pop(n) for n in names})
            return f(*args, **kwargs)

        return gathered

    return decorate


def _save_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``_push_options`` and ``_common`` for a saving command, handed to ``f`` as one keyword ``opts: _SaveOptions``."""
    return _push_options(_common(_gather("opts", [fl.name for fl in fields(_SaveOptions)], _SaveOptions)(f)))


def _weights_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--weights`` of the commands that merge adapters, handed to ``f`` parsed (:func:`_parse_weights`)."""
    f = _gather("weights", ["weights"], lambda weights: _parse_weights(weights))(f)
    return click.option("--weights", default=None, help="Comma-separated weight per adapter: W0 + Σ wᵢ·ΔWᵢ (default 1 each).")(f)


def _hub_quiet(debug: bool) -> None:
    # huggingface_hub has its own stderr handler (e.g. "No files have been modified since last commit"):
    # lorasave's summary says it in one line already
    # imported either way, so that _run finds its handler and scrubs tokens from it (lorasave.util.redact)
    from huggingface_hub.utils import logging as hf_logging

    if not debug:
        hf_logging.set_verbosity_error()


def _save_then_push(save: Callable[[], Any], repo_id: str | None, *, private: bool, progress: bool) -> Callable[[], Any]:
    """``save``, then push its output to ``repo_id`` (when given); the push checks run before the save."""
    if repo_id is None:
        return save

    def go() -> Any:
        from lorasave.hub.push import check_push_options, push

        check_push_options(repo_id)  # bad id, no token, offline: fail before a long save
        saved = save()
        try:
            pushed = push(saved.output, repo_id, private=private, progress=progress)
        except LorasaveError as e:
            e.message = f"{e.message} (the output is complete in {saved.output}; to retry: lorasave push {saved.output} {repo_id})"
            raise
        return _SavedAndPushed(saved, pushed)

    return go


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
