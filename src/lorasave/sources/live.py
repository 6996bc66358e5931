"""Saving a PeftModel that is still in memory, Unsloth-style, through the same streaming merge.

``save_pretrained_merged(model, save_directory, tokenizer, save_method=...)`` reads the base
weights and the adapter tensors from the live model (nothing is copied whole, nothing is
merged in place), plans and writes exactly as ``lorasave merge`` does from the same base and
adapter on disk, and leaves the model unchanged and trainable. ``lorasave.unsloth`` gives it Unsloth's
names and arguments (``attach(model)`` binds them as methods) and adds the push and the GGUF outputs
(``sources.live_gguf``).

Differences from Unsloth's ``save_pretrained_merged``: no GPU is needed and memory does not
grow with the model (one tensor at a time); ``merged_4bit`` quantizes once from the float32
merge instead of re-quantizing a dequantized 4-bit model; the output is written atomically with
a ``lorasave.json`` manifest. ``lorasave.json`` records the folder the live model's base was loaded from (``sources.base.path``), so
``lorasave verify OUT`` finds it without ``--base``.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from lorasave.api import AdapterResult, MergeResult, has_chat_template, merge_sources
from lorasave.errors import InvalidOptionError, UnsupportedModelError
from lorasave.formats.quant_bases import check_quant_method, group_quantized
from lorasave.pipeline.cards import adapter_snippet, card_kind, hub_id, merged_snippet, write_card
from lorasave.pipeline.manifest import MANIFEST_NAME, sha256_file, write_manifest
from lorasave.pipeline.output import TOKENIZER_FILES, check_free_space, check_output_path, set_generation_eos, write_config
from lorasave.pipeline.run import PlannedOutput, run_single
from lorasave.sources.adapter import KEY_PREFIX, Adapter, TunerType, _check_config, _resolve_modules
from lorasave.sources.checkpoint import Checkpoint, MemoryEntry, logical_tensors
from lorasave.util.dtypes import FLOAT_DTYPES, parse_output_dtype
from lorasave.util.jsonio import load_json
from lorasave.util.options import MergeInto, SaveMethod, bnb_spec, output_quantizer, parse_enum
from lorasave.util.sizes import DEFAULT_MAX_SHARD_SIZE, parse_size

logger = logging.getLogger(__name__)

LIVE = Path("<live PeftModel>")
_WRAPPER_PARTS = (".base_layer.", ".original_module.")
_ADAPTER_PARTS = ("lora_", "hada_", "lokr_", "ia3_", ".modules_to_save.", "token_adapter.", "lora_magnitude_vector")


def _jsonable(v: Any) -> Any:
    """adapter_config.json spelling of values PEFT keeps as enums or sets."""
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, (set, frozenset)):
        return sorted(v)
    return str(v)


def _active_adapter(model: Any) -> str:
    name = getattr(model, "active_adapter", "default")
    if isinstance(name, (list, tuple)):
        if len(name) != 1:
            raise InvalidOptionError(f"the model has {len(name)} active adapters; activate one with set_adapter() before saving")
        name = name[0]
    return str(name)


def _live_adapter(model: Any) -> Adapter:
    """The active adapter's tensors and config, as PEFT's ``save_pretrained`` would save them."""
    from peft import get_peft_model_state_dict

    name = _active_adapter(model)
    config = json.loads(json.dumps(model.peft_config[name].to_dict(), default=_jsonable))
    state = get_peft_model_state_dict(model, adapter_name=name)
    loaded = {k if k.startswith(KEY_PREFIX) else KEY_PREFIX + k: v.detach() for k, v in state.items()}
    tuner = _check_config(LIVE, config)
    ad = Adapter(LIVE, config, LIVE, loaded=loaded, tuner=tuner)
    _resolve_modules(ad)
    return ad


def _base_state(model: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """The base model's own tensors under checkpoint names, without adapter parameters."""
    base = model.get_base_model()
    state: dict[str, torch.Tensor] = {}
    for name, tensor in base.state_dict(keep_vars=False).items():
        if any(part in name for part in _ADAPTER_PARTS):
            continue
        for part in _WRAPPER_PARTS:
            while part in name:
                name = name.replace(part, ".")
        state.setdefault(name, tensor)
    with contextlib.suppress(ImportError):
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(base, state)
    return state, base


def _live_checkpoint(model: Any) -> Checkpoint:
    state, base = _base_state(model)
    config = base.config.to_diff_dict()
    config.setdefault("architectures", [type(base).__name__])
    if not config.get("architectures"):
        config["architectures"] = [type(base).__name__]
    config["model_type"] = base.config.model_type
    ckpt = Checkpoint(LIVE, None, config, [], None, {n: MemoryEntry.of(n, t) for n, t in state.items()})
    ckpt.quant_method = check_quant_method(config, "the live model")
    if ckpt.quant_method is not None:
        from lorasave.sources.checkpoint import TensorReader

        with TensorReader() as reader:
            weights, used = group_quantized(ckpt.quant_method, config, ckpt.tensors, lambda e: reader.read(e).numpy().tobytes(), LIVE)  # type: ignore[arg-type]
        ckpt.tensors = logical_tensors(ckpt.tensors, weights, used)
    return ckpt


def save_pretrained_merged(
    model: Any,
    save_directory: str | os.PathLike[str],
    tokenizer: Any = None,
    save_method: str = "merged_16bit",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    *,
    dtype: str | torch.dtype | None = "auto",
    overwrite: bool = True,
    quant_type: str = "nf4",
    double_quant: bool = True,
) -> MergeResult | AdapterResult:
    """Save a live ``PeftModel`` merged (``merged_16bit`` / ``merged_4bit`` / compressed-tensors) or as its adapter (``lora``).

    Streams from the model's own tensors, module by module: peak memory grows by a few tensors,
    not by a merged copy. The model is not modified and stays trainable. The output equals what
    ``lorasave merge`` writes from the base checkpoint and the adapter PEFT would save.

    Args:
        model: a ``peft.PeftModel`` with one active adapter.
        save_directory: output folder (replaced atomically when it exists, as Unsloth does).
        tokenizer: saved alongside (``tokenizer.save_pretrained``); its EOS goes into
            ``generation_config.json``.
        save_method: ``"merged_16bit"``, ``"merged_4bit"``, ``"lora"``, or a compressed-tensors scheme
            for vLLM / SGLang (``"fp8_dynamic"``, ``"fp8_block"``, ``"w8a16"``, ``"w4a16"``, ``"w8a8"``,
            ``"nvfp4a16"``, ``"mxfp4a16"``), or ``"mxfp4"`` (gpt-oss's MXFP4 experts): ``lorasave.merge``'s ``save_method``.
        max_shard_size: shard limit in bytes or ``"5GB"`` (decimal units).
        dtype: ``"auto"`` (the base's), ``"bfloat16"``, ``"float16"``, ``"float32"``.
        overwrite: replace an existing ``save_directory`` (default True, as Unsloth).
        quant_type, double_quant: the 4-bit format for ``merged_4bit``.

    Returns:
        MergeResult for merged outputs; AdapterResult for ``lora`` (PEFT's own ``save_pretrained`` files).

    Raises:
        LorasaveError subclasses, as ``lorasave.merge``; InvalidOptionError for an unknown
        ``save_method``, or a model that is not a PeftModel with one active adapter.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise UnsupportedModelError(f"save_pretrained_merged needs a peft.PeftModel, got {type(model).__name__}")
    final = Path(os.path.abspath(save_directory))
    if save_method == "lora":
        return _save_lora(model, final, tokenizer, overwrite)
    method = parse_enum(SaveMethod, save_method, "save_method")
    assert isinstance(method, SaveMethod)
    check_output_path(final, [], overwrite)
    output_quantizer(method, None)  # a compressed-tensors method: the package is there
    t_start = time.perf_counter()
    was_training = model.training
    try:
        ckpt = _live_checkpoint(model)
        ad = _live_adapter(model)
        spec = (
            bnb_spec(quant_type=quant_type, blocksize=64, double_quant=double_quant, quant_input_dtype="bfloat16", quantization_from=None)
            if method is SaveMethod.MERGED_4BIT
            else None
        )
        base = model.get_base_model()

        def side_files(folder: Path, plan: Any, quant: dict[str, Any] | None) -> list[str]:
            write_config(ckpt.config, folder / "config.json", dtype=plan.out_dtype, quantization=quant, updates=plan.config_updates)
            names = ["config.json"]
            if getattr(base, "generation_config", None) is not None and base.can_generate():
                base.generation_config.save_pretrained(folder)
                names.append("generation_config.json")
            write_card(
                folder,
                kind=card_kind(method.value, plan.quantizer),
                base_model=hub_id(getattr(base.config, "_name_or_path", None)),
                architectures=ckpt.config.get("architectures"),
                adapters=[
                    {
                        "peft_type": ad.config.get("peft_type"),
                        "r": ad.config.get("r"),
                        "lora_alpha": ad.config.get("lora_alpha"),
                        "target_modules": ad.config.get("target_modules"),
                        "path": "live PeftModel",
                    }
                ],
                settings={"dtype": str(plan.out_dtype).removeprefix("torch."), "save_method": save_method},
                base_dir=None,
                load_snippet=merged_snippet(final.name, method.value, plan.quantizer),
                title=final.name,
            )
            names.append("README.md")
            if tokenizer is not None:
                before = set(os.listdir(folder))
                tokenizer.save_pretrained(folder)
                names += sorted(set(os.listdir(folder)) - before)
                eos = getattr(tokenizer, "eos_token_id", None)
                if eos is not None and "generation_config.json" in names:
                    note = set_generation_eos(folder / "generation_config.json", eos)
                    if note:
                        plan.notes.append(note)
            return names

        def describe_sources() -> dict[str, Any]:
            described: dict[str, Any] = {
                "live_model": {"class": type(base).__name__, "name_or_path": getattr(base.config, "_name_or_path", None)},
                "adapters": [{"peft_type": ad.config.get("peft_type"), "r": ad.config.get("r"), "lora_alpha": ad.config.get("lora_alpha")}],
            }
            recorded = _base_folder(base, ckpt)
            if recorded is not None:
                described["base"] = recorded
            return described

        return merge_sources(
            ckpt,
            [ad],
            final,
            out_dtype=parse_output_dtype(dtype),
            shard_limit=parse_size(max_shard_size),
            weights=None,
            method=method,
            into=MergeInto.BASE,
            spec=spec,
            progress=False,
            side_files=side_files,
            describe_sources=describe_sources,
            extra_settings={"source": "live PeftModel"},
            t_start=t_start,
            overwrite=overwrite,
        )
    finally:
        model.train(was_training)


def _base_folder(base: Any, ckpt: Checkpoint) -> dict[str, Any] | None:
    """``sources.base`` for a live model loaded from a local folder (or a cached Hub id) holding the same weights, else None.

    A base quantized while loading (``BitsAndBytesConfig`` on a 16-bit folder) is not recorded:
    its folder holds other weights than the ones merged.
    """
    name = getattr(base.config, "_name_or_path", None)
    if not name:
        return None
    from lorasave.sources.checkpoint import resolve_source

    try:
        folder, hub = resolve_source(str(name), "base")
    except Exception:  # a name that is neither a folder nor in the cache: nothing to record
        return None
    if not (folder / "config.json").is_file():
        return None
    if ckpt.quant_method is not None:
        try:
            on_disk = load_json(folder / "config.json")
        except (OSError, ValueError):
            return None
        if not isinstance(on_disk, dict) or "quantization_config" not in on_disk:
            return None
    return {"path": str(folder.resolve()), "hub_id": hub, "from": "the live model's config._name_or_path"}


def _save_lora(model: Any, final: Path, tokenizer: Any, overwrite: bool) -> AdapterResult:
    check_output_path(final, [], overwrite)

    def finish(folder: Path, _: Any) -> AdapterResult:
        model.save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        # lorasave's card instead of PEFT's template, whose base_model (a local path) the Hub refuses
        base = model.get_base_model()
        name_or_path = getattr(base.config, "_name_or_path", None)
        described = json.loads(json.dumps(model.peft_config[_active_adapter(model)].to_dict(), default=_jsonable))
        write_card(
            folder,
            kind="adapter",
            base_model=hub_id(name_or_path),
            architectures=None,
            adapters=[{k: described.get(k) for k in ("peft_type", "r", "lora_alpha", "target_modules")} | {"path": "live PeftModel"}],
            settings={"dtype": "as trained", "save_method": "lora"},
            base_dir=None,
            load_snippet=adapter_snippet(str(name_or_path or "BASE"), final.name),
            title=final.name,
        )
        check_free_space(final, 0)
        files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith(".")}
        name = _active_adapter(model)
        cfg = model.peft_config[name]
        n_tensors = len(get_peft_model_state_dict(model, adapter_name=name))
        write_manifest(
            folder,
            command="adapter",
            sources={"live_model": {"class": type(model.get_base_model()).__name__}},
            settings={"save_method": "lora"},
            result={"peft_type": str(getattr(cfg, "peft_type", "")), "n_tensors": n_tensors},
            files=files,
        )
        tok_files = [n for n in TOKENIZER_FILES if n in files]
        return AdapterResult(final, sorted([*files, MANIFEST_NAME]), n_tensors, "as-is", tok_files, has_chat_template(folder))

    from peft import get_peft_model_state_dict

    saved: AdapterResult = run_single(PlannedOutput(command="adapter", final=final, overwrite=overwrite, stamps={}, needed_bytes=0, finish=finish))
    return saved


__all__ = ["save_pretrained_merged"]

_ = (TunerType, FLOAT_DTYPES)  # re-exported names used by type checkers only
