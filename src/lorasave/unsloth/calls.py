"""Unsloth's six saving names as functions taking the live PeftModel first (``attach`` binds them as methods)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lorasave.errors import InvalidOptionError, UnsupportedModelError
from lorasave.unsloth.push import SavedAndPushed, push_target, save_and_push
from lorasave.unsloth.values import GGUF_EXTRA, MERGED_EXTRA, ggml_type_of, gguf_types, save_method_of, sixteen_bit_type, take_unsloth_kwargs
from lorasave.util.sizes import DEFAULT_MAX_SHARD_SIZE

PathLike = str | os.PathLike[str]


def save_pretrained_merged(
    model: Any,
    save_directory: PathLike,
    tokenizer: Any = None,
    save_method: str = "merged_16bit",
    push_to_hub: bool = False,
    token: str | None = None,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    repo_id: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    dtype: str | None = "auto",
    overwrite: bool = True,
    quant_type: str = "nf4",
    double_quant: bool = True,
    **unsloth_kwargs: Any,
) -> Any:
    """Unsloth's ``model.save_pretrained_merged``: the merged checkpoint (or the adapter) of a live PeftModel.

    Args:
        model: a ``peft.PeftModel`` with one active adapter.
        save_directory: the output folder (replaced atomically when it exists, as Unsloth does).
        tokenizer: saved alongside; its EOS goes into ``generation_config.json``.
        save_method: ``"merged_16bit"``, ``"lora"``, ``"merged_4bit"``, a compressed-tensors preset
            (``"fp8_dynamic"``, ``"w4a16"``...) or ``"mxfp4"``: :data:`SAVE_METHODS`, or Unsloth's names
            for them (:data:`SAVE_METHOD_ALIASES`: ``"fp8"``, ``"merged_4bit_forced"``...).
        push_to_hub: also push the folder, to ``repo_id`` or else to ``save_directory`` as a repo id.
        token, private, commit_message: the push's (``lorasave.push``); token never printed or written.
        max_shard_size: shard limit (``"5GB"``, decimal units).
        dtype, overwrite, quant_type, double_quant: lorasave's (``lorasave.save_pretrained_merged`` in ``sources.live``).
        **unsloth_kwargs: Unsloth's other arguments, not needed (:data:`NOT_NEEDED`).

    Returns:
        MergeResult (AdapterResult for ``"lora"``); SavedAndPushed with ``push_to_hub``.

    Raises:
        InvalidChoiceError: an unknown ``save_method`` (the message lists every valid one).
        UnknownArgumentError: an argument neither lorasave nor Unsloth takes.
        Everything ``lorasave.merge`` and, with ``push_to_hub``, ``lorasave.push`` raise.
    """
    from lorasave.sources.live import save_pretrained_merged as save_live

    take_unsloth_kwargs("save_pretrained_merged", unsloth_kwargs, MERGED_EXTRA, _declared(save_pretrained_merged))
    method = save_method_of(save_method)

    def save(folder: Path) -> Any:
        options = {"dtype": dtype, "overwrite": overwrite, "quant_type": quant_type, "double_quant": double_quant}
        return save_live(model, folder, tokenizer, method, max_shard_size, **options)

    if not push_to_hub:
        return save(Path(save_directory))
    target = push_target("save_pretrained_merged", save_directory, repo_id)
    return save_and_push(
        save, target, save_directory=save_directory, token=token, private=private, commit_message=commit_message, create_pr=False, revision=None
    )


def push_to_hub_merged(
    model: Any,
    repo_id: str,
    tokenizer: Any = None,
    save_method: str = "merged_16bit",
    use_temp_dir: bool | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    create_pr: bool = False,
    safe_serialization: bool = True,
    revision: str | None = None,
    *,
    save_directory: PathLike | None = None,
    dtype: str | None = "auto",
    quant_type: str = "nf4",
    double_quant: bool = True,
    **unsloth_kwargs: Any,
) -> SavedAndPushed:
    """Unsloth's ``model.push_to_hub_merged``: ``save_pretrained_merged`` into a temporary folder, then ``lorasave.push``.

    Args:
        repo_id: ``name`` (the token owner's namespace) or ``namespace/name``.
        save_directory: keep the output there instead of a temporary folder.
        use_temp_dir, safe_serialization: Unsloth's, not needed (:data:`NOT_NEEDED`).
        create_pr, revision: ``lorasave.push``'s.
        The others: as :func:`save_pretrained_merged`.

    Returns:
        SavedAndPushed.

    Raises:
        As :func:`save_pretrained_merged`, and ``lorasave.push``'s errors (HubAuthError, HubError...);
        the push checks (repo id, token) run before anything is written.
    """
    from lorasave.sources.live import save_pretrained_merged as save_live

    take_unsloth_kwargs(
        "push_to_hub_merged",
        {**unsloth_kwargs, **_given(use_temp_dir=use_temp_dir, safe_serialization=safe_serialization)},
        MERGED_EXTRA,
        _declared(push_to_hub_merged),
    )
    method = save_method_of(save_method)
    options = {"dtype": dtype, "overwrite": True, "quant_type": quant_type, "double_quant": double_quant}
    return save_and_push(
        lambda folder: save_live(model, folder, tokenizer, method, max_shard_size, **options),
        repo_id,
        save_directory=save_directory,
        token=token,
        private=private,
        commit_message=commit_message,
        create_pr=create_pr,
        revision=revision,
    )


def save_pretrained_gguf(
    model: Any,
    save_directory: PathLike,
    tokenizer: Any = None,
    quantization_method: str | Sequence[str] | None = "fast_quantized",
    first_conversion: str | None = None,
    push_to_hub: bool = False,
    token: str | None = None,
    private: bool | None = None,
    *,
    repo_id: str | None = None,
    commit_message: str | None = None,
    imatrix_file: PathLike | bool | None = None,
    name: str | None = None,
    overwrite: bool = True,
    modelfile: bool = True,
    pure: bool = False,
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    **unsloth_kwargs: Any,
) -> Any:
    """Unsloth's ``model.save_pretrained_gguf``: the merged model as GGUF file(s), every type from one read.

    Args:
        model: a ``peft.PeftModel`` with one active adapter.
        save_directory: the output folder: one ``.gguf`` per type, an Ollama ``Modelfile``, ``README.md``
            and ``lorasave.json`` (Unsloth writes the 16-bit merge there and the GGUF files into
            ``save_directory + "_gguf"``).
        tokenizer: the fine-tune's tokenizer (vocabulary and chat template); default: the base folder's.
        quantization_method: a GGUF type (``"q4_k_m"``, ``"q8_0"``, ``"f16"``...: ``lorasave gguf --type``),
            Unsloth's aliases (``"not_quantized"``, ``"fast_quantized"``, ``"quantized"``, ``"q2_k_l"``, None),
            or a list of them.
        imatrix_file: an importance matrix file (``lorasave gguf --imatrix``); ``True`` (Unsloth: download one)
            is refused: lorasave makes no network call (``lorasave.compute_imatrix`` makes one).
        push_to_hub, repo_id, token, private, commit_message: as :func:`save_pretrained_merged`.
        first_conversion: Unsloth's, not needed.
        name, overwrite, modelfile, pure, output_tensor_type, token_embedding_type: ``lorasave.export_gguf``'s.

    Returns:
        GgufResult; SavedAndPushed with ``push_to_hub``.

    Raises:
        InvalidChoiceError: an unknown ``quantization_method`` (the message lists every valid one).
        InvalidOptionError: ``imatrix_file=True``; no tokenizer given and none in the base folder.
        Everything ``lorasave.export_gguf`` (and with ``push_to_hub``, ``lorasave.push``) raises.
    """
    take_unsloth_kwargs("save_pretrained_gguf", {**unsloth_kwargs, **_given(first_conversion=first_conversion)}, GGUF_EXTRA, _declared(save_pretrained_gguf))
    save = _gguf_saver(model, tokenizer, quantization_method, imatrix_file, name, overwrite, modelfile, pure, output_tensor_type, token_embedding_type)
    if not push_to_hub:
        return save(Path(save_directory))
    target = push_target("save_pretrained_gguf", save_directory, repo_id)
    return save_and_push(
        save, target, save_directory=save_directory, token=token, private=private, commit_message=commit_message, create_pr=False, revision=None
    )


def push_to_hub_gguf(
    model: Any,
    repo_id: str,
    tokenizer: Any = None,
    quantization_method: str | Sequence[str] | None = "fast_quantized",
    first_conversion: str | None = None,
    use_temp_dir: bool | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    max_shard_size: int | str | None = None,
    create_pr: bool = False,
    safe_serialization: bool = True,
    revision: str | None = None,
    *,
    save_directory: PathLike | None = None,
    imatrix_file: PathLike | bool | None = None,
    name: str | None = None,
    modelfile: bool = True,
    pure: bool = False,
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    **unsloth_kwargs: Any,
) -> SavedAndPushed:
    """Unsloth's ``model.push_to_hub_gguf``: :func:`save_pretrained_gguf` into a temporary folder (named after the repository), then ``lorasave.push``.

    Args:
        max_shard_size: Unsloth's, not needed (a GGUF file is one file).
        The others: as :func:`save_pretrained_gguf` and :func:`push_to_hub_merged`.

    Returns:
        SavedAndPushed.

    Raises:
        As :func:`save_pretrained_gguf` and ``lorasave.push``; the push checks run before anything is written.
    """
    given = _given(first_conversion=first_conversion, use_temp_dir=use_temp_dir, safe_serialization=safe_serialization, max_shard_size=max_shard_size)
    take_unsloth_kwargs("push_to_hub_gguf", {**unsloth_kwargs, **given}, GGUF_EXTRA, _declared(push_to_hub_gguf))
    save = _gguf_saver(model, tokenizer, quantization_method, imatrix_file, name, True, modelfile, pure, output_tensor_type, token_embedding_type)
    return save_and_push(
        save, repo_id, save_directory=save_directory, token=token, private=private, commit_message=commit_message, create_pr=create_pr, revision=revision
    )


def save_pretrained_ggml(
    model: Any,
    save_directory: PathLike,
    tokenizer: Any = None,
    temporary_location: str | None = None,
    maximum_memory_usage: float | None = None,
    outtype: str = "f16",
    *,
    name: str | None = None,
    overwrite: bool = True,
) -> Any:
    """Unsloth's ``model.save_pretrained_ggml``: the adapter as a GGUF LoRA adapter (``llama-cli -m BASE.gguf --lora FILE``).

    Args:
        model: a ``peft.PeftModel`` with one active LoRA adapter.
        save_directory: the output folder: ``<name>-lora-<outtype>.gguf``, ``README.md``, ``lorasave.json``
            (Unsloth also saves the PEFT adapter there).
        tokenizer: not needed (a GGUF LoRA adapter holds no vocabulary); accepted as Unsloth requires it.
        outtype: ``"f16"``, ``"f32"``, ``"bf16"`` or ``"q8_0"``.
        temporary_location, maximum_memory_usage: Unsloth's, not needed.
        name, overwrite: ``lorasave.export_gguf_adapter``'s.

    Returns:
        GgufAdapterResult.

    Raises:
        InvalidChoiceError: an unknown ``outtype``.
        Everything ``lorasave.export_gguf_adapter`` raises (what a GGUF LoRA adapter cannot express:
        DoRA, ``modules_to_save``...).
    """
    from lorasave.sources.live_gguf import export_gguf_adapter_live

    take_unsloth_kwargs("save_pretrained_ggml", _given(temporary_location=temporary_location, maximum_memory_usage=maximum_memory_usage), MERGED_EXTRA, ())
    kind = ggml_type_of(outtype)
    return export_gguf_adapter_live(model, save_directory, type=kind, name=name, overwrite=overwrite)


def push_to_hub_ggml(
    model: Any,
    tokenizer: Any,
    repo_id: str,
    use_temp_dir: bool | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    create_pr: bool = False,
    revision: str | None = None,
    commit_description: str | None = None,
    temporary_location: str | None = None,
    maximum_memory_usage: float | None = None,
    outtype: str = "f16",
    *,
    save_directory: PathLike | None = None,
    name: str | None = None,
) -> SavedAndPushed:
    """Unsloth's ``model.push_to_hub_ggml(tokenizer, repo_id, ...)`` (the tokenizer first, as Unsloth has it): :func:`save_pretrained_ggml`, then a push.

    Returns:
        SavedAndPushed.

    Raises:
        As :func:`save_pretrained_ggml` and ``lorasave.push``; the push checks run before anything is written.
    """
    from lorasave.sources.live_gguf import export_gguf_adapter_live

    given = _given(
        use_temp_dir=use_temp_dir, commit_description=commit_description, temporary_location=temporary_location, maximum_memory_usage=maximum_memory_usage
    )
    take_unsloth_kwargs("push_to_hub_ggml", given, MERGED_EXTRA, ())
    kind = ggml_type_of(outtype)
    return save_and_push(
        lambda folder: export_gguf_adapter_live(model, folder, type=kind, name=name, overwrite=True),
        repo_id,
        save_directory=save_directory,
        token=token,
        private=private,
        commit_message=commit_message,
        create_pr=create_pr,
        revision=revision,
    )


def _given(**values: Any) -> dict[str, Any]:
    """The not-needed arguments given a value other than their default (None, or True for ``safe_serialization``)."""
    return {k: v for k, v in values.items() if v is not None and not (k == "safe_serialization" and v is True)}


def _declared(fn: Callable[..., Any]) -> list[str]:
    import inspect

    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD and p.name != "model"]


def _gguf_saver(
    model: Any,
    tokenizer: Any,
    quantization_method: object,
    imatrix_file: PathLike | bool | None,
    name: str | None,
    overwrite: bool,
    modelfile: bool,
    pure: bool,
    output_tensor_type: str | None,
    token_embedding_type: str | None,
) -> Callable[[Path], Any]:
    """The values checked now, the GGUF export of ``model`` into a folder later."""
    from lorasave.sources.live_gguf import export_gguf_live

    if not hasattr(model, "get_base_model"):
        raise UnsupportedModelError(f"save_pretrained_gguf needs a peft.PeftModel (the base with its LoRA adapter), got {type(model).__name__}")
    resolved = gguf_types(quantization_method, sixteen_bit_type(model))
    if imatrix_file is True:
        raise InvalidOptionError(
            "imatrix_file=True downloads Unsloth's importance matrix from the Hub, and lorasave makes no network call: compute one with "
            "lorasave.compute_imatrix(base, adapter, out, text=FILE) (or `lorasave imatrix`) and pass its path; nothing was written"
        )
    imatrix = None if imatrix_file in (None, False, "") else imatrix_file

    def save(folder: Path) -> Any:
        return export_gguf_live(
            model,
            folder,
            tokenizer=tokenizer,
            type=resolved.types,
            name=name,
            overwrite=overwrite,
            modelfile=modelfile,
            imatrix=imatrix,  # type: ignore[arg-type]
            pure=pure,
            output_tensor_type=output_tensor_type or resolved.output_tensor_type,
            token_embedding_type=token_embedding_type or resolved.token_embedding_type,
        )

    return save
