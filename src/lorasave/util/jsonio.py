"""Reading JSON from files lorasave did not write, with bounded work.

Every JSON document that comes from a model folder, an adapter, a safetensors header or an
output to verify goes through :func:`parse_json`: Python's ``json`` recurses once per nesting
level (a document nested 100,000 deep raises ``RecursionError``) and refuses integers longer than
``sys.get_int_max_str_digits()`` digits with a bare ``ValueError``; here both, and any nesting
deeper than :data:`MAX_DEPTH` levels (real configs, indexes and tokenizers nest fewer than 10),
become one :class:`~lorasave.errors.CheckpointFormatError` naming the file. Files larger than
:data:`MAX_JSON_BYTES` are refused before they are read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from lorasave.errors import CheckpointFormatError

#: Deepest nesting accepted (objects and arrays); tokenizer.json files nest about 6 levels.
MAX_DEPTH = 100

#: Largest JSON file read (the largest tokenizer.json files on the Hub are about 35 MB).
MAX_JSON_BYTES = 256 * 2**20

DEFAULT_HINT = "fix or re-download the file"


class InvalidJsonError(ValueError):
    """A JSON document that cannot be read; ``str()`` is a one-line reason without the file name."""


def _too_deep(obj: Any, limit: int) -> bool:
    """Whether containers nest more than ``limit`` levels (iterative: no recursion on hostile input)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, (dict, list)):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


def parse_json(data: str | bytes) -> Any:
    """Parse a JSON document from an untrusted source.

    Args:
        data: the text, or its UTF-8 bytes.

    Returns:
        The decoded value.

    Raises:
        InvalidJsonError: not UTF-8, not JSON, nested deeper than ``MAX_DEPTH``, or an integer
            longer than Python converts; the message is one line.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray, memoryview)) else data
    except UnicodeDecodeError as e:
        raise InvalidJsonError(f"not UTF-8: {e}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidJsonError(str(e).splitlines()[0]) from None
    except RecursionError:
        raise InvalidJsonError(f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise InvalidJsonError(f"an integer with more than {sys.get_int_max_str_digits()} digits") from None
    if isinstance(obj, (dict, list)) and _too_deep(obj, MAX_DEPTH):
        raise InvalidJsonError(f"nested deeper than {MAX_DEPTH} levels")
    return obj


def decode_json(data: str | bytes, path: str | Path, *, hint: str = DEFAULT_HINT) -> Any:
    """Parse the JSON text read from ``path``.

    Raises:
        CheckpointFormatError: ``"{path}: invalid JSON (reason); {hint}"``.
    """
    try:
        return parse_json(data)
    except InvalidJsonError as e:
        raise CheckpointFormatError(f"{path}: invalid JSON ({e}); {hint}", path=path) from None


def load_json(path: str | Path, *, hint: str = DEFAULT_HINT) -> Any:
    """Read and parse a JSON file of at most ``MAX_JSON_BYTES`` bytes.

    Raises:
        FileNotFoundError / OSError: the file cannot be opened (as ``open`` raises them).
        CheckpointFormatError: too large, or invalid JSON (see :func:`parse_json`).
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointFormatError(f"{path}: larger than {MAX_JSON_BYTES >> 20} MiB, too large for a JSON file lorasave reads; {hint}", path=path)
    return decode_json(raw, path, hint=hint)


def read_json(path: str | Path, *, hint: str = DEFAULT_HINT) -> dict[str, Any]:
    """Read a JSON file that must hold an object (config.json, an index, adapter_config.json...).

    Raises:
        CheckpointFormatError: invalid JSON (see :func:`load_json`), or not an object.
    """
    obj = load_json(path, hint=hint)
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{path}: expected a JSON object, got {type(obj).__name__}; {hint}", path=path)
    return obj
