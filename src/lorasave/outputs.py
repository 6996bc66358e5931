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


def plan_output(fmt: str, base: str, ads: Sequence[Adapter], path: os.PathLike[str], **options: Any) -> PlannedOutput:
    """Plan one output of ``fmt`` with its command's options (``weights`` only when not None).

    Raises:
        InvalidOptionError: an unknown format, or an option that format does not take.
        Everything the format's plan function raises.
    """
    fn = plan_function(fmt)
    options = {ALIASES.get(k, k): v for k, v in options.items() if not (k == "weights" and v is None)}
    params = inspect.signature(fn).parameters
    takes = sorted(k for k, p in params.items() if p.kind is p.KEYWORD_ONLY and k not in _FROM_BATCH | {"progress"})
    unknown = sorted(set(options) - set(takes) - _FROM_BATCH)
    if unknown:
        raise InvalidOptionError(f"a {fmt} output takes no option {', '.join(unknown)}; it takes {', '.join(takes)}")
    return fn(base, ads, path, **options)
