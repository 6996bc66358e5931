"""transformers loads that never run code from a model folder.

A ``tokenizer_config.json`` or ``config.json`` may name its own classes in ``auto_map``
(``"AutoTokenizer": [null, "tokenization_x.XTokenizerFast"]``); transformers imports that module when
``trust_remote_code`` is True and, when it is left unset, *asks on stdin* (a pipe answering ``y``
runs it). Every transformers load in lorasave therefore goes through this module and passes
``trust_remote_code=False`` explicitly (``tests/test_trust_code.py`` checks every call in the
package): transformers then uses its built-in classes (a folder naming both a built-in
``tokenizer_class`` and an ``auto_map`` loads with the built-in one) and refuses a folder that only
its own code could load, with a multi-line ``ValueError`` that :func:`builtin_classes_only` turns
into one line.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorasave.errors import LorasaveError, UnsupportedModelError

PathLike = str | os.PathLike[str]
#: Files whose ``auto_map`` names classes transformers would import from the folder.
AUTO_MAP_FILES = ("tokenizer_config.json", "config.json", "processor_config.json", "preprocessor_config.json")


def auto_map_classes(folder: PathLike) -> list[str]:
    """``file: AutoX -> module.Class`` for every class the folder's ``auto_map`` entries name (unreadable files skipped)."""
    found: list[str] = []
    for name in AUTO_MAP_FILES:
        path = Path(folder) / name
        try:
            auto_map = json.loads(path.read_text(encoding="utf-8")).get("auto_map") if path.is_file() else None
        except (OSError, ValueError, AttributeError, RecursionError):
            continue
        if isinstance(auto_map, (list, tuple)):  # the legacy tokenizer form: [slow, fast]
            auto_map = {"AutoTokenizer": auto_map}
        if not isinstance(auto_map, dict):
            continue
        for auto, ref in auto_map.items():
            refs = ref if isinstance(ref, (list, tuple)) else [ref]
            found += [f"{name}: {auto} -> {r}" for r in refs if isinstance(r, str)]
    return found


@contextlib.contextmanager
def builtin_classes_only(folder: PathLike, what: str) -> Iterator[None]:
    """Turn transformers' refusal of a folder that needs its own code into one :class:`UnsupportedModelError` line.

    Args:
        folder: the folder being loaded.
        what: what is loaded, for the message (``"tokenizer"``, ``"model"``, ``"config"``).

    Raises:
        UnsupportedModelError: the load failed with a ``ValueError`` and the folder's ``auto_map``
            names classes transformers does not have built in.
    """
    try:
        yield
    except ValueError as exc:
        custom = auto_map_classes(folder) if not isinstance(exc, LorasaveError) else []
        if not custom:
            raise
        shown = "; ".join(custom[:3]) + (f" (+{len(custom) - 3} more)" if len(custom) > 3 else "")
        raise UnsupportedModelError(
            f"{folder}: its {what} needs code from the folder itself (auto_map: {shown}) and lorasave never runs code "
            f"from a model folder; use a {what} that transformers has built in",
            path=folder,
        ) from None


def load_tokenizer(folder: PathLike) -> Any:
    """``AutoTokenizer.from_pretrained(folder, trust_remote_code=False)``.

    Raises:
        UnsupportedModelError: only the folder's own code could load its tokenizer.
        OSError, ValueError: whatever else transformers raises for a folder it cannot load.
    """
    from transformers import AutoTokenizer

    with builtin_classes_only(folder, "tokenizer"):
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


def load_config(folder: PathLike) -> Any:
    """``AutoConfig.from_pretrained(folder, trust_remote_code=False)``.

    Raises:
        UnsupportedModelError: only the folder's own code knows its model type.
        OSError, ValueError, KeyError: whatever else transformers raises.
    """
    from transformers import AutoConfig

    with builtin_classes_only(folder, "config"):
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=False)


def load_causal_lm(folder: PathLike, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False, **kwargs)``.

    Raises:
        UnsupportedModelError: only the folder's own code could build the model.
        OSError, ValueError: whatever else transformers raises.
    """
    from lorasave.formats.bnb import preload_bnb

    preload_bnb()  # before transformers/PEFT import it: no Hub kernel is fetched (formats.bnb.preload_bnb)
    from transformers import AutoModelForCausalLM

    with builtin_classes_only(folder, "model"):
        return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=False, **kwargs)
