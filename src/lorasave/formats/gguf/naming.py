"""GGUF names as llama.cpp's converter gives them: ``general.name``, ``basename``, ``finetune``, ``size_label``, the file name.

``convert_hf_to_gguf.py`` (llama.cpp v0.5.0: ``ModelBase.prepare_metadata``, ``TextModel.prepare_metadata``)
fills the authorship keys with gguf-py's ``gguf.Metadata.load(metadata_override, dir_model_card,
model_name, total_params)``: the model card's front matter (``README.md``: ``model_name``,
``base_model``, ``license``, ``tags``...), then ``config.json``'s ``_name_or_path`` when it is a Hub id,
then the model folder's name (``SmolLM2-135M-Instruct`` -> basename ``SmolLM2``, size label ``135M``,
finetune ``Instruct``); ``general.size_label`` from the parameter count when nothing named it
(``gguf.size_label``, ``8x7B`` for experts); and, given a folder as ``--outfile``, names the file
``gguf.naming_convention(name, basename, finetune, version, size_label, output_type)`` + ``.gguf``,
``output_type`` being the ``LlamaFileType`` name after its first ``_`` (``Q4_K_M``, ``F16``).
``convert_lora_to_gguf.py`` does the same on the adapter folder, with a negative parameter count
(no size label) and ``-LoRA`` at the end of the name.

lorasave calls the same gguf-py functions on the same folders: the base for a merged GGUF (the merge
keeps the base's card and config, as the folder the converter would read), the adapter for a GGUF
adapter. A base found in the local Hugging Face cache is named by its repo (``org/SmolLM2-135M`` ->
``SmolLM2-135M``), as the folder ``hf download org/SmolLM2-135M --local-dir SmolLM2-135M`` gives: a
snapshot folder is named by its commit hash. ``--name NAME`` is the converter's ``--model-name``:
``general.name`` is NAME and, since the user chose it, the file is ``NAME-<TYPE>.gguf``. Every file
name is sanitised with ``names.safe_file_name`` (a model card can hold ``/`` or control characters).
"""

from __future__ import annotations

import logging
from pathlib import Path

import gguf

from lorasave.formats.gguf.quant import GgufType
from lorasave.util.names import safe_file_name

logger = logging.getLogger(__name__)

#: ``Metadata`` fields that name the model (strings in the file name); a card value of another kind is dropped.
NAME_FIELDS = ("name", "basename", "finetune", "version", "size_label")


def output_type(type: GgufType) -> str:
    """The converter's ``output_type`` of a file: its ``LlamaFileType`` name after the first ``_`` (``MOSTLY_Q4_K_M`` -> ``Q4_K_M``)."""
    return type.file_type.name.partition("_")[2]


def parameter_count(writer: gguf.GGUFWriter) -> tuple[int, int, int, int]:
    """``(total, shared, expert, n_expert)`` of the tensor infos added to ``writer`` (negative total for a LoRA adapter)."""
    return writer.get_total_parameter_count()


def model_metadata(
    model_dir: Path | None, *, hub_id: str | None = None, name: str | None = None, counts: tuple[int, int, int, int] = (0, 0, 0, 0)
) -> gguf.Metadata:
    """The converter's ``gguf.Metadata`` of a model folder (``prepare_metadata``, module docstring).

    Args:
        model_dir: the folder whose ``README.md``, ``config.json`` and ``generation_config.json`` are read.
        hub_id: the Hub id the folder is a cache snapshot of: its repo name stands for the folder name.
        name: ``--name`` (the converter's ``--model-name``): ``general.name``.
        counts: :func:`parameter_count` of the file's tensors.

    Returns:
        The metadata, ``name`` always set and the naming fields strings (or None).
    """
    total, shared, expert, n_expert = counts
    try:
        meta = gguf.Metadata.load(None, model_dir, name, total)
        if hub_id is not None and model_dir is not None:  # the repo's name where the converter reads the folder's
            card = gguf.Metadata.load_model_card(model_dir)
            params = gguf.Metadata.load_hf_parameters(model_dir)
            named = gguf.Metadata.apply_metadata_heuristic(gguf.Metadata(), card, params, Path(hub_id.rsplit("/", 1)[-1]), total)
            for f in (*NAME_FIELDS, "organization"):
                setattr(meta, f, getattr(named, f))
            if name is not None:
                meta.name = name
    except Exception as e:  # a card gguf-py cannot read (bad YAML...): the folder's name alone
        logger.info("GGUF metadata from the model card and config of %s not read (%s: %s); named from the folder", model_dir, type(e).__name__, e)
        meta = gguf.Metadata.load(None, None, name, total)
        if meta.name is None and model_dir is not None:
            meta = gguf.Metadata.apply_metadata_heuristic(meta, None, None, Path(hub_id.rsplit("/", 1)[-1]) if hub_id else model_dir, total)
    for f in NAME_FIELDS:
        if not isinstance(getattr(meta, f), str) or not getattr(meta, f).strip():
            setattr(meta, f, None)
    if meta.name is None:  # prepare_metadata: "Fallback to model directory name"
        meta.name = hub_id.rsplit("/", 1)[-1] if hub_id else model_dir.name if model_dir is not None else "ggml-model"
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    return meta


#: Longest file stem written (bytes); file systems allow 255 per name, and a card's name can be any length.
MAX_STEM_BYTES = 200


def _stem(meta: gguf.Metadata, encoding: str | None, chosen: str | None, kind: str | None) -> str:
    if chosen is not None:
        stem = gguf.naming_convention(chosen, None, None, None, None, encoding, model_type=kind)
    else:
        stem = gguf.naming_convention(meta.name, meta.basename, meta.finetune, meta.version, meta.size_label, encoding, model_type=kind)
    stem = safe_file_name(stem.lstrip(".-"), "ggml-model")  # no hidden file, nothing a shell takes for an option
    if len(stem.encode()) > MAX_STEM_BYTES:  # keep the type (and -LoRA) at the end
        tail = "".join(f"-{x}" for x in (encoding, kind) if x)
        head = stem.encode()[: MAX_STEM_BYTES - len(tail.encode())].decode(errors="ignore")
        stem = safe_file_name(head.rstrip("-"), "ggml-model") + tail
    return stem


def gguf_file_name(meta: gguf.Metadata, type: GgufType | str, *, chosen: str | None = None, lora: bool = False) -> str:
    """The file name: ``gguf.naming_convention`` of ``meta`` as the converter names its output, sanitised; ``chosen`` (``--name``) wins.

    Args:
        type: the file's type (a :class:`GgufType`, or a LoRA file's ``f16`` / ``q8_0``...).
        chosen: ``--name``: the file is ``<chosen>-<TYPE>[-LoRA].gguf``.
        lora: a GGUF LoRA adapter (``-LoRA``, ``convert_lora_to_gguf.py``'s ``model_type``).
    """
    encoding = output_type(type if isinstance(type, GgufType) else GgufType.parse(type))
    return _stem(meta, encoding, chosen, "LoRA" if lora else None) + ".gguf"


def model_stem(meta: gguf.Metadata, *, chosen: str | None = None) -> str:
    """The file stem without the type (``SmolLM2-135M-Instruct``): names the files beside the GGUF files (``<stem>.imatrix``)."""
    return _stem(meta, None, chosen, None)
