"""``lorasave onnx-adapter``: a PEFT LoRA adapter as an ``.onnx_adapter`` file for a graph with LoRA inputs.

The file is onnxruntime's adapter format (``onnxruntime.AdapterFormat``: flatbuffers holding named
tensors, an adapter and a model version), which onnxruntime loads with ``onnxruntime.LoraAdapter``
(``RunOptions.add_active_adapter``) and onnxruntime-genai with ``og.Adapters(model).load(path, name)``
then ``generator.set_active_adapter(adapters, name)``: one base exported with ``lorasave onnx BASE
--lora-inputs ...`` serves many fine-tunes, switched per generator. Its parameters are the graph
inputs ``<module>.lora_A.weight`` = ``A.T`` (in, r) and ``<module>.lora_B.weight`` = ``(scaling * B).T``
(r, out) of every LoRA module (``formats.onnx.lora``: Olive's names and layout, PEFT's exact scaling
folded into B in float32), in the graph's dtype.

BASE is either that ONNX base folder (the adapter's modules, sizes and dtype are checked against
its graph inputs; the Hugging Face base it was exported from, named in its ``lorasave.json``, is
opened for the adapter's checks) or the Hugging Face base itself (``dtype`` then chooses float32 or
float16; the file fits any base exported with LoRA inputs on the adapter's projections).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorasave.errors import CheckpointFormatError, InvalidOptionError, SourceNotFoundError, UnsupportedAdapterError, UnsupportedModelError
from lorasave.formats.onnx.lora import LoraPair, adapter_pairs, graph_lora_inputs, pair_arrays, projection_of
from lorasave.formats.onnx.run import ONNX_NAME, import_onnx
from lorasave.formats.onnx.spec import FAMILIES
from lorasave.merging.stream import Timings
from lorasave.pipeline.manifest import MANIFEST_NAME, result_dict, sha256_file, sha256_source, write_manifest
from lorasave.pipeline.output import check_output_path
from lorasave.pipeline.run import PlannedOutput, run_single
from lorasave.sources import stamp as source_stamp
from lorasave.sources.adapter import adapter_list, load_adapters
from lorasave.sources.checkpoint import Checkpoint, TensorReader, open_checkpoint
from lorasave.sources.named_base import open_base
from lorasave.util.jsonio import read_json
from lorasave.util.names import check_file_name, safe_file_name
from lorasave.util.notes import log_notes

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

SUFFIX = ".onnx_adapter"
#: ``set_adapter_version`` / ``set_model_version`` of the files written.
ADAPTER_VERSION = 1
MODEL_VERSION = 1
_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}


@dataclass
class OnnxAdapterResult:
    """What ``export_onnx_adapter`` wrote.

    Attributes:
        output: the output folder.
        adapter_file: the ``.onnx_adapter`` file in it.
        files: names of the files written, manifest included.
        n_modules: adapted Linears (two parameters each).
        dtype: ``"float32"`` or ``"float16"``, the graph's LoRA input dtype.
        ranks: the distinct ranks of its modules.
        onnx_base: the ONNX base folder checked against, or None (BASE was the Hugging Face base).
        total_bytes: size of the ``.onnx_adapter`` file.
        seconds: wall time of the call.
        notes: remarks (folded scalings).
    """

    output: Path
    adapter_file: Path
    files: list[str]
    n_modules: int
    dtype: str
    ranks: list[int]
    onnx_base: Path | None
    total_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``--json``)."""
        return result_dict(self)

    def summary(self) -> str:
        """One line for humans."""
        base = f", checked against {self.onnx_base}" if self.onnx_base else ""
        return (
            f"wrote {self.adapter_file} ({self.n_modules} LoRA modules, {2 * self.n_modules} {self.dtype} parameters, "
            f"rank {'/'.join(map(str, self.ranks))}; {self.total_bytes / 1e6:.2f} MB{base}) in {self.seconds:.1f} s"
        )


@dataclass
class _Base:
    """BASE resolved: the Hugging Face base, and the ONNX base folder with its LoRA inputs and quantization when BASE is one."""

    ckpt: Checkpoint
    folder: Path | None = None
    inputs: dict[str, tuple[np.dtype, tuple[int | str, ...]]] = field(default_factory=dict)
    quantize: str | None = None


def _open_base(base: PathLike | None, adapters: Sequence[PathLike]) -> _Base:
    """BASE as a :class:`_Base` (module docstring); None: the Hugging Face base the adapter names (``named_base``)."""
    if base is None:
        return _Base(open_base(None, adapters))
    folder = Path(base)
    if not (folder / ONNX_NAME).is_file():
        return _Base(open_checkpoint(base))
    import_onnx(exporter=False)
    inputs = graph_lora_inputs(folder / ONNX_NAME)
    if not inputs:
        raise UnsupportedModelError(
            f"{folder / ONNX_NAME} takes no LoRA inputs: export the base with `lorasave onnx BASE --lora-inputs all-linear -o OUT`", path=folder
        )
    manifest_path = folder / MANIFEST_NAME
    manifest = read_json(manifest_path) if manifest_path.is_file() else {}
    recorded = (manifest.get("sources") or {}).get("base") or {}
    if manifest.get("command") != "onnx" or not recorded.get("path"):
        raise SourceNotFoundError(f"{folder} has no lorasave.json of `lorasave onnx` naming its base: give the Hugging Face base as BASE", path=folder)
    for source in (recorded.get("path"), recorded.get("hub_id")):
        if source and (Path(str(source)).is_dir() or source == recorded.get("hub_id")):
            try:
                return _Base(open_checkpoint(str(source)), folder, inputs, (manifest.get("settings") or {}).get("quantize"))
            except SourceNotFoundError:
                continue
    raise SourceNotFoundError(
        f"the base {recorded.get('path')} recorded in {manifest_path} no longer exists: give the Hugging Face base as BASE", path=Path(str(recorded["path"]))
    )


def _check_against_graph(pairs: list[LoraPair], inputs: dict[str, tuple[np.dtype, tuple[int | str, ...]]], folder: Path, adapter_root: Path) -> str:
    """Every pair's two inputs exist in the graph with its sizes; returns the graph's LoRA dtype name."""
    dtypes = {dt for dt, _ in inputs.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPES.values():
        raise CheckpointFormatError(f"{folder / ONNX_NAME}: LoRA inputs of dtypes {sorted(map(str, dtypes))}; expected one of float32, float16", path=folder)
    have = sorted({projection_of(n) for n in inputs})
    for p in pairs:
        name_a, name_b = p.names
        if name_a not in inputs or name_b not in inputs:
            proj = p.module.rsplit(".", 1)[-1]
            raise UnsupportedAdapterError(
                f"{adapter_root}: it adapts {p.module}, which has no LoRA inputs in {folder / ONNX_NAME} (LoRA inputs on {', '.join(have)}); "
                f"export the base again with --lora-inputs including {proj}",
                path=adapter_root,
            )
        for name, want in ((name_a, p.in_features), (name_b, p.out_features)):
            dims = inputs[name][1]
            fixed = dims[0] if name == name_a else dims[1]
            if fixed != want:
                raise UnsupportedAdapterError(f"{adapter_root}: {name} is {dims} in {folder / ONNX_NAME}, the adapter needs {want} there", path=adapter_root)
    return str(next(iter(dtypes)))


def export_onnx_adapter(
    base: PathLike | None,
    adapter: PathLike | Sequence[PathLike],
    output: PathLike,
    *,
    dtype: str | None = None,
    name: str | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> OnnxAdapterResult:
    """Write a PEFT LoRA adapter as ``OUTPUT/<name>.onnx_adapter`` plus ``README.md`` and ``lorasave.json``.

    onnxruntime-genai loads the file on a base exported with ``lorasave onnx BASE --lora-inputs ...``:
    ``og.Adapters(model).load(path, name)``, ``generator.set_active_adapter(adapters, name)``;
    onnxruntime with ``onnxruntime.LoraAdapter`` and ``RunOptions.add_active_adapter``. The folder
    appears atomically.

    Args:
        base: the ONNX base folder (``lorasave onnx --lora-inputs``), or the Hugging Face base; None: the
            Hugging Face base the adapter's ``adapter_config.json`` names (``sources.named_base``; no graph check).
        adapter: one PEFT LoRA adapter folder (a list of more than one is refused).
        output: the folder to create.
        dtype: ``"float32"`` or ``"float16"``; with an ONNX base, its graph's (None: that, or float32).
        name: the file's stem, a plain file name; default: the output folder's name, sanitised.
        overwrite: replace an existing lorasave output at ``output``.
        allow_pickle: accept ``adapter_model.bin``.

    Raises:
        InvalidOptionError: an unknown dtype, one other than the ONNX base's, or a bad ``name``.
        UnsupportedAdapterError: several adapters, what the format cannot hold (DoRA,
            ``modules_to_save``, new tokens, LoRA on embeddings or lm_head, non-LoRA tuners), or a
            module the ONNX base has no LoRA inputs for.
        UnsupportedModelError: a base architecture the ONNX graph builder does not handle, or an
            ONNX base without LoRA inputs.
        SourceNotFoundError: an ONNX base whose Hugging Face base is gone.
        LorasaveError subclasses from loading the sources and the output checks, as ``merge``.
    """
    t_start = time.perf_counter()
    if dtype is not None and str(dtype).removeprefix("torch.") not in _DTYPES:
        raise InvalidOptionError(f"ONNX adapter dtype {dtype!r}: use float32 or float16")
    if name is not None:
        check_file_name(name, "name")
    specs = adapter_list(adapter)
    if len(specs) != 1:
        raise UnsupportedAdapterError(
            f"an .onnx_adapter file holds one adapter, {len(specs)} were given; write one file per adapter "
            "(onnxruntime-genai loads several on one base and switches between them)"
        )
    _, ort = import_onnx(exporter=False)
    resolved = _open_base(base, specs)
    ckpt, onnx_base = resolved.ckpt, resolved.folder
    model_type = str(ckpt.config.get("model_type"))
    if model_type not in FAMILIES:
        raise UnsupportedModelError(f"{model_type}: the ONNX graph builder handles {', '.join(sorted(FAMILIES))}")
    ad = load_adapters(specs, allow_pickle=allow_pickle)[0]
    pairs = adapter_pairs(ad, ckpt, FAMILIES[model_type])
    dtype_name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    if onnx_base is not None:
        graph_dtype = _check_against_graph(pairs, resolved.inputs, onnx_base, ad.root)
        if dtype is not None and dtype_name != graph_dtype:
            raise InvalidOptionError(f"dtype {dtype_name}: the LoRA inputs of {onnx_base / ONNX_NAME} are {graph_dtype}")
        dtype_name = graph_dtype
    np_dtype = _DTYPES[dtype_name]
    final = check_output_path(Path(output), [ckpt.root, ad.root, *([onnx_base] if onnx_base else [])], overwrite)
    stem = name if name is not None else safe_file_name(final.name)
    filename = stem + SUFFIX
    nbytes = sum((p.in_features + p.out_features) * p.rank * np_dtype.itemsize for p in pairs)
    notes: list[str] = [ckpt.named_by] if ckpt.named_by else []
    log_notes(logger, notes)
    ranks = sorted({p.rank for p in pairs})

    def finish(folder: Path, _: Timings) -> OnnxAdapterResult:
        params: dict[str, Any] = {}
        with TensorReader() as reader:
            for p in pairs:
                for key, arr in zip(p.names, pair_arrays(p, ad, reader, np_dtype), strict=True):
                    params[key] = ort.OrtValue.ortvalue_from_numpy(arr)
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(ADAPTER_VERSION)
        fmt.set_model_version(MODEL_VERSION)
        fmt.set_parameters(params)
        fmt.export_adapter(str(folder / filename))
        _write_card(folder, final.name, filename, dtype_name, ranks, ckpt, ad, onnx_base)
        files = {filename: sha256_file(folder / filename), "README.md": sha256_file(folder / "README.md")}
        sources: dict[str, Any] = {
            "base": {"path": str(ckpt.root.resolve()), "hub_id": ckpt.hub_id, "files": {"config.json": sha256_source(ckpt.root / "config.json")}},
            "adapters": [{"path": str(ad.root.resolve()), "files": {str(f.relative_to(ad.root)): sha256_source(f) for f in ad.source_files()}}],
        }
        if onnx_base is not None:
            sources["onnx_base"] = {
                "path": str(onnx_base.resolve()),
                "quantize": resolved.quantize,
                "files": {ONNX_NAME: sha256_source(onnx_base / ONNX_NAME)},
            }
        result = {
            "n_modules": len(pairs),
            "parameters": {p.module: {"rank": p.rank, "scaling": p.scaling} for p in pairs},
            "layout": "<module>.lora_A.weight = A.T (in, r); <module>.lora_B.weight = (scaling * B).T (r, out)",
            "architecture": model_type,
            "notes": notes,
        }
        settings = {
            "dtype": dtype_name,
            "name": stem,
            "adapter_version": ADAPTER_VERSION,
            "model_version": MODEL_VERSION,
            "base_quantize": resolved.quantize,
            "allow_pickle": allow_pickle,
        }
        write_manifest(folder, command="onnx-adapter", sources=sources, settings=settings, result=result, files=files)
        res = OnnxAdapterResult(
            output=final,
            adapter_file=final / filename,
            files=sorted([filename, "README.md", MANIFEST_NAME]),
            n_modules=len(pairs),
            dtype=dtype_name,
            ranks=ranks,
            onnx_base=onnx_base,
            total_bytes=(folder / filename).stat().st_size,
            seconds=round(time.perf_counter() - t_start, 3),
            notes=notes,
        )
        logger.debug("%s", res.summary())
        return res

    stamps = source_stamp.record(ckpt, [ad])
    planned = PlannedOutput("onnx-adapter", final, overwrite, stamps, nbytes + (1 << 20), finish)
    out: OnnxAdapterResult = run_single(planned)
    return out


def _write_card(folder: Path, title: str, filename: str, dtype: str, ranks: list[int], ckpt: Checkpoint, ad: Any, onnx_base: Path | None) -> None:
    """``README.md``: what the file is and how onnxruntime-genai / onnxruntime apply it."""
    from lorasave.formats.card_sources import card_sources
    from lorasave.pipeline.cards import write_card

    keys = ("peft_type", "r", "lora_alpha", "target_modules", "base_model_name_or_path")
    base_dir = str(onnx_base) if onnx_base is not None else "BASE_ONNX"
    snippet = (
        "import onnxruntime_genai as og  # pip install onnxruntime-genai\n\n"
        f'model = og.Model("{base_dir}")  # `lorasave onnx BASE --lora-inputs ...`\n'
        f'adapters = og.Adapters(model)\nadapters.load("{title}/{filename}", "{title}")\n'
        "params = og.GeneratorParams(model)\ngenerator = og.Generator(model, params)\n"
        f'generator.set_active_adapter(adapters, "{title}")\n\n'
        "# onnxruntime: adapter = onnxruntime.LoraAdapter(); adapter.Load(path)\n"
        "# run_options.add_active_adapter(adapter); session.run(None, feed, run_options)"
    )
    write_card(
        folder,
        kind="onnx-adapter",
        **card_sources(ckpt, [{"path": str(ad.root.resolve()), **{k: ad.config.get(k) for k in keys}}]),
        settings={
            "format": "onnxruntime adapter (.onnx_adapter) for an ONNX decoder with LoRA inputs",
            "dtype": dtype,
            "rank": "/".join(map(str, ranks)),
            "layout": "<module>.lora_A.weight = A.T (in, r), <module>.lora_B.weight = (scaling * B).T (r, out)",
        },
        load_snippet=snippet,
        verification=None,
        title=title,
    )
