"""BASE optional: the base an adapter names, and which first argument is an adapter.

PEFT records the model an adapter was trained on in ``adapter_config.json`` as
``base_model_name_or_path`` (the string the base was loaded with: ``model.config._name_or_path``).
When no BASE is given, lorasave reads that base, resolved as PEFT's ``AutoPeftModel.from_pretrained``
resolves it (``from_pretrained(base_model_name_or_path, revision=config.revision)``): a folder, a
relative path taken from the current folder, else a Hub id found in the local Hugging Face cache
(``huggingface_hub.snapshot_download(local_files_only=True)``: no network call), at the adapter's
``revision`` when it records one.

The value is user data from a file, so it is checked first (:func:`check_named_value`): a string
of at most :data:`MAX_NAME_CHARS` characters without NUL or control characters; ``~`` is not
expanded (PEFT does not expand it either). The base folder is then read under the usual symlink
rule (``util.paths``), like any BASE.

The command line's rule (:func:`split_sources`): a first positional folder holding
``adapter_config.json`` and no model weights is an adapter (its base comes from its config); with
model weights (``model.safetensors``, an index, shards, ``pytorch_model*.bin``) it is a base.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorasave.errors import AdapterMismatchError, InvalidOptionError, SourceNotFoundError

if TYPE_CHECKING:
    from lorasave.sources.adapter import Adapter
    from lorasave.sources.checkpoint import Checkpoint

PathLike = str | os.PathLike[str]

#: Longest ``base_model_name_or_path`` read (Linux's PATH_MAX); a longer value is refused.
MAX_NAME_CHARS = 4096
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: Weight files of a model folder (transformers' names); any of them makes a first argument a base.
_MODEL_WEIGHTS = re.compile(
    r"^(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|pytorch_model(-\d+-of-\d+)?\.bin|pytorch_model\.bin\.index\.json|model\.pt)$"
)


def has_model_weights(folder: Path) -> bool:
    """Whether ``folder`` holds model weights (``model.safetensors``, its index or shards, ``pytorch_model*.bin``, ``model.pt``)."""
    try:
        return any(_MODEL_WEIGHTS.match(p.name) for p in folder.iterdir())
    except OSError:
        return False


def is_adapter_folder(spec: PathLike) -> bool:
    """The first-argument rule: a folder with ``adapter_config.json`` and no model weights is an adapter."""
    folder = Path(spec)
    return folder.is_dir() and (folder / "adapter_config.json").is_file() and not has_model_weights(folder)


def split_sources(sources: Sequence[str], *, adapter_required: bool = True) -> tuple[str | None, list[str]]:
    """``[BASE] ADAPTER...`` of the command line -> ``(base or None, adapters)``.

    The first source is an adapter when :func:`is_adapter_folder` says so (no BASE: the adapters
    name it), else it is BASE.

    Raises:
        InvalidOptionError: nothing given, or only a BASE when the command needs an adapter.
        NotAnAdapterError: a model folder after an adapter (``ADAPTER BASE``: put the base first).
    """
    if not sources:
        raise InvalidOptionError("give [BASE] ADAPTER...: no folder was given")
    first, rest = sources[0], list(sources[1:])
    if is_adapter_folder(first):
        for other in rest:  # `ADAPTER BASE`: the order swapped
            folder = Path(other)
            if folder.is_dir() and has_model_weights(folder) and not (folder / "adapter_config.json").is_file():
                from lorasave.errors import NotAnAdapterError
                from lorasave.util.hints import command_hint

                raise NotAnAdapterError(f"{other} is a base model, not an adapter; put the base first: {command_hint('BASE ADAPTER')}", path=folder)
        return None, [first, *rest]
    if adapter_required and not rest:
        from lorasave.util.hints import command_hint

        raise InvalidOptionError(
            f"{first} is a base, not an adapter (an adapter folder holds adapter_config.json and no model weights); "
            f"give the adapter too: {command_hint('[BASE] ADAPTER')}"
        )
    return first, rest


def _hint() -> str:
    from lorasave.util.hints import command_hint

    return command_hint("BASE ADAPTER")


def check_named_value(value: object, config_path: Path) -> str:
    """Refuse a ``base_model_name_or_path`` lorasave will not follow: not a string, empty, too long, control characters.

    Returns:
        ``value``.

    Raises:
        AdapterMismatchError: such a value (the message escapes it and names the file).
    """
    if value is None or value == "":
        raise AdapterMismatchError(f"{config_path} names no base (base_model_name_or_path is {value!r}); give BASE first: {_hint()}", path=config_path)
    if not isinstance(value, str):
        raise AdapterMismatchError(
            f"{config_path}: base_model_name_or_path must be a string, got {type(value).__name__}; give BASE first: {_hint()}", path=config_path
        )
    if len(value) > MAX_NAME_CHARS:
        raise AdapterMismatchError(
            f"{config_path}: base_model_name_or_path is {len(value)} characters long (at most {MAX_NAME_CHARS}); give BASE first: {_hint()}", path=config_path
        )
    if _CONTROL.search(value):
        raise AdapterMismatchError(
            f"{config_path}: base_model_name_or_path {value!r} contains NUL or a control character; lorasave does not follow it: give BASE first: {_hint()}",
            path=config_path,
        )
    return value


@dataclass(frozen=True)
class NamedBase:
    """The base the adapters name.

    Attributes:
        value: ``base_model_name_or_path`` as written.
        revision: the adapter's ``revision``, if any (a Hub id is looked up at it).
        folder: the folder it resolved to (a cache snapshot for a Hub id).
        hub_id: the Hub id, when it was found in the cache; None for a folder.
        config_path: the ``adapter_config.json`` that names it (the first adapter's).
    """

    value: str
    revision: str | None
    folder: Path
    hub_id: str | None
    config_path: Path

    def note(self) -> str:
        """The line that says which base was used."""
        where = f"{self.hub_id} in the local Hugging Face cache ({self.folder})" if self.hub_id else str(self.folder.resolve())
        return f"base: {where}, named by {self.config_path} (base_model_name_or_path)"


def _config_of(adapter: PathLike | Adapter) -> tuple[Path, dict[str, Any]]:
    """``(adapter_config.json path, its content)`` of an adapter folder (read as ``load_adapter`` reads it) or a loaded Adapter."""
    from lorasave.sources.adapter import ADAPTER_CONFIG_NAME, Adapter, locate_adapter
    from lorasave.util.jsonio import read_json
    from lorasave.util.paths import check_inside

    if isinstance(adapter, Adapter):
        return adapter.root / ADAPTER_CONFIG_NAME, adapter.config
    root = locate_adapter(adapter)
    path = root / ADAPTER_CONFIG_NAME
    return path, read_json(check_inside(path, root))


def _hub_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # huggingface_hub missing: the message still names the id
        return "the Hugging Face cache"


def resolve_named(value: str, revision: str | None, config_path: Path) -> NamedBase:
    """Where a checked ``base_model_name_or_path`` is: a folder (relative to the current folder, as PEFT), else a cached Hub id.

    Raises:
        SourceNotFoundError: neither; the message names the folder looked for and the Hub id and cache.
    """
    from lorasave.sources.checkpoint import cached_hub_folder

    path = Path(value)
    if path.is_dir():
        return NamedBase(value, revision, path, None, config_path)
    folder = cached_hub_folder(value, revision=revision)
    if folder is not None:
        return NamedBase(value, revision, folder, value, config_path)
    at = f" at revision {revision!r}" if revision else ""
    raise SourceNotFoundError(
        f"the base named by {config_path} (base_model_name_or_path {value!r}) is not there: no folder {Path(os.path.abspath(value))} "
        f"(a relative path is taken from the current folder, as PEFT does) and no Hub id {value!r}{at} in the local Hugging Face cache "
        f"({_hub_cache_dir()}); download it (hf download {value}) or give BASE first: {_hint()}",
        path=path,
    )


def named_base(adapters: Sequence[PathLike | Adapter]) -> NamedBase:
    """The base every adapter's ``adapter_config.json`` names (they must agree).

    Raises:
        InvalidOptionError: no adapter.
        AdapterMismatchError: an adapter names no base or a hostile value (:func:`check_named_value`),
            or two adapters name different bases.
        SourceNotFoundError: the named base is neither a folder nor in the local cache (:func:`resolve_named`).
        NotAnAdapterError, UnsafePathError, CheckpointFormatError: reading an adapter's config.
    """
    if not adapters:
        raise InvalidOptionError("no BASE and no adapter to take it from: give [BASE] ADAPTER...")
    found: list[NamedBase] = []
    for ad in adapters:
        path, cfg = _config_of(ad)
        value = check_named_value(cfg.get("base_model_name_or_path"), path)
        revision = cfg.get("revision")
        nb = resolve_named(value, revision if isinstance(revision, str) and revision and not _CONTROL.search(revision) else None, path)
        if found and os.path.realpath(nb.folder) != os.path.realpath(found[0].folder):
            raise AdapterMismatchError(
                f"the adapters name different bases: {found[0].config_path} names {found[0].value!r}, {path} names {value!r}; "
                f"give BASE first to merge them into one: {_hint()}",
                path=path,
            )
        found.append(nb)
    return found[0]


def open_base(base: PathLike | Checkpoint | None, adapters: PathLike | Sequence[PathLike | Adapter] | None) -> Checkpoint:
    """``open_checkpoint(base)``; with no ``base``, the base the adapters name (:func:`named_base`).

    A base found this way is recorded on the checkpoint (``Checkpoint.named_by``: the note saying
    which base was used, which the merge plan's notes carry).

    Raises:
        As ``open_checkpoint`` and :func:`named_base`.
    """
    from lorasave.sources.adapter import adapter_list
    from lorasave.sources.checkpoint import Checkpoint, open_checkpoint

    if isinstance(base, Checkpoint):
        return base
    if base is not None:
        return open_checkpoint(base)
    nb = named_base(adapters if isinstance(adapters, Sequence) and not isinstance(adapters, str) else adapter_list(adapters))  # type: ignore[arg-type]
    ckpt = open_checkpoint(nb.folder)
    ckpt.hub_id = nb.hub_id
    ckpt.named_by = nb.note()
    return ckpt
