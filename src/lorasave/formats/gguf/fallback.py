"""``lorasave gguf`` for architectures lorasave does not write natively: through llama.cpp's own converter.

When the base's ``model_type`` is not in ``arch.ARCHITECTURES`` but its ``architectures[0]`` is a
class the pinned converter knows (``TEXT_MODEL_MAP`` of llama.cpp v0.5.0's ``conversion/__init__.py``,
read as data), ``plan_gguf`` hands the output to :func:`plan_via_converter`:

1. the merged checkpoint is streamed into the staging folder by the merge machinery
   (``api.plan_merge_sources``: W0 + Σ scaling·(B @ A) in float32, rounded once), in float32, or in
   the base's 16-bit dtype when every requested type is that dtype (the converter's f32 upcast of it
   is exact, so the file is the one a float32 merge gives, at half the disk); ``config.json`` loses
   ``auto_map`` and no ``.py`` file is carried;
2. ``convert_hf_to_gguf.py`` (:mod:`lorasave.runtimes.llama_cpp.converter`, its own environment,
   remote code refused) writes each converter type (f32, f16, bf16, q8_0) with ``--outtype``; the
   llama-quantize types are quantized from one f32 conversion by llama.cpp's
   ``llama_model_quantize`` (``runtimes.llama_cpp.lib.quantize``, the runtime's own library);
3. the checkpoint and the f32 intermediate are removed; the card, the Modelfile and ``lorasave.json``
   (``result.converter``: the converter's version and commit, the intermediates removed) are written
   and the folder is renamed into place as for every output.
"""

from __future__ import annotations

import ast
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any

import gguf
import torch

from lorasave.errors import InvalidOptionError, UnsupportedModelError
from lorasave.formats.gguf.naming import gguf_file_name
from lorasave.formats.gguf.quant import GgufType
from lorasave.merging.stream import Timings
from lorasave.pipeline.manifest import MANIFEST_NAME, sha256_file, sha256_source, write_manifest
from lorasave.pipeline.run import PlannedOutput
from lorasave.sources.adapter import Adapter
from lorasave.sources.checkpoint import Checkpoint
from lorasave.util.notes import log_notes

logger = logging.getLogger(__name__)

#: Types ``convert_hf_to_gguf.py --outtype`` writes; the others are llama-quantize's.
CONVERTER_TYPES = frozenset({GgufType.F32, GgufType.F16, GgufType.BF16, GgufType.Q8_0})
_DTYPES = {GgufType.F16: torch.float16, GgufType.BF16: torch.bfloat16}
#: config.json values transformers 5 writes that the converter (with its transformers 4.57.6) reads
#: differently, per ``model_type``: key -> {transformers 5 value -> the value 4.57 wrote}. Granite 4
#: hybrid: 5.x saves ``layer_types`` as ``linear_attention``/``full_attention``, 4.57 as
#: ``mamba``/``attention``; ``GraniteHybridModel.get_attn_layers`` looks for ``"attention"`` and
#: would write every layer as Mamba (a file llama.cpp refuses).
CONVERTER_CONFIG_NAMES: dict[str, dict[str, dict[str, str]]] = {
    "granitemoehybrid": {"layer_types": {"linear_attention": "mamba", "full_attention": "attention"}},
}


def _granite_hybrid_rope(config: dict[str, Any]) -> str | None:
    types = config.get("layer_types") or []
    if config.get("position_embedding_type") == "rope" and any(t in ("mamba", "linear_attention") for t in types):
        return "position_embedding_type 'rope' with Mamba layers: llama.cpp's converter writes hybrid Granite without RoPE (GraniteHybridModel)"
    return None


#: Configs the converter would write as a different model, per ``model_type``: a check returning the reason, or None.
CONVERTER_REFUSALS: dict[str, Any] = {"granitemoehybrid": _granite_hybrid_rope}


def converter_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json as the converter gets it: no ``auto_map`` (no remote code to find), values renamed
    back by :data:`CONVERTER_CONFIG_NAMES`."""
    out = {k: v for k, v in config.items() if k != "auto_map"}
    for key, names in CONVERTER_CONFIG_NAMES.get(str(config.get("model_type")), {}).items():
        if isinstance(out.get(key), list):
            out[key] = [names.get(v, v) if isinstance(v, str) else v for v in out[key]]
    return out


@cache
def converter_architectures(source: Path) -> frozenset[str]:
    """The HF architecture classes the converter in ``source`` converts (``TEXT_MODEL_MAP``'s keys, read with ``ast``, not run)."""
    tree = ast.parse((source / "conversion" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "TEXT_MODEL_MAP" and node.value is not None:
            return frozenset(ast.literal_eval(node.value))
    raise UnsupportedModelError(f"{source} has no TEXT_MODEL_MAP in conversion/__init__.py; reinstall it: lorasave install-llama-cpp --converter --force")


def converter_architecture(config: dict[str, Any]) -> str | None:
    """``architectures[0]`` of a config.json (the converter's key), or None."""
    archs = config.get("architectures") or []
    return str(archs[0]) if archs else None


def merge_dtype(ckpt: Checkpoint, types: list[GgufType]) -> torch.dtype:
    """float32, or the base's 16-bit dtype when every type is that dtype (one rounding either way)."""
    base = str(ckpt.config.get("dtype") or ckpt.config.get("torch_dtype") or "")
    wanted = {_DTYPES.get(t) for t in types}
    if len(wanted) == 1 and (dt := wanted.pop()) is not None and str(dt).removeprefix("torch.") == base:
        return dt
    return torch.float32


def _converter_names(ckpt: Checkpoint, folder: Path, name: str | None) -> Path:
    """The converter's ``--metadata`` file (in ``folder``, which the caller clears) naming the model as the native export does.

    Every naming key is given, null included: the converter reads the staging folder, whose name would
    otherwise become the model's (``general.size_label`` null: it counts the parameters itself). The
    base's ``README.md`` is put beside the merge when the symlink rule allows, for the card's facts.
    """
    from lorasave.formats.gguf.naming import NAME_FIELDS, model_metadata
    from lorasave.util.paths import escaping_target

    meta = model_metadata(ckpt.root, hub_id=ckpt.hub_id, name=name)
    card = ckpt.root / "README.md"
    if card.is_file() and escaping_target(card, ckpt.root) is None and not (folder / "README.md").exists():
        shutil.copyfile(card, folder / "README.md")
    fields = {f"general.{f}": getattr(meta, f) for f in NAME_FIELDS if f != "size_label"}
    path = folder / ".converter-metadata.json"
    path.write_text(json.dumps({**fields, "general.organization": meta.organization, "general.size_label": None}), encoding="utf-8")
    return path


def _written_names(path: Path) -> gguf.Metadata:
    """The naming keys the converter wrote into ``path`` (``general.name``, ``basename``, ``finetune``, ``version``, ``size_label``)."""
    from lorasave.formats.gguf.naming import NAME_FIELDS

    fields = gguf.GGUFReader(path).fields
    meta = gguf.Metadata()
    for f in NAME_FIELDS:
        field = fields.get(f"general.{f}")
        setattr(meta, f, field.contents() if field is not None else None)
    return meta


def plan_via_converter(
    ckpt: Checkpoint,
    ads: list[Adapter],
    final: Path,
    types: list[GgufType],
    *,
    name: str | None,
    tok_dir: Path,
    overwrite: bool,
    modelfile: bool,
    progress: bool,
    quant_options: dict[str, Any],
    t_start: float,
    describe_sources: Callable[[], dict[str, Any]] | None = None,
) -> PlannedOutput:
    """Plan ``lorasave gguf`` through llama.cpp's converter (see the module docstring).

    Args:
        name: ``--name``, else None: the names of the native export (``naming.model_metadata`` of the base),
            handed to the converter as its ``--metadata`` override (it would name the model after the
            staging folder), the base's ``README.md`` beside the merge for the card's facts; the files are
            named from the keys the converter wrote (``naming.gguf_file_name``).
        quant_options: ``pure`` / ``output_tensor_type`` / ``token_embedding_type`` for the
            llama-quantize types (``lib.quantize``'s keywords; None values are dropped).
        describe_sources: the manifest's ``sources`` section (``plan_gguf``'s); default: the files read.

    Raises:
        LlamaCppConverterNotInstalledError: the converter is not installed (nothing written; the
            message names ``lorasave install-llama-cpp --converter``).
        UnsupportedModelError: the converter does not know ``architectures[0]`` either (the line
            lists lorasave's model types and the converter's classes).
        InvalidOptionError: ``quant_options`` with only converter types.
        LlamaCppNotInstalledError: llama-quantize types without the llama.cpp runtime.
    """
    from lorasave.api import plan_merge_sources
    from lorasave.formats.gguf.arch import ARCHITECTURES
    from lorasave.runtimes.llama_cpp.converter import LLAMA_CPP_TAG, find_converter
    from lorasave.util.options import MergeInto, SaveMethod

    conv = find_converter()
    arch = converter_architecture(ckpt.config)
    known = converter_architectures(conv.source)
    if arch not in known:
        raise UnsupportedModelError(
            f"GGUF export does not support model_type {ckpt.config.get('model_type')!r} (architecture {arch!r}): lorasave writes "
            f"{', '.join(sorted(ARCHITECTURES))}, and llama.cpp's converter ({LLAMA_CPP_TAG}) knows {len(known)} others: {', '.join(sorted(known))}"
        )
    refuse = CONVERTER_REFUSALS.get(str(ckpt.config.get("model_type")))
    if refuse is not None and (reason := refuse(ckpt.config)):
        raise UnsupportedModelError(f"GGUF export of {ckpt.config.get('model_type')} through llama.cpp's converter is refused: {reason}")
    quantized = [t for t in types if t not in CONVERTER_TYPES]
    options = {k: v for k, v in quant_options.items() if v not in (None, False)}
    if options and not quantized:
        raise InvalidOptionError(f"{', '.join(options)} apply to llama-quantize types only, not to {', '.join(t.value for t in types)}")
    if quantized:
        from lorasave.runtimes.llama_cpp import lib as llama_cpp

        llama_cpp.require()
    from lorasave.pipeline.output import carry_files, carry_plan, write_config

    carry = carry_plan(ckpt.root, tok_dir)
    out_dtype = merge_dtype(ckpt, types)

    def side_files(folder: Path, plan: Any, quant: dict[str, Any] | None) -> list[str]:
        write_config(converter_config(ckpt.config), folder / "config.json", dtype=plan.out_dtype, quantization=None, updates=plan.config_updates)
        carried = carry_files(ckpt.root, tok_dir, folder, carry)
        tok_config = folder / "tokenizer_config.json"
        if tok_config.is_file():
            data = json.loads(tok_config.read_text(encoding="utf-8"))
            if isinstance(data, dict) and "auto_map" in data:
                data.pop("auto_map")
                tok_config.write_text(json.dumps(data, indent=2), encoding="utf-8")
        return ["config.json", *carried]

    planned = plan_merge_sources(
        ckpt,
        ads,
        final,
        out_dtype=out_dtype,
        shard_limit=5 * 10**9,
        weights=None,
        method=SaveMethod.MERGED_16BIT,
        into=MergeInto.BASE,
        spec=None,
        progress=progress,
        side_files=side_files,
        describe_sources=dict,
        extra_settings={},
        t_start=t_start,
        overwrite=overwrite,
        carried_bytes=carry.nbytes,
    )
    merge_finish = planned.finish
    plan = planned.plan
    assert plan is not None

    def finish(folder: Path, job_timings: Timings) -> Any:
        from lorasave.formats.gguf.export import GgufResult, _side_files

        merge_finish(folder, job_timings)  # index, config.json, tokenizer: a checkpoint the converter reads
        override = _converter_names(ckpt, folder, name)
        checkpoint_files = [p for p in folder.iterdir() if p.is_file()]
        names: dict[GgufType, str] = {}
        seconds: dict[str, float] = {}
        intermediate = folder / ".converter-f32.gguf"
        for t in types:
            start = time.perf_counter()
            written = folder / f".converter-{t.value}.gguf"
            if t in CONVERTER_TYPES:
                conv.convert(folder, written, t.value, args=["--metadata", str(override)])
            else:
                from lorasave.runtimes.llama_cpp.lib import quantize

                if not intermediate.is_file():
                    conv.convert(folder, intermediate, "f32", args=["--metadata", str(override)])
                quantize(intermediate, written, t.value, **options)
            names[t] = gguf_file_name(_written_names(written), t, chosen=name)
            written.rename(folder / names[t])
            seconds[names[t]] = round(time.perf_counter() - start, 3)
        removed = sorted(p.name for p in checkpoint_files) + ([intermediate.name] if intermediate.exists() else [])
        for p in [*checkpoint_files, intermediate]:
            p.unlink(missing_ok=True)
        notes = list(plan.notes)
        via = f"written by llama.cpp's own converter ({LLAMA_CPP_TAG} convert_hf_to_gguf.py) from the merged checkpoint"
        if quantized:
            via += f"; {', '.join(t.value for t in quantized)} quantized from its f32 file by llama.cpp's llama_model_quantize"
        notes.append(f"{ckpt.config.get('model_type')} is not written natively: {via}; the intermediates were removed ({', '.join(removed)})")
        per_file: dict[str, dict[str, Any]] = {}
        for t in types:
            reader = gguf.GGUFReader(folder / names[t])
            counts: dict[str, int] = {}
            for tensor in reader.tensors:
                counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
            per_file[names[t]] = {"type": t.value, "tensor_types": counts, "n_tensors": len(reader.tensors)}
        first = names[types[0]]
        more = [(f, e["type"], e["tensor_types"]) for f, e in per_file.items() if f != first]
        side = _side_files(folder, final.name, first, types[0], per_file[first]["tensor_types"], notes, ckpt, ads, tok_dir, modelfile, more)
        files = {n: sha256_file(folder / n) for n in [*names.values(), *side.files]}
        sources = (
            describe_sources()
            if describe_sources is not None
            else {
                "base": {
                    "path": str(ckpt.root.resolve()),
                    "hub_id": ckpt.hub_id,
                    "files": {str(p.relative_to(ckpt.root)): sha256_source(p) for p in ckpt.source_files()},
                },
                "adapters": [{"path": str(a.root.resolve()), "files": {str(p.relative_to(a.root)): sha256_source(p) for p in a.source_files()}} for a in ads],
                "tokenizer": str(tok_dir.resolve()),
            }
        )
        result: dict[str, Any] = {
            "n_tensors": per_file[first]["n_tensors"],
            "n_merged": len(plan.merged),
            "merged": plan.merged,
            "architecture": gguf.GGUFReader(folder / first).fields["general.architecture"].contents(),
            "tensor_types": per_file[first]["tensor_types"],
            "timings": Timings().add(job_timings).as_dict(),
            "notes": notes,
            "converter": {
                "via": "llama.cpp convert_hf_to_gguf.py",
                "llama_cpp": LLAMA_CPP_TAG,
                "hf_architecture": arch,
                "merged_dtype": str(plan.out_dtype).removeprefix("torch."),
                "seconds": seconds,
                "intermediates_removed": removed,
            },
        }
        if len(types) > 1:
            result["gguf_files"] = {f: {"type": e["type"], "tensor_types": e["tensor_types"]} for f, e in per_file.items()}
        settings = {"type": ",".join(t.value for t in types), "name": name, "modelfile": modelfile, **options}
        write_manifest(folder, command="gguf", sources=sources, settings=settings, result=result, files=files)
        log_notes(logger, notes)
        return GgufResult(
            output=final,
            gguf_file=final / first,
            files=sorted([*files, MANIFEST_NAME]),
            n_tensors=per_file[first]["n_tensors"],
            n_merged=len(plan.merged),
            type=types[0].value,
            tensor_types=per_file[first]["tensor_types"],
            total_bytes=(folder / first).stat().st_size,
            seconds=round(time.perf_counter() - t_start, 3),
            notes=notes,
            modelfile=final / side.modelfile if side.modelfile else None,
            chat_template_family=side.family,
            gguf_files=[final / f for f in per_file],
            types=[t.value for t in types],
            converter=f"llama.cpp's convert_hf_to_gguf.py ({LLAMA_CPP_TAG})",
        )

    # the GGUF files (about the checkpoint's size again) are written beside the checkpoint
    return replace(planned, command="gguf", finish=finish, needed_bytes=2 * planned.needed_bytes, parts=[], split=None)
