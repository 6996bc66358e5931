"""Merge LoRA adapter(s) into a base and write one GGUF file, streaming tensor by tensor.

What llama.cpp's ``convert_hf_to_gguf.py`` does to a merged checkpoint, done on the merge's
float32 values directly (no 16-bit intermediate checkpoint):

* tensor names through gguf-py's ``TensorNameMap`` (``gguf/tensor_mapping.py``);
* Llama-family Q/K rows permuted from HF rotate-half order to interleaved RoPE pairs
  (``conversion/llama.py`` ``LlamaModel.permute``), ``n_head_kv`` for ``k_proj``;
* per-tensor GGML types as ``ModelBase.prepare_tensors`` (``conversion/base.py``) picks them:
  1-D tensors, ``*_norm.weight`` and anything not ending in ``.weight`` (biases) are F32, the rest
  follow the requested type, and Q8_0 falls back to F16 when a row is not a multiple of 32;
* Gemma's RMSNorm weights ``+1`` and generated tensors such as Llama 3.1's ``rope_freqs``
  (``gguf_arch.ARCHITECTURES``);
* the ``general.*`` (``gguf.Metadata``) / ``{arch}.*`` keys of ``set_gguf_parameters`` (``gguf_arch.py``);
* the tokenizer: SentencePiece, SentencePiece-style or byte-level BPE (``gguf_vocab.py``).

The header, metadata and tensor infos are written first (every type and size is known from the
plan), then each tensor's data (``gguf_stream``): every row block is merged in float32 and encoded
at once (``gguf_encode``, the bytes of ``gguf.quants``), and a writer thread writes and hashes
finished tensors behind the arithmetic. Peak memory is a few encoded tensors.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from lorasave.errors import InvalidOptionError, UnsupportedModelError
from lorasave.formats.gguf import quant as gguf_quant
from lorasave.formats.gguf.arch import GgufArch, Hparams, gguf_arch_for
from lorasave.formats.gguf.output import GgufOutput
from lorasave.formats.gguf.quant import GgufType, tensor_nbytes
from lorasave.formats.gguf.vocab import add_tokenizer, embedding_rows
from lorasave.merging.stream import Timings
from lorasave.pipeline.execute import PassJob, execute_pass, raise_first
from lorasave.pipeline.manifest import MANIFEST_NAME, result_dict, sha256_file, sha256_source, write_manifest
from lorasave.pipeline.output import StagedOutput, check_free_space, check_output_path, tokenizer_source
from lorasave.plan.merge_plan import MergePlan, OutputTensor, build_plan
from lorasave.sources import stamp as source_stamp
from lorasave.sources.adapter import Adapter, load_adapters
from lorasave.sources.architecture import inspect_architecture
from lorasave.sources.checkpoint import Checkpoint, open_checkpoint
from lorasave.util.names import check_file_name, safe_file_name

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
Q = gguf.GGMLQuantizationType


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
        llama_cpp_quantized: the file was written by llama.cpp's ``llama_model_quantize`` (k-quants).
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``--json``)."""
        return result_dict(self)

    def summary(self) -> str:
        """One line for humans."""
        types = ", ".join(f"{n} {k}" for k, n in sorted(self.tensor_types.items()))
        verified = "; verified" if self.verification and self.verification.get("ok") else ""
        size = f"{self.total_bytes / 1e6:.1f} MB"
        how = "; quantized by llama.cpp from a 16-bit intermediate GGUF (removed)" if self.llama_cpp_quantized else ""
        ollama = "; Modelfile for Ollama" if self.modelfile else ""
        return f"wrote {self.gguf_file} ({self.n_tensors} tensors: {types}; {size}, {self.n_merged} merged) in {self.seconds:.1f} s{how}{ollama}{verified}"


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of the GGUF file.

    Attributes:
        src: the planned (HF-named) output tensor.
        name: GGUF name (``blk.0.attn_q.weight``).
        qtype: GGML type written.
        nbytes: bytes of its data (without alignment padding).
        permute_heads: ``(n_head, n_head_kv)`` for a Q/K permute, or None.
        shift: added to every element after the merge (Gemma's RMSNorm ``+1``), or 0.
        rows: only the first ``rows`` rows are written (Gemma 3's ``token_embd`` cut to the
            tokenizer's size, ``gguf_vocab.embedding_rows``), or None for all of them.
    """

    src: OutputTensor
    name: str
    qtype: gguf.GGMLQuantizationType
    nbytes: int
    permute_heads: tuple[int, int] | None
    shift: float = 0.0
    rows: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The written shape, rows first: ``src.shape`` with the first dimension cut to ``rows``."""
        shape = tuple(self.src.shape)
        return shape if self.rows is None else (self.rows, *shape[1:])


@dataclass(frozen=True)
class ExtraTensor:
    """A tensor the architecture generates rather than the checkpoint holds (``rope_freqs.weight``).

    Attributes:
        name: GGUF name.
        data: float32 values, numpy shape (rows first).
        qtype: GGML type written.
        nbytes: bytes of its data.
    """

    name: str
    data: np.ndarray
    qtype: gguf.GGMLQuantizationType
    nbytes: int


def permute_qk(w: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """llama.cpp ``LlamaModel.permute`` (``conversion/llama.py``): rotate-half rows -> interleaved pairs.

    Args:
        w: ``(n_head * head_dim, in)`` weight or ``(n_head * head_dim,)`` bias (or their encoded rows).
        n_head: attention heads; replaced by ``n_head_kv`` when given and different (``k_proj``).

    Returns:
        Same shape; within each head, row ``j`` of the first half and row ``j`` of the second half
        become rows ``2j`` and ``2j + 1``.
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def ggml_type(gguf_name: str, shape: tuple[int, ...], type: str) -> gguf.GGMLQuantizationType:
    """The GGML type of one tensor, as ``ModelBase.prepare_tensors`` (``conversion/base.py``) picks it.

    Args:
        gguf_name: the tensor's GGUF name.
        shape: its numpy/torch shape (rows first); ``shape[-1]`` is the ggml row length ``ne0``.
        type: requested output type, a streamed :class:`GgufType` value (``"q8_0"``...).

    Returns:
        For the converter's types (``GgufType.converter``): F32 for 1-D tensors, ``*_norm.weight`` and
        non-``.weight`` tensors (biases); otherwise the requested type, with Q8_0 falling back to
        F16 when ``ne0`` is not a multiple of 32 (the converter catches ``gguf.QuantError`` and does
        the same). For q4_0..q5_1, ``llama-quantize``'s choice for a model with ``output.weight``
        (:func:`gguf_tensors` applies the tied-embedding rule). See ``gguf_quant``.
    """
    t = GgufType.parse(type)
    if t.converter:
        return gguf_quant.converter_type(gguf_name, shape, t.default_qtype)
    want = gguf_quant.llama_cpp_type(gguf_name, shape, t, tied=False)
    return gguf_quant.K_SUBSTITUTE.get(want, want)


def gguf_tensors(
    plan: MergePlan, config: dict[str, Any], rules: GgufArch, type: str | GgufType, tok_dir: Path | None = None, notes: list[str] | None = None
) -> tuple[list[GgufTensor], list[str]]:
    """Name, type, size and transform of every GGUF tensor from the checkpoint, in plan order.

    Tensors in ``rules.drop`` are left out (Gemma's ``lm_head.weight``, as the converter's
    ``filter_tensors``); ``*norm.weight`` get ``rules.norm_shift`` (``Gemma3Model.norm_shift``).
    With ``tok_dir`` (the tokenizer the file gets), ``token_embd.weight`` keeps the rows
    ``gguf_vocab.embedding_rows`` says the converter keeps (Gemma 3 cuts the rows past the
    tokenizer's size; ``GgufTensor.rows``), with a note appended to ``notes``. Every tensor gets
    the type llama.cpp would give it in a streamed file of ``type`` (``gguf_quant.tensor_types``,
    which needs the whole list: whether ``output.weight`` exists decides the tied-embedding rule).

    Returns:
        The tensors, and notes on the F16 fallbacks and the K-type substitutions.

    Raises:
        UnsupportedModelError: a tensor has no GGUF name (``ValueError("Can not map tensor")`` in
            llama.cpp), e.g. a vision tower or an unknown extra module.
    """
    hp = Hparams.of(config)
    names = gguf.get_tensor_name_map(rules.arch, hp.n_layer)
    n_head, n_kv = hp.heads
    mapped = []  # (src, GGUF name, permute heads, shift, rows)
    for t in plan.tensors.values():
        if t.name in rules.drop:
            continue
        name = names.get_name(t.name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UnsupportedModelError(f"cannot map tensor {t.name!r} to a GGUF {rules.name} tensor name")
        heads = None
        if rules.permute_qk and t.name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = (n_head, n_head)
        elif rules.permute_qk and t.name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = (n_head, n_kv)
        shift = rules.norm_shift if t.name.endswith("norm.weight") else 0.0
        rows = None
        if tok_dir is not None and name == "token_embd.weight" and t.shape:
            keep = embedding_rows(tok_dir, rules, int(t.shape[0]), notes if notes is not None else [])
            rows = keep if keep < t.shape[0] else None
        mapped.append((t, name, heads, shift, rows))
    shapes = [(name, tuple(t.shape) if rows is None else (rows, *t.shape[1:])) for t, name, _, _, rows in mapped]
    gtype = GgufType.parse(type)
    types = gguf_quant.tensor_types(shapes, gtype)
    out = [
        GgufTensor(t, name, tt.qtype, tensor_nbytes(shape, tt.qtype), heads, shift, rows)
        for (t, name, heads, shift, rows), (_, shape), tt in zip(mapped, shapes, types, strict=True)
    ]
    return out, gguf_quant.type_notes(shapes, types, gtype)


def extra_tensors(config: dict[str, Any], rules: GgufArch, type: str) -> list[ExtraTensor]:
    """The architecture's generated tensors (``generate_extra_tensors`` in the converter), typed as the rest."""
    out = []
    for name, data in rules.extra_tensors(Hparams.of(config)):
        qtype = ggml_type(name, data.shape, type)
        out.append(ExtraTensor(name, data, qtype, tensor_nbytes(data.shape, qtype)))
    return out


def add_model_params(
    writer: gguf.GGUFWriter, config: dict[str, Any], rules: GgufArch, name: str, type: str, model_dir: Path | None = None, n_params: int = 0
) -> None:
    """``general.*`` and ``{arch}.*`` keys (``ModelBase.prepare_metadata`` + ``set_gguf_parameters``).

    Args:
        model_dir: folder whose README.md / config.json ``gguf.Metadata.load`` reads (the base).
        n_params: total parameter count of the file's tensors (``general.size_label``).
    """
    writer.add_type(gguf.GGUFType.MODEL)
    meta = gguf.Metadata.load(None, model_dir, name, n_params)
    if meta.size_label is None and n_params > 0:
        meta.size_label = gguf.size_label(n_params, n_params, 0, 0)
    meta.set_gguf_meta_model(writer)
    for key, value, vtype in rules.params(Hparams.of(config)):
        writer.add_key_value(key.format(arch=rules.name), value, vtype)
    writer.add_file_type(GgufType.parse(type).file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _vocab_size(ckpt: Checkpoint, plan: MergePlan, tensors: list[GgufTensor]) -> int:
    """Rows of the token embedding (the config's ``vocab_size``, updated when an adapter resized it)."""
    for g in tensors:
        if g.name == "token_embd.weight":
            return int(g.shape[0])
    v = plan.config_updates.get("vocab_size", ckpt.config.get("vocab_size"))
    return int(v)  # type: ignore[arg-type]


def _intermediate_type(ckpt: Checkpoint) -> GgufType:
    """``gguf_quant.intermediate_type`` of the base's bytes per safetensors dtype."""
    by_dtype: dict[str, int] = {}
    for e in ckpt.tensors.values():
        if (dt := getattr(e, "dtype", None)) is not None:
            by_dtype[dt.name] = by_dtype.get(dt.name, 0) + e.nbytes
    return gguf_quant.intermediate_type(by_dtype)


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
    )
    return _SideFiles([*files, "README.md"], MODELFILE_NAME if files else None, family)


def export_gguf(
    base: PathLike,
    adapters: PathLike | Sequence[PathLike],
    output_dir: PathLike,
    *,
    type: str = "f16",
    overwrite: bool = False,
    name: str | None = None,
    tokenizer: PathLike | None = None,
    allow_pickle: bool = False,
    verify: bool = False,
    modelfile: bool = True,
) -> GgufResult:
    """Merge adapter(s) into ``base`` and write ``OUTPUT_DIR/<name>-<type>.gguf`` plus ``lorasave.json``.

    Each tensor's merged float32 value W0 + Σ scaling·(B @ A) is computed once, row block by row
    block, each block encoded at once; the tensor is renamed, permuted (Llama Q/K) and written (and
    hashed) by a writer thread while the next one is merged. Torch runs with one intra-op thread
    meanwhile. The folder appears atomically.

    Args:
        base: base folder (``config.json`` + safetensors) or a Hub id in the local HF cache.
        adapters: one PEFT adapter folder or several (their deltas add up).
        output_dir: the folder to create.
        type: a :class:`gguf_quant.GgufType` value. ``"f32"``, ``"f16"``, ``"bf16"``, ``"q8_0"``,
            ``"q4_0"``, ``"q4_1"``, ``"q5_0"``, ``"q5_1"`` are streamed with per-tensor types as
            llama.cpp picks them (``gguf_quant``); the k-quants (``"q4_k_m"``...) are written by
            llama.cpp's ``llama_model_quantize`` from a 16-bit GGUF streamed first into the staging
            folder (F16, BF16 for a bfloat16 base) and removed after; they need the llama.cpp
            runtime (``lorasave install-llama-cpp``).
        overwrite: replace an existing ``output_dir`` written by lorasave.
        name: ``general.name`` and file stem, a plain file name (no path separator, ``..``, NUL); default:
            the output folder's name, sanitised (``names.safe_file_name``).
        tokenizer: folder with ``tokenizer.json``; default: the first adapter's, else the base's.
        allow_pickle: accept ``adapter_model.bin``.
        modelfile: write an Ollama ``Modelfile`` when the tokenizer has a chat template
            (``ollama.write_modelfile``).

    Returns:
        GgufResult.

    Raises:
        InvalidOptionError: unknown ``type``, or a ``name`` that is not a plain file name (``names.check_file_name``).
        LlamaCppNotInstalledError: a k-quant ``type`` without the llama.cpp runtime (nothing is written).
        LlamaCppError: llama.cpp failed to quantize.
        UnsupportedModelError: a ``model_type``, tensor, RoPE scaling or tokenizer the export does
            not handle (see ``gguf_arch.ARCHITECTURES``).
        LorasaveError subclasses from loading the sources, planning and the output path checks
        (AdapterMismatchError, OutputExistsError, UnsafePathError, InsufficientDiskError,
        NonFiniteResultError, ...).
    """
    t_start = time.perf_counter()
    if name is not None:
        check_file_name(name, "name")
    try:
        gtype = GgufType.parse(type)
    except ValueError:
        raise InvalidOptionError(f"GGUF type {type!r} is not supported; choose one of {', '.join(t.value for t in GgufType)}") from None
    if not gtype.streamed:
        from lorasave.runtimes.llama_cpp import lib as llama_cpp

        llama_cpp.require()
    type = gtype.value
    ckpt = open_checkpoint(base)
    rules = gguf_arch_for(ckpt.config)
    ads: list[Adapter] = load_adapters(adapters, allow_pickle=allow_pickle)
    tok_dir = tokenizer_source(tokenizer, [a.root for a in ads], ckpt.root)
    final = check_output_path(Path(output_dir), [ckpt.root, *(a.root for a in ads), tok_dir], overwrite)
    stem = name if name is not None else safe_file_name(final.name)
    arch = inspect_architecture(ckpt.config)
    plan = build_plan(ckpt, ads, arch, out_dtype=torch.float32, max_shard_size=1 << 62)
    config = json.loads(json.dumps(ckpt.config))
    for key, value in plan.config_updates.items():
        if "." not in key:
            config[key] = value
    # what is streamed: the type itself, or the 16-bit file llama_model_quantize reads
    stream = gtype if gtype.streamed else _intermediate_type(ckpt)
    tensors, type_notes = gguf_tensors(plan, config, rules, stream, tok_dir=tok_dir, notes=plan.notes)
    extras = extra_tensors(config, rules, stream.value)
    streamed_bytes = sum(g.nbytes for g in tensors) + sum(e.nbytes for e in extras)
    kquant_bytes = 0 if gtype.streamed else gguf_quant.kquant_size_bound([(g.name, g.shape) for g in tensors], stream)
    check_free_space(final, streamed_bytes + kquant_bytes + (16 << 20))
    notes = list(plan.notes) + (type_notes if gtype.streamed else [])
    if not gtype.streamed:
        notes.append(gguf_quant.kquant_note(gtype, stream))

    filename = f"{stem}-{type}.gguf"
    stream_name = filename if gtype.streamed else f".{stem}-{stream.value}.intermediate.gguf"
    timings = Timings()
    with StagedOutput(final, overwrite=overwrite, sources=source_stamp.record(ckpt, ads)) as stage:

        def start(path: Path) -> gguf.GGUFWriter:  # header, metadata, tensor infos
            writer = gguf.GGUFWriter(None, rules.name)
            add_model_params(writer, config, rules, stem, stream.value, ckpt.root, out.n_params())
            add_tokenizer(writer, tok_dir, _vocab_size(ckpt, plan, tensors), rules, config, notes)
            for g in tensors:
                writer.add_tensor_info(g.name, g.shape, np.dtype(np.float32), g.nbytes, raw_dtype=g.qtype)
            for e in extras:
                writer.add_tensor_info(e.name, e.data.shape, np.dtype(np.float32), e.nbytes, raw_dtype=e.qtype)
            writer.write_header_to_file(path)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            return writer

        out = GgufOutput(stream_name, start, tensors, extras, permute_qk)
        job = PassJob(plan, ads, [(out, stage.path)], timings=timings)
        execute_pass([job])
        raise_first(job)
        for phase in ("merge", "write", "hash"):
            setattr(timings, phase, getattr(timings, phase) + getattr(out.timings, phase))
        digest = out.sha256
        counts: dict[str, int] = {}
        for g in [*tensors, *extras]:
            counts[g.qtype.name] = counts.get(g.qtype.name, 0) + 1
        if not gtype.streamed:
            t0 = time.perf_counter()
            counts = gguf_quant.llama_quantize(stage.path / stream_name, stage.path / filename, gtype)
            timings.write += time.perf_counter() - t0
            if gtype.default_qtype.name not in counts:
                block = gguf.GGML_QUANT_SIZES[gtype.default_qtype][0]
                used = ", ".join(sorted(counts))
                notes.append(f"no tensor is {gtype.default_qtype.name}: no row length is a multiple of {block}, so llama.cpp used its fallbacks ({used})")
        side = _side_files(stage.path, final.name, filename, gtype, counts, notes, ckpt, ads, tok_dir, modelfile)
        files = {n: digest if n == stream_name and gtype.streamed else sha256_file(stage.path / n) for n in [filename, *side.files]}
        sources = {
            "base": {
                "path": str(ckpt.root.resolve()),
                "hub_id": ckpt.hub_id,
                "files": {str(p.relative_to(ckpt.root)): sha256_source(p) for p in ckpt.source_files()},
            },
            "adapters": [{"path": str(a.root.resolve()), "files": {str(p.relative_to(a.root)): sha256_source(p) for p in a.source_files()}} for a in ads],
            "tokenizer": str(tok_dir.resolve()),
        }
        result = {
            "n_tensors": len(tensors) + len(extras),
            "n_merged": len(plan.merged),
            "merged": plan.merged,
            "architecture": rules.name,
            "tensor_types": counts,
            "timings": timings.as_dict(),
            "notes": notes,
        }
        if side.family is not None:
            result["chat_template_family"] = side.family
        if not gtype.streamed:
            result["intermediate"] = stream.value
        if gtype.default_qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
            # the precision of the values handed to the quantizer: verify re-quantizes the merge at it
            result["quantized_from"] = "f32" if gtype.streamed else stream.value
        settings = {"type": type, "name": stem, "allow_pickle": allow_pickle, "modelfile": modelfile}
        write_manifest(stage.path, command="gguf", sources=sources, settings=settings, result=result, files=files)
        if verify:
            from lorasave.verify.run import VerificationError
            from lorasave.verify.run import verify as verify_output

            report = verify_output(stage.path)
            if not report.ok:
                raise VerificationError(f"the GGUF failed verification, nothing was written: {report.summary()}", path=final, failures=report.failures)
            result["verification"] = {
                "level": "tensors",
                "ok": True,
                "summary": report.summary(),
                "tensors_exact": report.tensors_exact,
                "tensors_probed": report.tensors_probed,
                "not_checkable": len(report.not_probed),
                "max_probe_error": report.max_probe_error,
            }
            write_manifest(stage.path, command="gguf", sources=sources, settings=settings, result=result, files=files)
        total = (stage.path / filename).stat().st_size
        stage.commit()
    res = GgufResult(
        output=final,
        gguf_file=final / filename,
        files=sorted([*files, MANIFEST_NAME]),
        n_tensors=len(tensors) + len(extras),
        n_merged=len(plan.merged),
        type=type,
        tensor_types=counts,
        total_bytes=total,
        seconds=round(time.perf_counter() - t_start, 3),
        notes=notes,
        verification=result.get("verification"),
        modelfile=final / side.modelfile if side.modelfile else None,
        chat_template_family=side.family,
        llama_cpp_quantized=not gtype.streamed,
    )
    for note in notes:
        logger.info("%s", note)
    logger.debug("%s", res.summary())
    return res
