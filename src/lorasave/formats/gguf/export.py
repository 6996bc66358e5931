"""``lorasave gguf``: merge LoRA adapter(s) into a base and write GGUF file(s) of one or more types.

The model file itself (names, types, metadata, the writer) is ``formats.gguf.model``; this module
plans the command as one output of the pipeline (``pipeline.run``): one :class:`GgufModel`, one
writer per type, all fed by one read and one merge of the base (the k-quants' blocks encoded by
llama.cpp's ``ggml_quantize_chunk`` in the same pass, no intermediate file), then the Modelfile,
the card and ``lorasave.json``, verification, and the atomic rename.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from lorasave.errors import InvalidOptionError
from lorasave.formats.gguf import mix as gguf_mix
from lorasave.formats.gguf import quant as gguf_quant
from lorasave.formats.gguf.model import (
    ExtraTensor,
    GgufModel,
    GgufTensor,
    add_model_params,
    extra_tensors,
    ggml_type,
    gguf_tensors,
    permute_qk,
)
from lorasave.formats.gguf.naming import model_stem
from lorasave.formats.gguf.output import GgufOutput
from lorasave.formats.gguf.quant import GgufType
from lorasave.merging.stream import Timings
from lorasave.pipeline.manifest import MANIFEST_NAME, result_dict, sha256_file, sources_record, write_manifest
from lorasave.pipeline.output import check_output_path, tokenizer_source
from lorasave.pipeline.run import PlannedOutput, single_output
from lorasave.sources import stamp as source_stamp
from lorasave.sources.adapter import Adapter, load_adapters
from lorasave.sources.checkpoint import Checkpoint
from lorasave.sources.named_base import open_base
from lorasave.util.names import check_file_name
from lorasave.util.notes import log_notes

logger = logging.getLogger(__name__)

#: Suffix of the ``--imatrix`` file's copy in the output, ``<stem>.imatrix`` (``naming.model_stem``; as imatrix files are
#: published beside GGUF files; llama.cpp tells its GGUF and legacy layouts apart by content). Not
#: ``.gguf``: it is not a model.
IMATRIX_SUFFIX = ".imatrix"

__all__ = [
    "ExtraTensor",
    "GgufResult",
    "GgufTensor",
    "add_model_params",
    "export_gguf",
    "extra_tensors",
    "ggml_type",
    "gguf_tensors",
    "parse_types",
    "permute_qk",
    "plan_gguf",
]

PathLike = str | os.PathLike[str]


@dataclass
class GgufResult:
    """What ``export_gguf`` wrote.

    Attributes:
        output: the output folder.
        gguf_file: the ``.gguf`` file inside it.
        files: names of the files written, manifest included.
        n_tensors: tensors in the GGUF file.
        n_merged: tensors an adapter changed.
        type: the requested type (``"q8_0"``...).
        tensor_types: GGML type name -> number of tensors of that type.
        total_bytes: size of the GGUF file in bytes.
        seconds: wall time of the call.
        notes: fallbacks taken and facts worth knowing.
        verification: the ``verify`` result, when ``verify=True`` was asked.
        modelfile: the Ollama ``Modelfile``, when one was written.
        chat_template_family: the chat template family its ``TEMPLATE`` was taken from, if known.
        llama_cpp_quantized: the first file's blocks were encoded by llama.cpp's own quantizer
            (``ggml_quantize_chunk``, the k-quants), in the streaming pass.
        gguf_files: every ``.gguf`` written, one per requested type, in the order asked
            (``gguf_file`` is the first; the other fields describe it).
        types: the requested types, in order.
        quality: the quality report (``report=True``: ``lorasave.verify.quality.QualityReport``).
        converter: set when llama.cpp's own converter wrote the files (``formats.gguf.fallback``):
            what wrote them, e.g. ``"llama.cpp's convert_hf_to_gguf.py (v0.5.0)"``.
    """

    output: Path
    gguf_file: Path
    files: list[str]
    n_tensors: int
    n_merged: int
    type: str
    tensor_types: dict[str, int]
    total_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    verification: dict[str, Any] | None = None
    modelfile: Path | None = None
    chat_template_family: str | None = None
    llama_cpp_quantized: bool = False
    gguf_files: list[Path] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    quality: Any = None
    converter: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``--json``)."""
        return result_dict(self)

    def summary(self) -> str:
        """One line for humans (and the quality table, when there is one)."""
        if self.quality is not None:
            return self._summary() + "\n\n" + self.quality.summary()
        return self._summary()

    def _summary(self) -> str:
        types = ", ".join(f"{n} {k}" for k, n in sorted(self.tensor_types.items()))
        verified = "; verified" if self.verification and self.verification.get("ok") else ""
        size = f"{self.total_bytes / 1e6:.1f} MB"
        how = "; blocks encoded by llama.cpp's quantizer in the stream" if self.llama_cpp_quantized else ""
        if self.converter:
            how = f"; written by {self.converter} from the merged checkpoint, intermediates removed"
        ollama = "; Modelfile for Ollama" if self.modelfile else ""
        if len(self.gguf_files) > 1:
            names = ", ".join(p.name for p in self.gguf_files)
            done = f"{self.n_merged} merged) in {self.seconds:.1f} s{how if self.converter else ''}{ollama}{verified}"
            return f"wrote {len(self.gguf_files)} GGUF files into {self.output} from one read ({names}; {done}"
        return f"wrote {self.gguf_file} ({self.n_tensors} tensors: {types}; {size}, {self.n_merged} merged) in {self.seconds:.1f} s{how}{ollama}{verified}"


@dataclass(frozen=True)
class _SideFiles:
    files: list[str]
    modelfile: str | None
    family: str | None


def _side_files(
    folder: Path,
    title: str,
    filename: str,
    type: GgufType,
    counts: dict[str, int],
    notes: list[str],
    ckpt: Checkpoint,
    ads: list[Adapter],
    tok_dir: Path,
    modelfile: bool,
    more_files: list[tuple[str, str, dict[str, int]]] | None = None,
) -> _SideFiles:
    """The Ollama ``Modelfile`` (when asked and there is a chat template) and the ``README.md`` card."""
    from lorasave.formats.gguf.ollama import MODELFILE_NAME, write_modelfile
    from lorasave.pipeline.cards import hub_id, write_gguf_card

    files: list[str] = []
    family = None
    if modelfile:
        mf = write_modelfile(folder, filename, tok_dir, config_dirs=[ckpt.root])
        notes.extend(mf.notes)
        family = mf.family.value if mf.family else None
        if mf.path is not None:
            files.append(MODELFILE_NAME)
    base_id = ckpt.hub_id or next((hub_id(a.config.get("base_model_name_or_path")) for a in ads if hub_id(a.config.get("base_model_name_or_path"))), None)
    keys = ("peft_type", "r", "lora_alpha", "target_modules", "base_model_name_or_path")
    write_gguf_card(
        folder,
        title=title,
        gguf_file=filename,
        type=type.value,
        tensor_types=counts,
        base_model=base_id,
        architectures=ckpt.config.get("architectures"),
        adapters=[{"path": str(a.root.resolve()), **{k: a.config.get(k) for k in keys}} for a in ads],
        base_dir=ckpt.root,
        modelfile=bool(files),
        notes=notes,
        more_files=more_files,
    )
    return _SideFiles([*files, "README.md"], MODELFILE_NAME if files else None, family)


def parse_types(type: str | Sequence[str]) -> list[GgufType]:
    """``"q8_0,q4_k_m"`` or ``["q8_0", "q4_k_m"]`` -> the types, in order, each once.

    Raises:
        InvalidOptionError: an unknown type, or an empty list.
    """
    names = [p.strip() if isinstance(p, str) else p for p in (type.split(",") if isinstance(type, str) else type)]
    if len(names) > len(GgufType):
        raise InvalidOptionError(f"{len(names)} GGUF types given; there are {len(GgufType)}")
    out: list[GgufType] = []
    for n in names:
        try:
            t = GgufType.parse(str(n))
        except ValueError:
            raise InvalidOptionError(f"GGUF type {n!r} is not supported; choose one of {', '.join(t.value for t in GgufType)}") from None
        if t not in out:
            out.append(t)
    if not out:
        raise InvalidOptionError("no GGUF type given; e.g. --type q8_0 or --type q8_0,q4_k_m,f16")
    return out


def plan_gguf(
    base: PathLike | Checkpoint | None,
    adapters: PathLike | Sequence[PathLike] | Sequence[Adapter],
    output_dir: PathLike,
    *,
    type: str | Sequence[str] = "f16",
    overwrite: bool = False,
    name: str | None = None,
    tokenizer: PathLike | None = None,
    allow_pickle: bool = False,
    verify: bool = False,
    modelfile: bool = True,
    progress: bool = False,
    pure: bool = False,
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    report: bool = False,
    report_text: PathLike | None = None,
    imatrix: PathLike | None = None,
    describe_sources: Callable[[], dict[str, Any]] | None = None,
) -> PlannedOutput:
    """Merge adapter(s) into ``base`` and write ``OUTPUT_DIR/<Name>-<size>-<TYPE>.gguf`` (one per type, named as llama.cpp names them) and ``lorasave.json``.

    Each tensor's merged float32 value W0 + Σ scaling·(B @ A) is computed once, row block by row
    block, and every streamed type's writer encodes the blocks at once; each tensor is renamed,
    permuted (Llama Q/K) and written (and hashed) by a writer thread while the next one is merged.
    The folder appears atomically.

    Args:
        base: base folder (``config.json`` + safetensors) or a Hub id in the local HF cache; None: the
            base the adapters name (``base_model_name_or_path``, ``sources.named_base``).
        adapters: one PEFT adapter folder or several (their deltas add up).
        output_dir: the folder to create.
        type: a :class:`gguf_quant.GgufType` value, or several (a list or a comma-separated string,
            ``"q8_0,q4_k_m,f16"``): all written from one read of the base. ``"f32"``, ``"f16"``,
            ``"bf16"``, ``"q8_0"``, ``"q4_0"``, ``"q4_1"``, ``"q5_0"``, ``"q5_1"`` are encoded with
            gguf-py's arithmetic, per-tensor types as llama.cpp picks them (``gguf_quant``); the
            k-quants (``"q4_k_m"``...) are encoded in the same pass by llama.cpp's own
            ``ggml_quantize_chunk`` with ``llama-quant.cpp``'s type mix, byte for byte what
            ``llama_model_quantize`` writes from an f32 GGUF of the merge; they need the llama.cpp
            runtime (``lorasave install-llama-cpp``).
        overwrite: replace an existing ``output_dir`` written by lorasave.
        name: ``general.name`` and file stem (``<name>-<TYPE>.gguf``), a plain file name (no path separator,
            ``..``, NUL); default: the names llama.cpp's converter gives (``naming``: ``general.name``,
            ``basename``, ``finetune``, ``size_label`` from the base's card, config and folder name; the
            file ``gguf.naming_convention``'s, e.g. ``SmolLM2-135M-Instruct-Q8_0.gguf``).
        tokenizer: folder with ``tokenizer.json``; default: the first adapter's, else the base's.
        allow_pickle: accept ``adapter_model.bin``.
        verify: run ``lorasave verify`` on the staged output before the rename; a failure leaves nothing.
        modelfile: write an Ollama ``Modelfile`` (for the first type's file) when the tokenizer has a
            chat template (``ollama.write_modelfile``).
        progress: show the pass's progress bar on stderr (``pipeline.progress``).
        pure: llama-quantize's ``--pure``: every quantized tensor gets the type's default GGML type
            (Q4_K for q4_k_m...), no per-tensor mix; ``tensor_type_fallback`` still applies.
        output_tensor_type: llama-quantize's ``--output-tensor-type``: a GGML type name
            (``"q8_0"``, ``"q6_k"``, ``"f16"``... ``gguf_quant.OVERRIDE_TYPES``) for ``output.weight``
            (and a tied ``token_embd.weight`` unless ``pure`` or ``token_embedding_type``).
        token_embedding_type: llama-quantize's ``--token-embedding-type``: a GGML type name for
            ``token_embd.weight``.

            With any of these three, each llama-quantize type (q4_0 ... q6_k) is written with
            ``llama_tensor_get_type``'s exact types and encoded by ``ggml_quantize_chunk``, byte for
            byte what ``llama_model_quantize`` writes with the same parameters from an f32 GGUF of
            the merge: the llama.cpp runtime is needed. They are refused for f32/f16/bf16/q8_0
            (the converter's types, no mix).
        report: run every file in llama.cpp on a text and put the quality table (size, bits per
            weight, perplexity, KL divergence and top-1 agreement against the float32 merge and the
            unmerged PeftModel) into README.md, with a chart ``quality.png`` (matplotlib, optional),
            before ``lorasave.json`` is written (``lorasave.verify.quality_report``). Needs the runtime.
        report_text: the report's text file (default: a built-in text).
        imatrix: llama-quantize's ``--imatrix``: an importance matrix file (llama-imatrix's GGUF
            layout or its legacy ``.dat``, or a folder ``lorasave imatrix`` wrote;
            ``formats.gguf.imatrix.load_imatrix``). Every llama-quantize type is then encoded with
            it (``llama_model_quantize_params.imatrix``) and the mix follows ``has_imatrix``; the
            types that need one (:attr:`GgufType.needs_imatrix`: iq2_*, iq1_*, iq3_xxs, iq3_xs,
            q2_k_s) are refused without it. The file is copied into the output
            (``<stem>.imatrix``, :data:`IMATRIX_SUFFIX`) so ``verify`` needs nothing else.
        describe_sources: the manifest's ``sources`` section, for sources that are not folders
            (a live PeftModel: ``sources.live_gguf``); default: the base's and adapters' files.

    Returns:
        The planned output; ``pipeline.run.run_single`` writes it and returns a GgufResult.

    Raises:
        ImatrixRequiredError: a type needs an importance matrix for a tensor and ``imatrix`` has none for it.
        ImatrixMismatchError: an ``imatrix`` entry does not fit its tensor (another model's file).
        ImatrixError: the ``imatrix`` file cannot be read.
        InvalidOptionError: unknown ``type``, or a ``name`` that is not a plain file name (``names.check_file_name``);
            ``pure`` / ``output_tensor_type`` / ``token_embedding_type`` with a converter type, an
            unknown GGML type name, or an override type whose block does not divide its tensor's rows.
        LlamaCppNotInstalledError: a k-quant ``type`` without the llama.cpp runtime (nothing is written).
        LlamaCppError: llama.cpp's library does not load.
        UnsupportedModelError: a ``model_type``, tensor, RoPE scaling or tokenizer the export does
            not handle (see ``gguf_arch.ARCHITECTURES``).
        LorasaveError subclasses from loading the sources, planning and the output path checks
        (AdapterMismatchError, OutputExistsError, UnsafePathError, InsufficientDiskError,
        NonFiniteResultError, VerificationError, ...).
    """
    t_start = time.perf_counter()
    if name is not None:
        check_file_name(name, "name")
    types = parse_types(type)
    importance = None
    if imatrix is not None:
        from lorasave.formats.gguf.imatrix import load_imatrix

        importance = load_imatrix(Path(imatrix))
    options = gguf_quant.QuantOptions(
        bool(pure),
        gguf_quant.parse_ggml_type(output_tensor_type) if output_tensor_type is not None else None,
        gguf_quant.parse_ggml_type(token_embedding_type) if token_embedding_type is not None else None,
        importance,
        sha256_file(importance.path) if importance is not None else None,
    )
    gguf_mix.check_options(types, options)
    report_source = None
    if report:
        from lorasave.verify.quality_report import read_text

        report_source = (read_text(report_text), "built-in" if report_text is None else str(report_text))
    if report or any(gguf_mix.uses_ggml(t, gguf_mix.for_type(t, options)) for t in types):
        from lorasave.runtimes.llama_cpp import lib as llama_cpp

        llama_cpp.require()
    ckpt = open_base(base, adapters)
    ads: list[Adapter] = load_adapters(adapters, allow_pickle=allow_pickle)
    tok_dir = tokenizer_source(tokenizer, [a.root for a in ads], ckpt.root)
    final = check_output_path(Path(output_dir), [ckpt.root, *(a.root for a in ads), tok_dir], overwrite)
    from lorasave.formats.gguf.arch import ARCHITECTURES

    if str(ckpt.config.get("model_type")) not in ARCHITECTURES:  # llama.cpp's own converter, when it knows the architecture
        from lorasave.formats.gguf.fallback import plan_via_converter

        if report or verify or importance is not None:
            what = ", ".join(n for n, on in (("--report", report), ("--verify", verify), ("--imatrix", importance is not None)) if on)
            raise InvalidOptionError(f"{what}: not with llama.cpp's converter, which writes {ckpt.config.get('model_type')!r} models for lorasave")
        quant_options = {"pure": pure, "output_tensor_type": output_tensor_type, "token_embedding_type": token_embedding_type}
        return plan_via_converter(
            ckpt,
            ads,
            final,
            types,
            name=name,
            tok_dir=tok_dir,
            overwrite=overwrite,
            modelfile=modelfile,
            progress=progress,
            quant_options=quant_options,
            t_start=t_start,
            describe_sources=describe_sources,
        )
    model = GgufModel.build(ckpt, ads, tok_dir, name)
    writers: dict[GgufType, tuple[GgufOutput, list[str]]] = {}
    for st in types:
        writers[st] = model.writer(st, None, permute_qk, gguf_mix.for_type(st, options))
    assert model.meta is not None
    stem = model_stem(model.meta, chosen=name)
    needed = sum(w.needed_bytes for w, _ in writers.values())

    def finish(folder: Path, job_timings: Timings) -> GgufResult:
        timings = Timings().add(job_timings)
        for w, _ in writers.values():
            timings.add(w.timings)
        per_file: dict[str, dict[str, Any]] = {}
        notes = list(model.notes)
        files: dict[str, str] = {}
        for t in types:
            w, type_notes = writers[t]
            assert w.sha256 is not None
            fname, counts = w.filename, w.counts()
            files[fname] = w.sha256
            notes.extend(n for n in type_notes if n not in notes)
            if gguf_mix.uses_ggml(t, gguf_mix.for_type(t, options)):
                notes.append(gguf_quant.kquant_note(t, gguf_mix.for_type(t, options)))
                if t.default_qtype.name not in counts:
                    block = gguf.GGML_QUANT_SIZES[t.default_qtype][0]
                    used = ", ".join(sorted(counts))
                    notes.append(f"no tensor is {t.default_qtype.name}: no row length is a multiple of {block}, so llama.cpp's fallbacks are used ({used})")
            entry: dict[str, Any] = {"type": t.value, "tensor_types": counts}
            if t.default_qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
                # the precision of the values handed to the quantizer: verify re-quantizes the merge at it
                entry["quantized_from"] = "f32"
            per_file[fname] = entry
        first, first_entry = next(iter(per_file.items()))
        more = [(f, e["type"], e["tensor_types"]) for f, e in list(per_file.items())[1:]]
        side = _side_files(folder, final.name, first, types[0], first_entry["tensor_types"], notes, ckpt, ads, tok_dir, modelfile, more)
        quality = None
        if report_source is not None:  # before the hashes: lorasave.json covers the chart and the card's table
            from lorasave.verify.quality_report import report_staged

            quality = report_staged(
                folder, {f: e["type"] for f, e in per_file.items()}, ckpt, ads, tok_dir, title=final.name, text=report_source[0], text_source=report_source[1]
            )
            side.files.extend(quality.files)
        for n in side.files:
            files[n] = sha256_file(folder / n)
        if importance is not None:  # verify re-encodes the blocks with it
            imatrix_name = stem + IMATRIX_SUFFIX
            shutil.copyfile(importance.path, folder / imatrix_name)
            files[imatrix_name] = sha256_file(folder / imatrix_name)
        for f in per_file:
            if f not in files:
                files[f] = sha256_file(folder / f)
        sources = describe_sources() if describe_sources is not None else {**sources_record(ckpt, ads), "tokenizer": str(tok_dir.resolve())}
        if importance is not None:
            sources["imatrix"] = {"path": str(importance.path.resolve()), "sha256": options.imatrix_sha256, "file": stem + IMATRIX_SUFFIX}
        n_tensors = len(writers[types[0]][0].tensors) + len(writers[types[0]][0].extras)
        result: dict[str, Any] = {
            "n_tensors": n_tensors,
            "n_merged": len(model.plan.merged),
            "merged": model.plan.merged,
            "architecture": model.rules.name,
            "tensor_types": first_entry["tensor_types"],
            "timings": timings.as_dict(),
            "notes": notes,
        }
        if side.family is not None:
            result["chat_template_family"] = side.family
        if "quantized_from" in first_entry:
            result["quantized_from"] = first_entry["quantized_from"]
        if len(types) > 1:
            result["gguf_files"] = per_file
        if quality is not None:
            result["quality"] = quality.report.figures()
        type_setting = types[0].value if len(types) == 1 else ",".join(t.value for t in types)
        settings = {"type": type_setting, "name": name, "allow_pickle": allow_pickle, "modelfile": modelfile, **options.settings()}
        write_manifest(folder, command="gguf", sources=sources, settings=settings, result=result, files=files)
        if verify:
            from lorasave.pipeline.finalize import verify_staged

            report = verify_staged(folder, final, "the GGUF")
            result["verification"] = {
                "level": "tensors",
                "ok": True,
                "summary": report.summary(),
                "tensors_exact": report.tensors_exact,
                "tensors_probed": report.tensors_probed,
                "not_checkable": len(report.not_probed),
                "max_probe_error": report.max_probe_error,
            }
            write_manifest(folder, command="gguf", sources=sources, settings=settings, result=result, files=files)
        res = GgufResult(
            output=final,
            gguf_file=final / first,
            files=sorted([*files, MANIFEST_NAME]),
            n_tensors=n_tensors,
            n_merged=len(model.plan.merged),
            type=types[0].value,
            tensor_types=first_entry["tensor_types"],
            total_bytes=(folder / first).stat().st_size,
            seconds=round(time.perf_counter() - t_start, 3),
            notes=notes,
            verification=result.get("verification"),
            modelfile=final / side.modelfile if side.modelfile else None,
            chat_template_family=side.family,
            llama_cpp_quantized=gguf_mix.uses_ggml(types[0], gguf_mix.for_type(types[0], options)),
            gguf_files=[final / f for f in per_file],
            types=[t.value for t in types],
            quality=quality.report if quality is not None else None,
        )
        log_notes(logger, notes)
        logger.debug("%s", res.summary())
        return res

    return PlannedOutput(
        command="gguf",
        final=final,
        overwrite=overwrite,
        stamps=source_stamp.record(ckpt, ads),
        plan=model.plan,
        adapters=ads,
        writers=[w for w, _ in writers.values()],
        needed_bytes=needed,
        finish=finish,
        merge_key=(None, "base", None),
        progress=progress,
    )


export_gguf = single_output(
    plan_gguf,
    "export_gguf",
    "Merge adapter(s) into ``base`` and write ``OUTPUT_DIR/<Name>-<size>-<TYPE>.gguf`` (one per type, named as llama.cpp names them) and ``lorasave.json``.",
    "GgufResult",
)
