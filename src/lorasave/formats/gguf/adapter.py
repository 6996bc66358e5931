"""Write a PEFT LoRA adapter as a GGUF LoRA adapter, the file llama.cpp loads with ``--lora``.

What llama.cpp's ``convert_lora_to_gguf.py`` writes, plus exact PEFT scaling:

* metadata: ``general.type = "adapter"``, ``general.architecture`` (the base's), ``general.name``,
  ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32) and ``general.quantization_version``
  (``LoraModel.set_type`` / ``set_gguf_parameters``; no hyper-parameters and no tokenizer);
* tensors ``<base GGUF name>.lora_a`` / ``.lora_b`` (e.g. ``blk.0.attn_q.weight.lora_a``) with the
  shapes ``llama_adapter_lora_init_impl`` (``src/llama-adapter.cpp``) validates, rows first:
  ``lora_a`` ``(r, in)`` and ``lora_b`` ``(out, r)`` (ggml ``ne = [in, r]`` and ``[r, out]``), i.e.
  PEFT's A and B unchanged; for ``token_embd.weight`` ``lora_a`` is A transposed, ``(vocab, r)``,
  and ``lora_b`` is B, ``(n_embd, r)`` (``llm_graph_context::build_inp_embd`` gathers rows of A);
* the base architecture's Q/K permutation (``gguf_export.permute_qk``) applied to the rows of B
  only: ``permute(B @ A) = permute(B) @ A`` because the permutation acts on output rows
  (``LoraTorchTensor.reshape``/``swapaxes`` in ``convert_lora_to_gguf.py`` touch B alone);
* per-tensor GGML types as for the base (``gguf_export.ggml_type`` on the base tensor's name):
  the requested type, Q8_0 falling back to F16 when a row (``r`` for ``lora_b``) is not a
  multiple of 32 (``ModelBase.prepare_tensors``, ``conversion/base.py``).

Scaling. llama.cpp computes, per tensor at load time (``llama_adapter_lora_weight::get_scale``,
``src/llama-adapter.h``)::

    scale = user_scale * alpha / rank      (rank = ne[0] of lora_b = r; alpha = adapter.lora.alpha)

one ``alpha`` for the whole file. PEFT (``tuners/lora/layer.py`` ``LoraLayer.update_layer``) uses
per module ``alpha_m / r_m``, or ``alpha_m / sqrt(r_m)`` with ``use_rslora``, where ``r_m`` and
``alpha_m`` follow ``rank_pattern`` / ``alpha_pattern``. The file's alpha is the config's
``lora_alpha`` (the first module's alpha when that is 0), and each module's remaining factor is
folded into B in float32::

    fold_m = (alpha_m / alpha_file) * (sqrt(r_m) if use_rslora else 1)
    B_gguf = fold_m * B          so  alpha_file / r_m * B_gguf @ A == scaling_m * B @ A

A plain adapter (no patterns, no rsLoRA) has ``fold_m == 1`` and its B is written as it is.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from lorasave.errors import InvalidOptionError, UnsupportedAdapterError
from lorasave.formats.gguf.arch import GgufArch, gguf_arch_for
from lorasave.formats.gguf.export import ggml_type, gguf_tensors, permute_qk
from lorasave.formats.gguf.naming import gguf_file_name, model_metadata
from lorasave.formats.gguf.quant import GgufType, encode, tensor_nbytes
from lorasave.formats.safetensors.header import TensorEntry
from lorasave.merging.stream import Timings
from lorasave.pipeline.manifest import MANIFEST_NAME, result_dict, sha256_file, sha256_source, write_manifest
from lorasave.pipeline.output import check_output_path
from lorasave.pipeline.run import PlannedOutput, run_single
from lorasave.plan.merge_plan import build_plan
from lorasave.plan.recipes import LoraDelta
from lorasave.sources import stamp as source_stamp
from lorasave.sources.adapter import TOKENS_ROLE, Adapter, TunerType, adapter_list, load_adapters
from lorasave.sources.architecture import inspect_architecture
from lorasave.sources.checkpoint import Checkpoint, TensorReader
from lorasave.sources.named_base import open_base
from lorasave.util.names import check_file_name
from lorasave.util.notes import log_notes

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: ``--type`` values of a GGUF adapter: the types ``convert_lora_to_gguf.py`` writes (``GgufType.converter``).
ADAPTER_TYPES = tuple(t.value for t in GgufType if t.converter)

#: The one-line pointer every refusal ends with.
MERGED_HINT = "write a merged GGUF instead with `lorasave gguf BASE ADAPTER`"

#: GGUF tensors whose LoRA pair llama.cpp resolves by name, so a tied output (which reuses
#: ``token_embd.weight``, ``llama-model.cpp`` ``TENSOR_DUPLICATED``) would apply it twice.
EMBEDDING_NAMES = ("token_embd.weight", "output.weight")


@dataclass
class GgufAdapterResult:
    """What ``export_gguf_adapter`` wrote: the fields of :class:`lorasave.formats.gguf.export.GgufResult` that one adapter file has, and its LoRA facts.

    Attributes:
        output, gguf_file, files, type, tensor_types, total_bytes, seconds, notes: as in ``GgufResult`` (``type`` one of ``ADAPTER_TYPES``).
        n_tensors: tensors in the GGUF file (two per adapted module).
        n_modules: adapted modules.
        alpha: ``adapter.lora.alpha`` written.
        folded: modules whose B carries an extra factor (rsLoRA, patterns), by GGUF name.
    """

    output: Path
    gguf_file: Path
    files: list[str]
    n_tensors: int
    n_modules: int
    type: str
    alpha: float
    folded: dict[str, float]
    tensor_types: dict[str, int]
    total_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``--json``)."""
        return result_dict(self)

    def summary(self) -> str:
        """One line for humans."""
        types = ", ".join(f"{n} {k}" for k, n in sorted(self.tensor_types.items()))
        return (
            f"wrote {self.gguf_file} ({self.n_modules} LoRA pairs, {self.n_tensors} tensors: {types}; "
            f"alpha {self.alpha:g}; {self.total_bytes / 1e6:.2f} MB) in {self.seconds:.1f} s"
        )


@dataclass(frozen=True)
class LoraPair:
    """One adapted tensor of the base, as two GGUF tensors.

    Attributes:
        module: PEFT module name (``model.layers.0.self_attn.q_proj``).
        name: GGUF name of the base tensor (``blk.0.attn_q.weight``); the pair is ``name.lora_a``
            / ``name.lora_b``.
        lora_a: adapter key of A, ``(r, in)`` (embeddings: ``(r, vocab)``).
        lora_b: adapter key of B, ``(out, r)``.
        rank: ``r`` of this module (rows of A).
        fold: factor multiplied into B (see the module docstring).
        embedding: an embedding LoRA (A is written transposed).
        permute_heads: ``(n_head, n_head_kv)`` for the Q/K permute of B's rows, or None.
        a_shape: shape of ``lora_a`` in the file, rows first.
        b_shape: shape of ``lora_b`` in the file, rows first.
        a_type: GGML type of ``lora_a``.
        b_type: GGML type of ``lora_b``.
    """

    module: str
    name: str
    lora_a: str
    lora_b: str
    rank: int
    fold: float
    embedding: bool
    permute_heads: tuple[int, int] | None
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    a_type: gguf.GGMLQuantizationType
    b_type: gguf.GGMLQuantizationType


def _refuse(adapter: Adapter, what: str) -> UnsupportedAdapterError:
    return UnsupportedAdapterError(f"{adapter.root}: {what}, which a GGUF LoRA adapter cannot express; {MERGED_HINT}", path=adapter.root)


def _unchanged_copy(adapter: Adapter, ckpt: Checkpoint, target: str) -> bool:
    """Whether the full tensor the adapter saves for ``target`` equals the base's, value for value."""
    entry = ckpt.tensors.get(target)
    key = adapter.extra[target]
    if not isinstance(entry, TensorEntry) or tuple(entry.shape) != tuple(adapter.shape(key)):
        return False
    with TensorReader() as reader:
        return torch.equal(reader.read(entry).to(torch.float32), adapter.tensor(key, reader).to(torch.float32))


def check_expressible(adapter: Adapter, ckpt: Checkpoint, *, refuse: Callable[[Adapter, str], UnsupportedAdapterError] | None = None) -> None:
    """Refuse what llama.cpp's LoRA adapter format (pairs ``lora_a``/``lora_b`` + one alpha) cannot hold;
    ``refuse`` words the error for another adapter format (the ONNX one) that holds the same.

    Raises:
        UnsupportedAdapterError: LoHa / LoKr / IA3 / trainable tokens, DoRA, ``lora_bias``,
            trainable or new tokens, ``modules_to_save`` or a full tensor saved in the adapter that
            differs from the base's (resized vocabulary; PEFT's ``save_embedding_layers`` copies of
            the unchanged base weight are accepted), LoRA on 3-D parameters (``target_parameters``) or on convolutions.
    """
    say = refuse or _refuse
    cfg = adapter.config
    if adapter.tuner is not TunerType.LORA:
        raise say(adapter, f"peft_type {adapter.tuner.value} is not LoRA")
    if adapter.uses_dora:
        raise say(adapter, "DoRA (use_dora) rescales each weight by a magnitude vector")
    if cfg.get("lora_bias") or any("lora_B.bias" in p.keys for p in adapter.parts.values()):
        raise say(adapter, "lora_bias trains a bias delta")
    if cfg.get("trainable_token_indices") or any(TOKENS_ROLE in p.keys for p in adapter.parts.values()):
        raise say(adapter, "trainable_token_indices trains rows of the embedding (new or changed tokens)")
    if cfg.get("modules_to_save"):
        raise say(adapter, f"modules_to_save ({', '.join(cfg['modules_to_save'])}) stores full trained modules")
    for target in sorted(adapter.extra):
        if ".modules_to_save." not in adapter.extra[target] and _unchanged_copy(adapter, ckpt, target):
            continue  # save_embedding_layers wrote the untouched base weight beside the LoRA
        if any(k in target for k in ("embed", "lm_head", "wte", "output")):
            raise say(adapter, f"it saves a full {target} that differs from the base's (new tokens or a resized vocabulary)")
        raise say(adapter, f"modules_to_save stores full trained tensors ({target})")
    if cfg.get("target_parameters"):
        raise say(adapter, "target_parameters puts LoRA on 3-D expert parameters")
    for p in adapter.lora.values():
        if len(adapter.shape(p.lora_A)) != 2:
            raise say(adapter, f"{p.module} is a convolution LoRA")


def _file_alpha(adapter: Adapter) -> float:
    """``adapter.lora.alpha``: the config's ``lora_alpha``, or the first module's when that is 0."""
    alpha = adapter.config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(float(alpha)) or alpha == 0:
        first = next(iter(adapter.lora.values()), None)
        alpha = first.alpha if first is not None else 1.0  # no LoRA module: the plan refuses it next
    return float(alpha)


def plan_pairs(ckpt: Checkpoint, adapter: Adapter, rules: GgufArch, type: str, alpha: float) -> list[LoraPair]:
    """Every LoRA pair with its GGUF name, fold factor, shapes and types, in base tensor order.

    The merge's plan (``plan.build_plan``) matches modules to base tensors, so an adapter that
    does not fit the base fails with the same errors as ``merge``.

    Raises:
        AdapterMismatchError: modules the base lacks, shapes that disagree (from the plan).
        UnsupportedAdapterError: a LoRA on ``lm_head``/``embed_tokens`` when the base ties them
            (llama.cpp reuses ``token_embd.weight`` as the output), or an operation other than a
            plain LoRA delta.
        UnsupportedModelError: a targeted tensor without a GGUF name.
    """
    plan = build_plan(ckpt, [adapter], inspect_architecture(ckpt.config), out_dtype=torch.float32, max_shard_size=1 << 62)
    if plan.config_updates:
        raise _refuse(
            adapter,
            f"the base ties lm_head to embed_tokens and the adapter changes one of them ({', '.join(sorted(plan.config_updates))} would change); "
            "llama.cpp reuses token_embd.weight as the output",
        )
    config = json.loads(json.dumps(ckpt.config))
    tensors, _ = gguf_tensors(plan, config, rules, type)  # names and permutes; lora_a/lora_b are typed below
    names = {g.name for g in tensors}
    dropped = sorted({t.name for t in plan.tensors.values() if t.ops} - {p.src.name for g in tensors for p in g.parts})
    if dropped:  # e.g. Gemma's lm_head, which the converter leaves out (the output is token_embd)
        raise _refuse(adapter, f"it adapts {dropped[0]}, which the base's GGUF does not have")
    by_a = {p.lora_A: p for p in adapter.lora.values()}
    rslora = bool(adapter.config.get("use_rslora"))
    pairs = []
    for g in tensors:
        if g.pieces and any(p.src.ops for p in g.pieces):
            raise _refuse(adapter, f"it adapts experts stacked in {g.name}")
        if not g.src.ops:
            continue
        if g.transform is not None:  # GgufArch.transforms: Qwen3.5's V-head reorder...
            raise _refuse(adapter, f"it adapts {g.src.name}, whose values llama.cpp's converter transforms")
        op = g.src.ops[0]
        if len(g.src.ops) != 1 or not isinstance(op, LoraDelta):
            raise _refuse(adapter, f"{g.src.name} gets {type_name(g.src.ops)}, not a plain LoRA delta")
        part = by_a[op.lora_A]
        embedding = "lora_embedding_A" in part.keys
        if op.transpose and not embedding:
            raise _refuse(adapter, f"{part.module} is a transposed (fan_in_fan_out) LoRA")
        if g.name in EMBEDDING_NAMES and "output.weight" not in names:
            raise _refuse(adapter, f"{part.module} is adapted but the base ties its output to the token embedding, so llama.cpp would apply the pair to both")
        assert part.r is not None
        fold = (part.alpha / alpha) * (math.sqrt(part.r) if rslora else 1.0)
        a_shape, b_shape = adapter.shape(op.lora_A), adapter.shape(op.lora_B)
        if embedding:
            a_shape = (a_shape[1], a_shape[0])  # (r, vocab) -> (vocab, r)
        pairs.append(
            LoraPair(
                module=part.module,
                name=g.name,
                lora_a=op.lora_A,
                lora_b=op.lora_B,
                rank=part.r,
                fold=fold,
                embedding=embedding,
                permute_heads=g.permute_heads,
                a_shape=a_shape,
                b_shape=b_shape,
                a_type=ggml_type(g.name, a_shape, type),
                b_type=ggml_type(g.name, b_shape, type),
            )
        )
    return pairs


def type_name(ops: Sequence[object]) -> str:
    """``LoraDelta + DoraNorm`` for error messages."""
    return " + ".join(type(o).__name__ for o in ops)


def pair_tensors(pair: LoraPair, adapter: Adapter, reader: TensorReader) -> tuple[np.ndarray, np.ndarray]:
    """``(lora_a, lora_b)`` of one pair as float32 arrays of ``pair.a_shape`` / ``pair.b_shape``.

    A: PEFT's A ``(r, in)``, transposed to ``(vocab, r)`` for an embedding. B: ``fold * B``
    ``(out, r)`` computed in float32, its rows Q/K-permuted for Llama-family ``attn_q``/``attn_k``.
    """
    a = adapter.tensor(pair.lora_a, reader).to(torch.float32)
    b = adapter.tensor(pair.lora_b, reader).to(torch.float32)
    if pair.embedding:
        a = a.T.contiguous()  # (r, vocab) -> (vocab, r)
    if pair.fold != 1.0:
        b = b * torch.tensor(pair.fold, dtype=torch.float32)
    if pair.permute_heads is not None:
        b = permute_qk(b, *pair.permute_heads)  # (out, r), rows regrouped per head
    return a.numpy(), b.contiguous().numpy()


def _write_card(folder: Path, title: str, filename: str, type: str, counts: dict[str, int], notes: list[str], ckpt: Checkpoint, ad: Adapter) -> None:
    """``README.md`` for the adapter file (``cards.write_gguf_card`` with ``lora_adapter=True``)."""
    from lorasave.formats.card_sources import card_sources
    from lorasave.pipeline.cards import write_gguf_card

    keys = ("peft_type", "r", "lora_alpha", "target_modules", "base_model_name_or_path")
    sources = card_sources(ckpt, [{"path": str(ad.root.resolve()), **{k: ad.config.get(k) for k in keys}}])
    write_gguf_card(folder, title=title, gguf_file=filename, type=type, tensor_types=counts, modelfile=False, notes=notes, lora_adapter=True, **sources)


def export_gguf_adapter(
    base: PathLike | Checkpoint | None,
    adapter: PathLike | Sequence[PathLike] | Adapter,
    output_dir: PathLike,
    *,
    type: str = "f16",
    overwrite: bool = False,
    name: str | None = None,
    allow_pickle: bool = False,
    describe_sources: Callable[[], dict[str, Any]] | None = None,
) -> GgufAdapterResult:
    """Write a PEFT LoRA adapter as ``OUTPUT_DIR/<Name>-<TYPE>-LoRA.gguf`` plus ``lorasave.json``.

    The file is loaded by llama.cpp on the base's GGUF (``lorasave gguf BASE``): ``llama-cli -m
    base.gguf --lora adapter.gguf``, ``llama_adapter_lora_init``. Every module's PEFT scaling
    (rsLoRA, ``rank_pattern`` / ``alpha_pattern``) is reproduced exactly (module docstring). The
    folder appears atomically.

    Args:
        base: the base model folder (``config.json`` + safetensors) the adapter was trained on; None: the
            one its ``adapter_config.json`` names (``base_model_name_or_path``, ``sources.named_base``).
        adapter: one PEFT LoRA adapter folder (a list of more than one is refused).
        output_dir: the folder to create.
        type: ``"f32"``, ``"f16"``, ``"bf16"`` or ``"q8_0"`` for the ``lora_a``/``lora_b`` tensors.
        overwrite: replace an existing ``output_dir`` written by lorasave.
        name: ``general.name`` and file stem (``<name>-<TYPE>-LoRA.gguf``), a plain file name (no path
            separator, ``..``, NUL); default: the names ``convert_lora_to_gguf.py`` gives, from the adapter
            folder's card and name (``naming``).
        allow_pickle: accept ``adapter_model.bin``.
        describe_sources: the manifest's ``sources`` section, for sources that are not folders
            (a live PeftModel: ``sources.live_gguf``); default: the base's config and the adapter's files.

    Returns:
        GgufAdapterResult.

    Raises:
        InvalidOptionError: unknown ``type``, or a ``name`` that is not a plain file name (``names.check_file_name``).
        UnsupportedAdapterError: several adapters, or what the format cannot express (DoRA,
            ``modules_to_save``, new tokens, LoHa/LoKr/IA3, ``lora_bias``, a tied lm_head or
            embedding delta); the message points to ``lorasave gguf BASE ADAPTER``.
        UnsupportedModelError: a base architecture GGUF export does not handle.
        LorasaveError subclasses from loading the sources and the output checks, as ``merge``
        (AdapterMismatchError, NotAnAdapterError, PickleRefusedError, OutputExistsError, ...).
    """
    t_start = time.perf_counter()
    if type not in ADAPTER_TYPES:
        raise InvalidOptionError(f"GGUF type {type!r} is not supported; choose one of {', '.join(ADAPTER_TYPES)}")
    if name is not None:
        check_file_name(name, "name")
    specs: Sequence[PathLike | Adapter] = [adapter] if isinstance(adapter, Adapter) else adapter_list(adapter)
    if len(specs) != 1:
        raise UnsupportedAdapterError(
            f"a GGUF LoRA adapter holds one adapter, {len(specs)} were given; write one file per adapter (llama.cpp takes several --lora), "
            "or write a merged GGUF instead with `lorasave gguf BASE ADAPTER ADAPTER ...`"
        )
    ckpt = open_base(base, specs)
    rules = gguf_arch_for(ckpt.config)
    ad = specs[0] if isinstance(specs[0], Adapter) else load_adapters(specs, allow_pickle=allow_pickle)[0]  # type: ignore[arg-type]
    check_expressible(ad, ckpt)
    final = check_output_path(Path(output_dir), [ckpt.root, ad.root], overwrite)
    alpha = _file_alpha(ad)
    pairs = plan_pairs(ckpt, ad, rules, type, alpha)
    nbytes = sum(tensor_nbytes(p.a_shape, p.a_type) + tensor_nbytes(p.b_shape, p.b_type) for p in pairs)
    notes: list[str] = [ckpt.named_by] if ckpt.named_by else []
    folded = {p.name: p.fold for p in pairs if p.fold != 1.0}
    if folded:
        notes.append(f"{len(folded)} modules have PEFT scaling other than alpha/r (rsLoRA or patterns); the factor is folded into lora_b")
    fallback = [p.name for p in pairs if type == "q8_0" and gguf.GGMLQuantizationType.F16 in (p.a_type, p.b_type)]
    if fallback:
        notes.append(f"{len(fallback)} LoRA pairs keep F16 tensors: rows not a multiple of 32 for Q8_0 (first: {fallback[0]})")

    counts: dict[str, int] = {}
    writer = gguf.GGUFWriter(None, rules.name)
    for p in pairs:
        for suffix, shape, qtype in ((".lora_a", p.a_shape, p.a_type), (".lora_b", p.b_shape, p.b_type)):
            writer.add_tensor_info(p.name + suffix, shape, np.dtype(np.float32), tensor_nbytes(shape, qtype), raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
    # convert_lora_to_gguf.py: the adapter folder's card and name, a negative parameter count (no size label); a live
    # adapter has no folder: the output's, where Unsloth saves it before converting
    named_from = ad.root if ad.root.is_dir() else final
    meta = model_metadata(named_from, name=name, counts=writer.get_total_parameter_count())
    filename = gguf_file_name(meta, type, chosen=name, lora=True)

    def finish(folder: Path, _: Timings) -> GgufAdapterResult:
        # LoraModel.prepare_metadata's order: set_type, the model's names, set_gguf_parameters, quantization version
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        meta.set_gguf_meta_model(writer)
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.write_header_to_file(folder / filename)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with TensorReader() as reader:
            for p in pairs:
                a, b = pair_tensors(p, ad, reader)
                writer.write_tensor_data(encode(a, p.a_type))
                writer.write_tensor_data(encode(b, p.b_type))
        writer.close()
        _write_card(folder, final.name, filename, type, counts, notes, ckpt, ad)
        files = {filename: sha256_file(folder / filename), "README.md": sha256_file(folder / "README.md")}
        sources = (
            describe_sources()
            if describe_sources is not None
            else {
                "base": {"path": str(ckpt.root.resolve()), "hub_id": ckpt.hub_id, "files": {"config.json": sha256_source(ckpt.root / "config.json")}},
                "adapters": [{"path": str(ad.root.resolve()), "files": {str(f.relative_to(ad.root)): sha256_source(f) for f in ad.source_files()}}],
            }
        )
        result = {
            "n_tensors": 2 * len(pairs),
            "n_modules": len(pairs),
            "architecture": rules.name,
            "alpha": alpha,
            "folded": folded,
            "tensor_types": counts,
            "notes": notes,
        }
        settings = {"type": type, "name": name, "allow_pickle": allow_pickle}
        write_manifest(folder, command="gguf-adapter", sources=sources, settings=settings, result=result, files=files)
        total = (folder / filename).stat().st_size
        res = GgufAdapterResult(
            output=final,
            gguf_file=final / filename,
            files=sorted([filename, "README.md", MANIFEST_NAME]),
            n_tensors=2 * len(pairs),
            n_modules=len(pairs),
            type=type,
            alpha=alpha,
            folded=folded,
            tensor_types=counts,
            total_bytes=total,
            seconds=round(time.perf_counter() - t_start, 3),
            notes=notes,
        )
        log_notes(logger, notes)
        logger.debug("%s", res.summary())
        return res

    planned = PlannedOutput("gguf-adapter", final, overwrite, source_stamp.record(ckpt, [ad]), nbytes + (1 << 20), finish)
    result: GgufAdapterResult = run_single(planned)
    return result
