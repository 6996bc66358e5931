"""The output formats a batch job can name, each the plan function of its command.

Adding a format: one module whose ``plan_*`` function (``base, adapters, output, **options``)
returns a ``pipeline.run.PlannedOutput`` (its writers implement ``formats.writer.OutputWriter``),
and one line in :data:`FORMATS`.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

from lorasave.errors import InvalidOptionError
from lorasave.pipeline.run import PlannedOutput
from lorasave.sources.adapter import Adapter

#: ``format:`` of a JOBS output -> ``(module, plan function)`` (imported when used).
FORMATS: dict[str, tuple[str, str]] = {
    "safetensors": ("lorasave.api", "plan_merge"),  # lorasave merge: 16-bit, or bitsandbytes 4-bit with save_method
    "gguf": ("lorasave.formats.gguf.export", "plan_gguf"),  # lorasave gguf: one or more types
}
#: JOBS spellings of an option -> the plan function's name for it.
ALIASES = {"types": "type"}
#: Options the batch passes itself (not written in an output's entry).
_FROM_BATCH = {"overwrite", "allow_pickle"}


def plan_function(fmt: str) -> Callable[..., PlannedOutput]:
    """The plan function of ``fmt``.

    Raises:
        InvalidOptionError: not a key of :data:`FORMATS`.
    """
    if fmt not in FORMATS:
        raise InvalidOptionError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    module, name = FORMATS[fmt]
    fn: Callable[..., PlannedOutput] = getattr(importlib.import_module(module), name)
    return fn


def _value_checks() -> dict[str, Callable[[Any], object]]:
    """Option -> its parser, run on a JOBS file before any pass (the plan functions parse them again)."""
    from lorasave.formats.gguf.export import parse_types
    from lorasave.formats.gguf.quant import parse_ggml_type
    from lorasave.util.dtypes import parse_output_dtype
    from lorasave.util.names import check_file_name
    from lorasave.util.sizes import parse_size

    return {
        "type": parse_types,
        "dtype": parse_output_dtype,
        "max_shard_size": parse_size,
        "name": lambda v: check_file_name(v, "name"),
        "output_tensor_type": lambda v: v is None or parse_ggml_type(v),
        "token_embedding_type": lambda v: v is None or parse_ggml_type(v),
    }


def check_options(fmt: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options of one ``fmt`` output, checked before anything runs: names, then the values that
    have a parser (types, dtype, sizes, names). Returns them under the plan function's names.

    Raises:
        InvalidOptionError: an unknown format, an option that format does not take, a bad value.
    """
    fn = plan_function(fmt)
    options = {ALIASES.get(k, k): v for k, v in options.items() if not (k == "weights" and v is None)}
    params = inspect.signature(fn).parameters
    takes = sorted(k for k, p in params.items() if p.kind is p.KEYWORD_ONLY and k not in _FROM_BATCH | {"progress"})
    given = sorted(set(options) & _FROM_BATCH)
    if given:
        raise InvalidOptionError(f"{', '.join(given)} is not an output option; give it to the batch command (--{given[0].replace('_', '-')})")
    if "weights" in options and "weights" not in params:
        raise InvalidOptionError(f"a {fmt} output takes no adapter weights; drop the job's weights or write safetensors")
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise InvalidOptionError(f"a {fmt} output takes no option {_short(', '.join(map(str, unknown)))}; it takes {', '.join(takes)}")
    checks = _value_checks()
    for key, value in options.items():
        if params[key].annotation in ("bool", bool) and not isinstance(value, bool):  # YAML "no" is a string
            raise InvalidOptionError(f"{key} must be true or false, not {_short(repr(value))}")
        if key in checks:
            try:
                checks[key](value)
            except (TypeError, ValueError, AttributeError) as e:
                raise InvalidOptionError(f"{key}: {_short(str(e))}") from None
    return options


def _short(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters: a value from a JOBS file can be any size."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def plan_output(fmt: str, base: str, ads: Sequence[Adapter], path: os.PathLike[str], *, overwrite: bool, allow_pickle: bool, **options: Any) -> PlannedOutput:
    """Plan one output of ``fmt`` with its command's options (``weights`` only when not None) and the batch's own.

    Raises:
        InvalidOptionError: an unknown format, or an option that format does not take.
        Everything the format's plan function raises.
    """
    checked = check_options(fmt, options)
    return plan_function(fmt)(base, ads, path, overwrite=overwrite, allow_pickle=allow_pickle, **checked)
