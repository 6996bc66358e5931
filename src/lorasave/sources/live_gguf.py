"""GGUF files from a PeftModel still in memory: the merged model and the GGUF LoRA adapter.

``export_gguf_live`` (Unsloth's ``save_pretrained_gguf``) and ``export_gguf_adapter_live``
(``save_pretrained_ggml``) stream from the live model as ``save_pretrained_merged`` does: the base's
tensors and the active adapter's are read from the model, a tensor at a time, into the same
planners as ``lorasave gguf`` / ``lorasave gguf-adapter`` (``formats.gguf.export.plan_gguf``,
``formats.gguf.adapter.export_gguf_adapter``), so a file equals what those write from the base folder
and the adapter PEFT would save, byte for byte. The model is left unchanged and trainable.

What those read from a base folder besides its weights (``config.json`` and ``README.md`` for the
``general.*`` metadata, ``generation_config.json`` for the Modelfile's stop tokens, the license for
the card) comes from the folder the live model's base was loaded from when it holds the same weights
(``live._base_folder``: its ``config._name_or_path``, a folder or a cached Hub id); else from a
temporary folder holding the live model's config, named after the output, as llama.cpp's converter
reads the merged folder Unsloth writes first. The ``tokenizer`` object is saved into a temporary
folder and read from there; without one, the base folder's tokenizer is used.

``lorasave.json`` records the live model (class, ``name_or_path``), the adapter's settings and the
base folder when it was found, as ``save_pretrained_merged`` does, so ``lorasave verify OUT`` finds
the base; the adapter lived only in memory (``--adapter DIR`` gives it to verify).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorasave.errors import InvalidOptionError, UnsupportedModelError
from lorasave.pipeline.output import has_tokenizer
from lorasave.pipeline.run import run_single
from lorasave.sources.adapter import Adapter
from lorasave.sources.checkpoint import Checkpoint
from lorasave.sources.live import _base_folder, _live_adapter, _live_checkpoint
from lorasave.util.names import safe_file_name

PathLike = str | os.PathLike[str]


@dataclass
class LiveSources:
    """A live PeftModel as the sources of an export.

    Attributes:
        ckpt: the base's tensors (from memory); ``root`` is the base folder or the temporary one.
        adapter: the active adapter's tensors and config.
        tok_dir: the saved tokenizer's folder, or the base folder's when no tokenizer was given and
            it holds one; None when there is none.
        describe: the manifest's ``sources`` section.
    """

    ckpt: Checkpoint
    adapter: Adapter
    tok_dir: Path | None
    describe: Callable[[], dict[str, Any]]


@contextlib.contextmanager
def live_sources(model: Any, tokenizer: Any, output: Path, caller: str) -> Iterator[LiveSources]:
    """The sources of an export of ``model``; temporary files are removed on exit, the model's train/eval mode restored.

    Raises:
        UnsupportedModelError: ``model`` is not a ``peft.PeftModel``.
        InvalidOptionError: several active adapters.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise UnsupportedModelError(f"{caller} needs a peft.PeftModel (the base with its LoRA adapter), got {type(model).__name__}")
    was_training = model.training
    try:
        with tempfile.TemporaryDirectory(prefix="lorasave-live-") as tmp:
            base = model.get_base_model()
            ckpt = _live_checkpoint(model)
            adapter = _live_adapter(model)
            recorded = _base_folder(base, ckpt)
            if recorded is not None:
                ckpt.root, ckpt.hub_id = Path(recorded["path"]), recorded["hub_id"]
            else:
                side = Path(tmp) / safe_file_name(output.name)
                side.mkdir()
                (side / "config.json").write_text(json.dumps(ckpt.config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
                if getattr(base, "generation_config", None) is not None and base.can_generate():
                    base.generation_config.save_pretrained(side)
                ckpt.root = side
            tok_dir: Path | None = None
            if tokenizer is not None:
                tok_dir = Path(tmp) / "tokenizer"
                tokenizer.save_pretrained(tok_dir)
            elif recorded is not None and has_tokenizer(ckpt.root):
                tok_dir = ckpt.root

            def describe() -> dict[str, Any]:
                described: dict[str, Any] = {
                    "live_model": {"class": type(base).__name__, "name_or_path": getattr(base.config, "_name_or_path", None)},
                    "adapters": [{k: adapter.config.get(k) for k in ("peft_type", "r", "lora_alpha")}],
                    "tokenizer": f"the {type(tokenizer).__name__} passed as tokenizer" if tokenizer is not None else str(ckpt.root),
                }
                if recorded is not None:
                    described["base"] = recorded
                return described

            yield LiveSources(ckpt, adapter, tok_dir, describe)
    finally:
        model.train(was_training)


def export_gguf_live(
    model: Any,
    output: PathLike,
    *,
    tokenizer: Any = None,
    type: str | Sequence[str] = "q8_0",
    name: str | None = None,
    overwrite: bool = True,
    modelfile: bool = True,
    imatrix: PathLike | None = None,
    pure: bool = False,
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
) -> Any:
    """Merge a live PeftModel's adapter into its base and write GGUF file(s): ``lorasave.export_gguf`` on the model in memory.

    Args:
        model: a ``peft.PeftModel`` with one active adapter.
        output: the folder to create (replaced atomically when ``overwrite``, as Unsloth does).
        tokenizer: the fine-tune's tokenizer (its vocabulary and chat template go into the file);
            default: the tokenizer of the folder the base was loaded from.
        type, name, modelfile, imatrix, pure, output_tensor_type, token_embedding_type: as ``export_gguf``.

    Returns:
        GgufResult.

    Raises:
        InvalidOptionError: no tokenizer given and none in the base folder (or no base folder found).
        Everything ``export_gguf`` raises; UnsupportedModelError for a model that is not a PeftModel.
    """
    from lorasave.formats.gguf.export import plan_gguf

    final = Path(os.path.abspath(output))
    with live_sources(model, tokenizer, final, "save_pretrained_gguf") as src:
        if src.tok_dir is None:
            raise InvalidOptionError(
                "save_pretrained_gguf needs the tokenizer (tokenizer=...): a GGUF file holds the vocabulary, and the live model's base "
                f"folder ({getattr(model.get_base_model().config, '_name_or_path', None)!r}) was not found to read it from; nothing was written"
            )
        planned = plan_gguf(
            src.ckpt,
            [src.adapter],
            final,
            type=type,
            overwrite=overwrite,
            name=name,
            tokenizer=src.tok_dir,
            modelfile=modelfile,
            imatrix=imatrix,
            pure=pure,
            output_tensor_type=output_tensor_type,
            token_embedding_type=token_embedding_type,
            describe_sources=src.describe,
        )
        return run_single(planned)


def export_gguf_adapter_live(model: Any, output: PathLike, *, type: str = "f16", name: str | None = None, overwrite: bool = True) -> Any:
    """Write a live PeftModel's adapter as a GGUF LoRA adapter (``llama-cli -m base.gguf --lora FILE``): ``export_gguf_adapter`` on the model in memory.

    Args:
        model: a ``peft.PeftModel`` with one active LoRA adapter.
        output: the folder to create (replaced atomically when ``overwrite``).
        type: ``"f32"``, ``"f16"``, ``"bf16"`` or ``"q8_0"``.
        name: ``general.name`` and the file stem (default: the output folder's name).

    Returns:
        GgufAdapterResult.

    Raises:
        Everything ``export_gguf_adapter`` raises; UnsupportedModelError for a model that is not a PeftModel.
    """
    from lorasave.formats.gguf.adapter import export_gguf_adapter

    final = Path(os.path.abspath(output))
    with live_sources(model, None, final, "save_pretrained_ggml") as src:
        return export_gguf_adapter(src.ckpt, src.adapter, final, type=type, name=name, overwrite=overwrite, describe_sources=src.describe)


__all__ = ["LiveSources", "export_gguf_adapter_live", "export_gguf_live", "live_sources"]
