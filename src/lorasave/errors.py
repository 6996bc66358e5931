"""One hierarchy for every user-facing error lorasave raises.

Each error also subclasses the matching builtin (``FileNotFoundError``, ``ValueError``, ...)
so callers can catch either, carries the offending path or name as attributes, and knows its
one-line message: ``str(err)`` says what is wrong and how to fix it. The CLI prints exactly that
line (``error: ...``) and exits non-zero; ``--debug`` shows the traceback.

Modelled on ``huggingface_hub.errors``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorasave.util.printable import escape


class LorasaveError(Exception):
    """Base class of every error lorasave raises on bad input or a failed save.

    Attributes:
        path: the file or folder the error is about, when there is one.

    A subclass declares its own attributes as class annotations, takes them as keyword-only
    arguments and passes them on as ``details``; a detail its classes do not declare is a TypeError.
    """

    exit_code: int = 1

    def __init__(self, message: str, *, path: str | Path | None = None, **details: Any) -> None:
        declared = {name for cls in type(self).__mro__ for name in vars(cls).get("__annotations__", {})}
        unknown = sorted(set(details) - declared)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no attribute {', '.join(unknown)} to set")
        super().__init__(message)
        self.message = message
        self.path = Path(path) if path is not None else None
        vars(self).update(details)

    def __str__(self) -> str:
        # names from files (tensors, modules, patterns) may hold newlines or terminal controls
        return escape(self.message)


class SourceNotFoundError(LorasaveError, FileNotFoundError):
    """A base model, adapter or file named on the command line does not exist."""

    exit_code = 2


class NotAnAdapterError(LorasaveError, FileNotFoundError):
    """A folder given as ADAPTER holds no ``adapter_config.json``.

    Attributes:
        found: adapter folders found below it (named adapters, ``checkpoint-N``), possibly empty.
    """

    found: list[str]

    exit_code = 2

    def __init__(self, message: str, *, path: str | Path | None = None, found: list[str] | None = None) -> None:
        super().__init__(message, path=path, found=list(found or []))


class CheckpointFormatError(LorasaveError, ValueError):
    """A checkpoint file (safetensors, index, config) is malformed or inconsistent."""


class SourceChangedError(CheckpointFormatError):
    """A source file (a shard, the adapter) was truncated, replaced or rewritten while a save was reading it."""


class UnsafePathError(LorasaveError, PermissionError):
    """An index file names a path outside its folder, or OUT would overwrite a source."""


class PickleRefusedError(LorasaveError, PermissionError):
    """Only a pickle checkpoint (``.bin``/``.pt``) is present and ``allow_pickle`` was not given."""


class AdapterMismatchError(LorasaveError, ValueError):
    """The adapter does not fit the base: missing modules, wrong shapes, nothing targeted.

    Attributes:
        module: the first module name concerned, when there is one.
    """

    module: str | None

    def __init__(self, message: str, *, path: str | Path | None = None, module: str | None = None, **details: Any) -> None:
        super().__init__(message, path=path, module=module, **details)


class PatternError(AdapterMismatchError):
    """A regex of ``adapter_config.json`` (``target_modules``, ``rank_pattern``, ...) is invalid or too long."""


class PatternTimeoutError(PatternError):
    """Matching a regex of ``adapter_config.json`` with Python's ``re`` exceeded its time budget.

    Attributes:
        pattern: the pattern, as written in the config.
        budget_s: the budget, in seconds.
    """

    pattern: str
    budget_s: float

    def __init__(self, message: str, *, path: str | Path | None = None, pattern: str, budget_s: float) -> None:
        super().__init__(message, path=path, pattern=pattern, budget_s=budget_s)


class UnsupportedAdapterError(LorasaveError, NotImplementedError):
    """The adapter uses a PEFT feature lorasave does not merge (yet), so merging would lose it."""


class ImatrixError(LorasaveError, ValueError):
    """An importance matrix file (llama-imatrix's GGUF or legacy ``.dat`` layout) is malformed, not
    an importance matrix, or holds values llama.cpp refuses (``formats.gguf.imatrix``)."""


class UnsupportedModelError(LorasaveError, ValueError):
    """The base's ``model_type`` / architecture is not one lorasave can handle without remote code."""


class NonFiniteResultError(LorasaveError, ArithmeticError):
    """A merged tensor contains NaN or Inf.

    Attributes:
        tensor: name of the output tensor.
    """

    tensor: str

    def __init__(self, message: str, *, tensor: str) -> None:
        super().__init__(message, tensor=tensor)


class OutputExistsError(LorasaveError, FileExistsError):
    """OUT already exists and ``overwrite`` was not given."""

    exit_code = 3


class InsufficientDiskError(LorasaveError, OSError):
    """The planned output does not fit in the free space of OUT's file system.

    Attributes:
        needed_bytes: bytes the plan will write.
        free_bytes: bytes free on the target file system.
    """

    needed_bytes: int
    free_bytes: int

    def __init__(self, message: str, *, path: str | Path, needed_bytes: int, free_bytes: int, **details: Any) -> None:
        super().__init__(message, path=path, needed_bytes=needed_bytes, free_bytes=free_bytes, **details)


class DiskFullError(InsufficientDiskError):
    """OUT's file system filled up (ENOSPC) or the quota on it ran out (EDQUOT) while writing; nothing was written.

    Attributes:
        filesystem: OUT's file system in words (mount point and device).
    """

    filesystem: str

    def __init__(self, message: str, *, path: str | Path, filesystem: str, free_bytes: int, needed_bytes: int = 0) -> None:
        super().__init__(message, path=path, needed_bytes=needed_bytes, free_bytes=free_bytes, filesystem=filesystem)


class InvalidOptionError(LorasaveError, ValueError):
    """An option value (dtype, max_shard_size, ...) cannot be understood."""

    exit_code = 2


class InvalidChoiceError(InvalidOptionError):
    """An option given a value outside its fixed set (``save_method``, ``quantization_method``...);
    the message lists every valid value.

    Attributes:
        option: the option's name.
        value: the value given.
        choices: every valid value, in the order the message lists them.
    """

    option: str
    value: object
    choices: list[str]

    def __init__(self, message: str, *, option: str, value: object, choices: list[str]) -> None:
        super().__init__(message, option=option, value=value, choices=list(choices))


class UnknownArgumentError(LorasaveError, TypeError):
    """A keyword argument a function neither takes nor accepts as another tool's name for an option.

    Attributes:
        argument: the keyword given.
        accepted: every keyword the function accepts.
    """

    argument: str
    accepted: list[str]

    def __init__(self, message: str, *, argument: str, accepted: list[str]) -> None:
        super().__init__(message, argument=argument, accepted=list(accepted))


class NotOfferedError(LorasaveError, AttributeError):
    """Another tool's name (Unsloth's ``save_pretrained_torchao``...) lorasave does not offer; the message says what to use instead.

    Attributes:
        attribute: the name looked up (``AttributeError.name`` is Python's own slot, left unset).
        instead: what to use instead.
    """

    attribute: str
    instead: str

    def __init__(self, message: str, *, attribute: str, instead: str) -> None:
        super().__init__(message, attribute=attribute, instead=instead)


class ImatrixRequiredError(InvalidOptionError):
    """A GGUF type needs an importance matrix (``--imatrix``) for a tensor, and none is given for it."""


class ImatrixMismatchError(InvalidOptionError):
    """An importance matrix entry does not fit its tensor (another model's ``--imatrix``)."""


# --- Hugging Face Hub (lorasave push) ---

EXIT_HUB = 4


class HubError(LorasaveError, ConnectionError):
    """A request to the Hugging Face Hub failed: unreachable, offline mode, or an HTTP error.

    Attributes:
        repo_id: the repository concerned, when known.
        status: the HTTP status code, or None when no response came back.
    """

    repo_id: str | None
    status: int | None

    exit_code = EXIT_HUB

    def __init__(self, message: str, *, repo_id: str | None = None, status: int | None = None, path: str | Path | None = None) -> None:
        super().__init__(message, path=path, repo_id=repo_id, status=status)


class HubAuthError(HubError, PermissionError):
    """No token was found, the Hub rejected it (401), or it may not write to the repository (403)."""


class HubNotFoundError(HubError, FileNotFoundError):
    """The repository or revision does not exist on the Hub (404), or is not visible with this token."""


class ModelCardError(LorasaveError, ValueError):
    """The folder's ``README.md`` model card has metadata that the Hub would refuse."""


class FolderMismatchError(LorasaveError, ValueError):
    """A file of the folder to push differs from what ``lorasave.json`` recorded (or is missing).

    Attributes:
        file: the file name, relative to the folder.
    """

    file: str

    def __init__(self, message: str, *, path: str | Path | None = None, file: str) -> None:
        super().__init__(message, path=path, file=file)


# --- llama.cpp runtime (optional; lorasave.runtimes.llama_cpp.lib) ---


class LlamaCppNotInstalledError(LorasaveError, FileNotFoundError):
    """The optional llama.cpp runtime is not installed where lorasave looks for it."""

    exit_code = 2


class LlamaCppError(LorasaveError, OSError):
    """llama.cpp failed: a library, model or adapter did not load, or a decode or quantize call failed."""


class LlamaCppInstallError(LlamaCppError):
    """The llama.cpp runtime could not be installed: unsupported platform, download or integrity failure."""


class LlamaCppConverterNotInstalledError(LorasaveError, FileNotFoundError):
    """llama.cpp's own converter (``lorasave install-llama-cpp --converter``) is not installed where lorasave looks for it."""

    exit_code = 2


class LlamaCppConverterError(LlamaCppError):
    """llama.cpp's own converter (``convert_hf_to_gguf.py``, run by the GGUF fallback) exited with an error."""


# --- tensor dtypes lorasave cannot read or merge into (weight_dtypes) ---


class UnsupportedDtypeError(LorasaveError, TypeError):
    """A base tensor's dtype lorasave cannot read or merge into: a sub-byte float (F4, F6_*), or a
    weight the adapter changes stored as an integer, bool, complex or FP8 type.

    Attributes:
        tensor: the tensor's name.
        dtype: its safetensors dtype (``"I32"``, ``"F4"``...).
    """

    tensor: str
    dtype: str

    def __init__(self, message: str, *, path: str | Path | None = None, tensor: str, dtype: str) -> None:
        super().__init__(message, path=path, tensor=tensor, dtype=dtype)


class Fp8WeightsError(UnsupportedDtypeError):
    """FP8 weights (F8_E4M3/F8_E5M2) with ``weight_scale``/``weight_scale_inv`` tensors beside them and
    no ``quantization_config``: their values mean nothing without the scales, so they are never merged."""


class QuantizedBaseError(UnsupportedModelError):
    """A quantized base (FP8, MXFP4) whose layout lorasave does not read exactly: a scale tensor of an
    unrecognised shape or dtype, a quantized tensor without its scales, or a ``quantization_config`` that
    declares a format no tensor of the checkpoint has.

    Attributes:
        tensor: the tensor named (empty when the error is about the config alone).
    """

    tensor: str

    def __init__(self, message: str, *, path: str | Path | None = None, tensor: str = "") -> None:
        super().__init__(message, path=path, tensor=tensor)


class ChatTemplateBudgetError(LorasaveError, ValueError):
    """A chat template needed more work than the render budget allows (``lorasave.util.template_render``).

    Attributes:
        limit: the budget exceeded: ``"time"``, ``"memory"`` or ``"output"``.
    """

    limit: str

    def __init__(self, message: str, *, limit: str, path: str | Path | None = None) -> None:
        super().__init__(message, path=path, limit=limit)


# --- verify ---

#: Exit status of ``lorasave verify`` when the level asked for checked nothing.
EXIT_NOTHING_CHECKED = 5


class NothingCheckedError(LorasaveError, LookupError):
    """``verify`` found nothing it could check at the level asked for (no file, tensor or logit compared)."""

    exit_code = EXIT_NOTHING_CHECKED
