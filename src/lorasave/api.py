"""The public operations; the CLI is a thin shell over these functions."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorasave.formats.bnb import Bnb4bitSpec, import_bnb, require_bnb
from lorasave.formats.compressed import CompressedSpec
from lorasave.formats.safetensors import SafetensorsShardWriter
from lorasave.formats.safetensors.header import layout, read_header, serialize_header
from lorasave.formats.safetensors.output import SafetensorsOutput
from lorasave.merging.stream import Timings
from lorasave.pipeline.cards import adapter_snippet, card_kind, hub_id, merged_snippet, write_card
from lorasave.pipeline.manifest import MANIFEST_NAME, SourceHasher, result_dict, sha256_file, write_manifest
from lorasave.pipeline.output import (
    align_generation_eos,
    carry_files,
    carry_plan,
    check_output_path,
    tokenizer_source,
    write_config,
)
from lorasave.pipeline.run import PlannedOutput, run_single, single_output
from lorasave.plan.merge_plan import INDEX_NAME, MergePlan, build_plan
from lorasave.sources import stamp as source_stamp
from lorasave.sources.adapter import ADAPTER_CONFIG_NAME, ADAPTER_SAFE_NAME, Adapter, load_adapter, load_adapters
from lorasave.sources.architecture import inspect_architecture
from lorasave.sources.checkpoint import Checkpoint, TensorReader
from lorasave.sources.named_base import open_base
from lorasave.util.dtypes import FLOAT_DTYPES, dtype_name, parse_output_dtype, st_dtype
from lorasave.util.jsonio import read_json
from lorasave.util.notes import log_notes
from lorasave.util.options import MergeInto, OutputQuantizer, SaveMethod, bnb_spec, output_quantizer, parse_enum
from lorasave.util.sizes import DEFAULT_MAX_SHARD_SIZE, parse_size

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


@dataclass
class MergeResult:
    """What ``merge`` wrote.

    Attributes:
        output: the output folder.
        files: names of the files written, manifest included.
        n_tensors: tensors written.
        n_merged: tensors an adapter changed (deltas, scales, replaced rows or whole tensors).
        total_bytes: bytes of the weight files.
        dtype: floating dtype of the output (``"bfloat16"``...).
        seconds: wall time of the whole call.
        timings: seconds per phase: read, merge (arithmetic), write, hash. Reading and merging run on
            the main thread while writing and hashing run on a writer thread, so the phases overlap
            and their sum exceeds ``seconds``.
        notes: fallbacks and facts worth knowing.
        quantization: the weight format when not plain floats (``"nf4 4-bit"``), else None.
        verification: the ``verify`` result when ``verify=True`` was asked.
    """

    output: Path
    files: list[str]
    n_tensors: int
    n_merged: int
    total_bytes: int
    dtype: str
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    quantization: str | None = None
    verification: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``--json``)."""
        return result_dict(self)

    def summary(self) -> str:
        """One line for humans."""
        form = f"{self.quantization}, {self.dtype} compute" if self.quantization else self.dtype
        return (
            f"merged {self.n_merged} of {self.n_tensors} tensors into {self.output} "
            f"({len([f for f in self.files if f.endswith('.safetensors')])} shard(s), {self.total_bytes / 1e6:.1f} MB, {form}) "
            f"in {self.seconds:.1f} s" + ("; verified" if self.verification and self.verification.get("ok") else "")
        )


def _describe_adapter(ad: Adapter, hashes: dict[str, str]) -> dict[str, Any]:
    cfg = ad.config
    return {
        "path": str(ad.root.resolve()),
        "files": hashes,
        "peft_type": cfg.get("peft_type"),
        "r": cfg.get("r"),
        "lora_alpha": cfg.get("lora_alpha"),
        "use_rslora": bool(cfg.get("use_rslora", False)),
        "rank_pattern": cfg.get("rank_pattern") or {},
        "alpha_pattern": cfg.get("alpha_pattern") or {},
        "target_modules": cfg.get("target_modules"),
        "base_model_name_or_path": cfg.get("base_model_name_or_path"),
        "modules": len(ad.lora),
    }


def plan_merge(
    base: PathLike | Checkpoint | None,
    adapters: PathLike | Sequence[PathLike],
    output: PathLike,
    *,
    dtype: str | torch.dtype | None = "auto",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    tokenizer: PathLike | None = None,
    allow_pickle: bool = False,
    progress: bool = False,
    save_method: str | SaveMethod = SaveMethod.MERGED_16BIT,
    merge_into: str | MergeInto = MergeInto.BASE,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    quant_input_dtype: str | torch.dtype = "bfloat16",
    quantization_from: PathLike | None = None,
    weights: Sequence[float] | None = None,
    verify: bool = False,
) -> PlannedOutput:
    """Plan ``merge``: a sharded safetensors checkpoint of LoRA adapter(s) merged into a base.

    Streams tensor by tensor: W' = W0 + scaling * (B @ A) for every targeted weight
    (``(B @ A).T`` for GPT-2 ``Conv1D``), computed in float32 and rounded once to the output
    dtype; every other tensor is copied (cast when ``dtype`` asks). Shards, their names and the
    index match transformers 5 ``save_pretrained`` for the same ``max_shard_size``. The output
    folder also gets ``config.json`` (``dtype`` updated), ``generation_config.json``, license
    files, the tokenizer (``tokenizer``, else the first adapter's, else the base's) and
    ``lorasave.json``. It appears atomically: complete, or not at all.

    Args:
        base: base folder (``config.json`` + safetensors) or a Hub id in the local HF cache; None: the
            base the adapters' ``adapter_config.json`` name (``base_model_name_or_path``,
            ``sources.named_base``), said in the notes.
        adapters: one PEFT adapter folder or several (their deltas add up).
        output: the folder to create.
        dtype: ``"auto"`` (the base's dtype), ``"bfloat16"``, ``"float16"`` or ``"float32"``;
            applies to every floating tensor except those transformers keeps in float32.
        max_shard_size: shard limit in bytes, or a string such as ``"5GB"`` (decimal units:
            5GB = 5 * 10**9 bytes). Default 5GB; transformers 5's own default is 50GB.
        overwrite: replace an existing ``output`` (after the new one is complete).
        tokenizer: folder whose tokenizer files are copied instead.
        allow_pickle: accept ``adapter_model.bin`` (loaded with ``torch.load(weights_only=True)``).
        progress: show a progress bar in bytes on stderr.
        save_method: ``"merged_16bit"`` (a plain checkpoint in ``dtype``), ``"merged_4bit"``
            (Linear weights quantized once, from the float32 merge, to bitsandbytes 4-bit with
            ``quant_type`` / ``blocksize`` / ``double_quant``, loadable by ``from_pretrained``), or a
            compressed-tensors scheme for vLLM / SGLang, data-free: ``"fp8_dynamic"``, ``"fp8_block"``,
            ``"w8a16"``, ``"w4a16"``, ``"w8a8"``, ``"nvfp4a16"``, ``"mxfp4a16"`` (``formats.compressed``;
            the Linear weights of the merge rounded to ``dtype``, then quantized as llm-compressor's
            ``oneshot`` does with the same preset; on a block-scaled FP8 base ``"fp8_block"`` keeps the
            base's layout, ``formats.fp8.Fp8BlockSpec``), or ``"mxfp4"`` (gpt-oss's fused experts in its own
            MXFP4 layout, ``formats.mxfp4``). A quantized BASE (bitsandbytes, FP8, compressed-tensors FP8,
            gpt-oss MXFP4: ``formats.quant_bases``) is dequantized to float32 before the merge.
        merge_into: ``"base"`` adds the delta to BASE's weights (dequantized to float32 first
            when BASE is quantized); ``"dequantized"`` first round-trips each
            targeted weight of a 16-bit BASE through the 4-bit quantization a QLoRA adapter was
            trained against (``quant_type``, ``blocksize`` in elements, ``double_quant``,
            ``quant_input_dtype``, or all read from ``quantization_from``'s config.json).
        quantization_from: a bitsandbytes 4-bit checkpoint folder whose ``quantization_config``
            gives the 4-bit settings.
        weights: one combination weight per adapter (default 1.0 each): W0 + Σ wᵢ·ΔWᵢ, each ΔWᵢ
            with its own scaling; PEFT's ``add_weighted_adapter(combination_type="cat")``.
        verify: run ``lorasave verify`` (tensors level) on the output before the final rename;
            the result goes into the manifest and the model card.

    Returns:
        The planned output; ``pipeline.run.run_single`` writes it and returns a MergeResult.

    Raises:
        LorasaveError subclasses (planning: everything but the last three; writing: the rest): SourceNotFoundError, NotAnAdapterError, CheckpointFormatError,
        UnsafePathError, PickleRefusedError, AdapterMismatchError, UnsupportedAdapterError,
        UnsupportedModelError, OutputExistsError, InsufficientDiskError (DiskFullError when OUT's
        file system fills during the run), NonFiniteResultError, InvalidOptionError.
    """
    t_start = time.perf_counter()
    out_dtype = parse_output_dtype(dtype)
    shard_limit = parse_size(max_shard_size)
    ckpt = open_base(base, adapters)
    ads = load_adapters(adapters, allow_pickle=allow_pickle)
    tok_dir = tokenizer_source(tokenizer, [a.root for a in ads], ckpt.root)
    final = check_output_path(Path(output), [ckpt.root, *(a.root for a in ads), tok_dir], overwrite)
    method = parse_enum(SaveMethod, save_method, "save_method")
    into = parse_enum(MergeInto, merge_into, "merge_into")
    spec = None
    output_quantizer(method, None)  # a compressed-tensors method: the package is there
    if method is SaveMethod.MERGED_4BIT or into is MergeInto.DEQUANTIZED:
        if into is MergeInto.DEQUANTIZED:
            import_bnb()  # the 4-bit round trip dequantizes with bitsandbytes
        else:
            require_bnb()  # writing 4-bit does not import it (formats.bnb_encode)
        spec = bnb_spec(
            quant_type=quant_type,
            blocksize=blocksize,
            double_quant=double_quant,
            quant_input_dtype=quant_input_dtype,
            quantization_from=quantization_from,
        )
    carry = carry_plan(ckpt.root, tok_dir)
    hasher = SourceHasher()  # hashes the sources on another core while the plan is made
    hasher.submit(ckpt.source_files())
    for ad in ads:
        hasher.submit(ad.source_files())

    def side_files(folder: Path, plan: MergePlan, quant: dict[str, Any] | None) -> list[str]:
        cfg = read_json(ckpt.root / "config.json")
        write_config(cfg, folder / "config.json", dtype=plan.out_dtype, quantization=quant, updates=plan.config_updates)
        carried = carry_files(ckpt.root, tok_dir, folder, carry)
        if tok_dir.resolve() != ckpt.root.resolve():
            note = align_generation_eos(folder, tok_dir)
            if note:
                plan.notes.append(note)
        base_id = ckpt.hub_id or next((hub_id(a.config.get("base_model_name_or_path")) for a in ads if hub_id(a.config.get("base_model_name_or_path"))), None)
        write_card(
            folder,
            kind=card_kind(method.value, plan.quantizer),
            base_model=base_id,
            architectures=ckpt.config.get("architectures"),
            adapters=[_describe_adapter(a, {}) for a in ads],
            settings=_card_settings(plan, method, into, spec, weights),
            base_dir=ckpt.root,
            load_snippet=merged_snippet(final.name, method.value, plan.quantizer),
            title=final.name,
        )
        return ["config.json", *carried, "README.md"]

    def describe_sources() -> dict[str, Any]:
        return {
            "base": {"path": str(ckpt.root.resolve()), "hub_id": ckpt.hub_id, "files": hasher.result(ckpt.source_files(), ckpt.root)},
            "adapters": [_describe_adapter(a, hasher.result(a.source_files(), a.root)) for a in ads],
            "tokenizer": str(tok_dir.resolve()),
        }

    planned = plan_merge_sources(
        ckpt,
        ads,
        final,
        out_dtype=out_dtype,
        shard_limit=shard_limit,
        weights=weights,
        method=method,
        into=into,
        spec=spec,
        progress=progress,
        side_files=side_files,
        describe_sources=describe_sources,
        extra_settings={"allow_pickle": allow_pickle},
        t_start=t_start,
        verify_output=verify,
        overwrite=overwrite,
        carried_bytes=carry.nbytes,
    )
    planned.cleanup.append(hasher.close)
    return planned


merge = single_output(plan_merge, "merge", "Merge LoRA adapter(s) into a base checkpoint and write a sharded safetensors checkpoint.", "MergeResult")


def _card_settings(plan: MergePlan, method: SaveMethod, into: MergeInto, spec: Bnb4bitSpec | None, weights: Sequence[float] | None) -> dict[str, Any]:
    """The settings a model card shows."""
    return {
        "dtype": dtype_name(plan.out_dtype),
        "save_method": method.value,
        "merge_into": into.value if into is not MergeInto.BASE else None,
        "4-bit quantization": f"{spec.quant_type}, blocksize {spec.blocksize}, double quant {spec.double_quant}" if spec and not method.compressed else None,
        "quantization": plan.quantizer.label if (method.compressed or getattr(plan.quantizer, "base_layout", False)) and plan.quantizer is not None else None,
        "adapter weights": ", ".join(map(str, weights)) if weights else None,
        "tensors changed by the adapters": len(plan.merged),
    }


def _verify_staged(folder: Path, files: dict[str, str]) -> dict[str, Any]:
    """Tensors-level ``verify`` of a staged output; records the result in its model card.

    Raises:
        VerificationError: the output does not match its sources.
    """
    from lorasave.pipeline.finalize import verify_staged

    report = verify_staged(folder, folder)
    line = (
        f"`lorasave verify` (tensors level) passed before the output was written: {report.counts()} "
        f"(bit-equal: equal to the base or the adapter's full tensor; probed: LoRA-merged tensors within the rounding bound of "
        f"the random-probe check, worst {report.max_probe_error:.3f} of the bound)."
    )
    card = folder / "README.md"
    if card.is_file():
        text = card.read_text(encoding="utf-8")
        head, sep, _ = text.partition("## Verification\n")
        card.write_text(head + sep + "\n" + line + "\n", encoding="utf-8")
        files["README.md"] = sha256_file(card)
    return {"level": "tensors", "ok": True, "summary": line, "max_probe_error": report.max_probe_error, "not_probed": len(report.not_probed)}


def plan_merge_sources(
    ckpt: Checkpoint,
    ads: list[Adapter],
    final: Path,
    *,
    out_dtype: torch.dtype | None,
    shard_limit: int,
    weights: Sequence[float] | None,
    method: SaveMethod,
    into: MergeInto,
    spec: Bnb4bitSpec | None,
    progress: bool,
    side_files: Callable[[Path, MergePlan, dict[str, Any] | None], list[str]],
    describe_sources: Callable[[], dict[str, Any]],
    extra_settings: dict[str, Any],
    t_start: float,
    verify_output: bool = False,
    overwrite: bool = False,
    carried_bytes: int = 0,
) -> PlannedOutput:
    """Plan a merge of opened sources into ``final`` (shared by ``merge``, ``batch`` and the live API).

    Args:
        side_files: writes config.json, tokenizer and other non-weight files into the staging
            folder; returns their names.
        describe_sources: the manifest's ``sources`` section.
        verify_output: run ``verify`` (tensors level) on the staged output before the final
            rename; a failure raises and nothing is written.
        overwrite: at the final rename, replace a lorasave output (or an empty folder) at ``final``.
        carried_bytes: bytes of the files ``side_files`` copies from the sources, counted in the
            free-space check.
    """
    arch = inspect_architecture(ckpt.config)
    quantizer: OutputQuantizer | None = output_quantizer(method, spec)
    plan = build_plan(
        ckpt,
        ads,
        arch,
        out_dtype=out_dtype,
        max_shard_size=shard_limit,
        weights=list(weights) if weights is not None else None,
        merge_into=spec if into is MergeInto.DEQUANTIZED else None,
        quantize=quantizer,
    )
    log_notes(logger, plan.notes)
    writer = SafetensorsOutput(plan)

    def finish(folder: Path, job_timings: Timings) -> MergeResult:
        files = dict(writer.files)
        timings = Timings().add(job_timings).add(writer.timings)
        if plan.index is not None and any(sh.deferred for sh in plan.shards):  # 4-bit: sizes known only now
            written = [read_header(folder / sh.filename) for sh in plan.shards]
            plan.index["metadata"]["total_size"] = sum(e.nbytes for h in written for e in h.tensors.values())  # type: ignore[index]
        index = plan.index_bytes()
        if index is not None:
            (folder / INDEX_NAME).write_bytes(index)
        quant = plan.quantizer.quantization_config(plan.out_dtype) if plan.quantizer is not None else None
        side = side_files(folder, plan, quant)
        for name in [INDEX_NAME if index is not None else None, *side]:
            if name is not None:
                files[name] = sha256_file(folder / name)
        settings = {
            "dtype": dtype_name(plan.out_dtype),
            "max_shard_size": shard_limit,
            "save_method": method.value,
            "merge_into": into.value,
            "weights": list(weights) if weights is not None else None,
            "bnb_4bit": spec.describe() if spec else None,
            "compressed_tensors": plan.quantizer.describe() if isinstance(plan.quantizer, CompressedSpec) else None,
            "base_layout": plan.quantizer.describe() if getattr(plan.quantizer, "base_layout", False) else None,
            **extra_settings,
        }
        summary = {
            "n_tensors": len(plan.tensors),
            "n_merged": len(plan.merged),
            "merged": plan.merged,
            "architecture": arch.model_class,
            "notes": plan.notes,
        }
        sources = describe_sources()
        write_manifest(folder, command="merge", sources=sources, settings=settings, result=summary, files=files)
        if verify_output:
            summary["verification"] = _verify_staged(folder, files)
            write_manifest(folder, command="merge", sources=sources, settings=settings, result=summary, files=files)
        result = MergeResult(
            output=final,
            files=sorted([*files, MANIFEST_NAME]),
            n_tensors=len(plan.tensors),
            n_merged=len(plan.merged),
            total_bytes=plan.total_bytes,
            dtype=dtype_name(plan.out_dtype),
            seconds=round(time.perf_counter() - t_start, 3),
            timings=timings.as_dict(),
            notes=list(plan.notes),
            quantization=plan.quantizer.label if plan.quantizer is not None else None,
            verification=summary.get("verification"),
        )
        logger.debug("%s", result.summary())
        return result

    key = (tuple(weights) if weights is not None else None, into.value, repr(spec.describe()) if spec and into is MergeInto.DEQUANTIZED else None)
    return PlannedOutput(
        command="merge",
        final=final,
        overwrite=overwrite,
        stamps=source_stamp.record(ckpt, ads),
        plan=plan,
        adapters=ads,
        writers=[writer],
        needed_bytes=plan.total_bytes,
        finish=finish,
        carried_bytes=carried_bytes,
        merge_key=key,
        progress=progress,
        parts=[sh.filename for sh in plan.shards],
        split=lambda names: SafetensorsOutput(plan, shards=names),
    )


def merge_sources(ckpt: Checkpoint, ads: list[Adapter], final: Path, **options: Any) -> MergeResult:
    """``plan_merge_sources`` run as one pass (the live API's path)."""
    result: MergeResult = run_single(plan_merge_sources(ckpt, ads, final, **options))
    return result


@dataclass
class AdapterResult:
    """What ``save_adapter`` (and ``save_pretrained_merged(save_method="lora")``) wrote.

    Attributes:
        output: the output folder.
        files: names of the files written, manifest included.
        n_tensors: tensors in ``adapter_model.safetensors``.
        dtype: dtype of floating tensors (``"as-is"`` when unchanged).
        tokenizer_files: the tokenizer and chat template files carried (the adapter folder's, or the
            live tokenizer's ``save_pretrained``); empty when there was none.
        chat_template: whether OUT holds a chat template (``chat_template.jinja`` / ``.json``, or one in
            ``tokenizer_config.json``).
    """

    output: Path
    files: list[str]
    n_tensors: int
    dtype: str
    tokenizer_files: list[str] = field(default_factory=list)
    chat_template: bool = False

    @property
    def manifest(self) -> Path:
        """``OUT/lorasave.json``."""
        return self.output / MANIFEST_NAME

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``--json``), the manifest's path included."""
        return {**result_dict(self), "manifest": str(self.manifest)}

    def summary(self) -> str:
        """One line for humans."""
        tok = ""
        if self.tokenizer_files:
            tok = " with its tokenizer and chat template" if self.chat_template else " with its tokenizer"
        return f"saved adapter ({self.n_tensors} tensors, {self.dtype}){tok} to {self.output}"


def has_chat_template(folder: Path) -> bool:
    """Whether ``folder`` holds a chat template: ``chat_template.jinja`` / ``.json``, or ``chat_template`` in ``tokenizer_config.json``."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        cfg = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    except (OSError, ValueError):
        return False
    return bool(isinstance(cfg, dict) and cfg.get("chat_template"))


def save_adapter(
    adapter: PathLike,
    output: PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> AdapterResult:
    """Re-save a PEFT adapter as ``adapter_config.json`` + ``adapter_model.safetensors`` (+ ``lorasave.json``).

    The output loads with ``PeftModel.from_pretrained``. Tensor names are kept; floating
    tensors are cast to ``dtype`` when given. The adapter folder's tokenizer and chat template
    (``pipeline.output.TOKENIZER_FILES``: ``tokenizer.json``, ``tokenizer_config.json`` with its
    template, ``chat_template.jinja``...) are carried as they are, as ``save_method="lora"`` keeps
    the live tokenizer; a tokenizer file linking out of the folder is refused, an optional one skipped
    with a note (``carry_plan``).

    Args:
        adapter: PEFT adapter folder.
        output: folder to create.
        dtype: None/``"auto"`` keeps each tensor's dtype; else ``"bfloat16"``, ``"float16"``, ``"float32"``.
        overwrite: replace an existing output.
        allow_pickle: accept ``adapter_model.bin`` (``torch.load(weights_only=True)``).

    Returns:
        AdapterResult (``summary()``, ``to_dict()``, ``manifest``).

    Raises:
        LorasaveError subclasses, as ``load_adapter`` and ``check_output_path``; UnsafePathError for a
        tokenizer file linking out of the adapter folder.
    """
    out_dtype = parse_output_dtype(dtype)
    ad = load_adapter(adapter, allow_pickle=allow_pickle)
    final = check_output_path(Path(output), [ad.root], overwrite)
    carry = carry_plan(None, ad.root)
    keys = ad.keys()
    with TensorReader() as reader:
        tensors = {}
        for k in keys:
            t = ad.tensor(k, reader)
            if out_dtype is not None and t.dtype in FLOAT_DTYPES:
                t = t.to(out_dtype)
            tensors[k] = t.contiguous()
    lay = layout((k, st_dtype(t.dtype), tuple(t.shape)) for k, t in tensors.items())
    header = serialize_header(lay, {"format": "pt"})

    def finish(folder: Path, _: Timings) -> AdapterResult:
        files: dict[str, str] = {}
        writer = SafetensorsShardWriter(folder / ADAPTER_SAFE_NAME, header, lay)
        writer.begin()
        for entry in lay:
            t = tensors[entry.name]
            writer.write(entry.name, memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B"))
        files[ADAPTER_SAFE_NAME] = writer.end()
        shutil.copyfile(ad.root / ADAPTER_CONFIG_NAME, folder / ADAPTER_CONFIG_NAME)
        files[ADAPTER_CONFIG_NAME] = sha256_file(folder / ADAPTER_CONFIG_NAME)
        carried = carry_files(None, ad.root, folder, carry)
        for n in carried:
            files[n] = sha256_file(folder / n)
        base_name = ad.config.get("base_model_name_or_path")
        write_card(
            folder,
            kind="adapter",
            base_model=base_name,
            architectures=None,
            adapters=[_describe_adapter(ad, {})],
            settings={"dtype": dtype_name(out_dtype) if out_dtype else "as saved"},
            base_dir=None,
            load_snippet=adapter_snippet(str(base_name or "BASE"), final.name),
            title=final.name,
        )
        files["README.md"] = sha256_file(folder / "README.md")
        hashes = {p.name: sha256_file(p) for p in ad.source_files()}
        write_manifest(
            folder,
            command="adapter",
            sources={"adapters": [_describe_adapter(ad, hashes)]},
            settings={"dtype": dtype_name(out_dtype) if out_dtype else "as-is", "allow_pickle": allow_pickle},
            result={"n_tensors": len(tensors), "tokenizer_files": carried},
            files=files,
        )
        dt = dtype_name(out_dtype) if out_dtype else "as-is"
        return AdapterResult(final, sorted([*files, MANIFEST_NAME]), len(tensors), dt, carried, has_chat_template(folder))

    planned = PlannedOutput(
        command="adapter",
        final=final,
        overwrite=overwrite,
        stamps=source_stamp.record(None, [ad]),
        needed_bytes=len(header) + (lay[-1].end if lay else 0),
        carried_bytes=(ad.root / ADAPTER_CONFIG_NAME).stat().st_size + carry.nbytes,
        finish=finish,
    )
    result: AdapterResult = run_single(planned)
    return result
