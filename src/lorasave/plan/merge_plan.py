"""The plan: every output tensor with its recipe, dtype and shard, computed before any byte is written.

The same plan drives the free-disk check, the progress bar total, the shard headers, the index
and the manifest. Shards are split as transformers 5 ``save_pretrained`` splits them: greedily in
``state_dict`` order (huggingface_hub ``split_state_dict_into_shards_factory``), named
``model-00001-of-0000N.safetensors``, with ``model.safetensors.index.json`` listing
``total_parameters``, ``total_size`` and the ``weight_map``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lorasave.errors import AdapterMismatchError, InvalidOptionError, UnsupportedAdapterError, UnsupportedModelError
from lorasave.formats.bnb import Bnb4bitSpec, quantization_config
from lorasave.formats.compressed import CompressedSpec, select_modules
from lorasave.formats.fp8 import Fp8BlockSpec, Fp8Weight, fp8_block_spec
from lorasave.formats.fp8_compressed import fp8_layout
from lorasave.formats.mxfp4 import Mxfp4Spec, Mxfp4Weight
from lorasave.formats.quant_bases import QuantizedWeight
from lorasave.formats.safetensors.header import TensorEntry, TensorLayout, layout, serialize_header
from lorasave.plan.recipes import AdapterTensor, LoraDelta, Operation, SetRows
from lorasave.plan.targets import adapter_operations, runtime_renames
from lorasave.sources.adapter import Adapter
from lorasave.sources.architecture import ArchitectureInfo, ModuleKind, meta_model, revert_to_checkpoint
from lorasave.sources.checkpoint import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, Checkpoint, MemoryEntry
from lorasave.sources.weight_dtypes import check_base_dtypes, check_mergeable, is_scale
from lorasave.util.dtypes import FLOAT_DTYPES, ST_DTYPES, StDtype, nbytes, st_dtype

logger = logging.getLogger(__name__)

SHARD_METADATA = {"format": "pt"}


Source = TensorEntry | QuantizedWeight | AdapterTensor


@dataclass
class OutputTensor:
    """One tensor of the output.

    Attributes:
        name: tensor name in the output.
        shape: its shape.
        dtype: its safetensors dtype.
        source: where W0 comes from: the base, a quantized base weight, or a full tensor saved
            in an adapter (``modules_to_save``, a resized embedding).
        ops: operations applied to W0, in order (``recipes.py``); empty: copied, cast if needed.
        roundtrip: round-trip W0 through this 4-bit quantization first (``merge_into="dequantized"``).
        quantize: write the result quantized: bitsandbytes 4-bit (``save_method="merged_4bit"``) or a
            compressed-tensors scheme (``formats.compressed``).
    """

    name: str
    shape: tuple[int, ...]
    dtype: StDtype
    source: Source
    ops: tuple[Operation, ...] = ()
    roundtrip: Bnb4bitSpec | None = None
    quantize: Bnb4bitSpec | CompressedSpec | Mxfp4Spec | Fp8BlockSpec | None = None

    @property
    def changed(self) -> bool:
        """Whether an adapter changes this tensor (operations, or a W0 taken from an adapter)."""
        return bool(self.ops) or isinstance(self.source, AdapterTensor)

    @property
    def nbytes(self) -> int:
        """Bytes of data in the output file(s); estimated for a quantized output (see ``file_tensors``)."""
        return sum(nbytes(dt, shape) for dt, shape in self.file_tensors().values())

    def file_tensors(self) -> dict[str, tuple[StDtype, tuple[int, ...]]]:
        """The tensors this output writes: itself, or its quantized codes and scales."""
        if self.quantize is not None:
            assert self.dtype.torch_dtype is not None
            return self.quantize.planned_shapes(self.name, self.shape, self.dtype.torch_dtype)
        return {self.name: (self.dtype, self.shape)}


@dataclass
class Shard:
    """One output safetensors file.

    Attributes:
        filename: e.g. ``model-00001-of-00002.safetensors``.
        layouts: tensors in file order with their data offsets.
        header: the bytes before the data buffer.
        outputs: the output tensors whose file tensors this shard holds, in production order.
        deferred: the header depends on values computed while writing (4-bit statistics), so the
            shard is written data-first and assembled at the end; ``layouts`` are then estimates.
    """

    filename: str
    layouts: list[TensorLayout]
    header: bytes
    outputs: list[str] = field(default_factory=list)
    deferred: bool = False

    @property
    def nbytes(self) -> int:
        """Size of the file in bytes (an estimate when ``deferred``)."""
        return len(self.header) + (self.layouts[-1].end if self.layouts else 0)


@dataclass
class MergePlan:
    """Everything a merge will write.

    Attributes:
        tensors: output tensors by name, in save order.
        shards: output files in order.
        index: the ``model.safetensors.index.json`` content, or None for a single file.
        out_dtype: the floating dtype of the output.
        notes: things the user should know (fallbacks taken).
        config_updates: ``config.json`` keys to change (``tie_word_embeddings``, ``vocab_size``),
            as ``{dotted.path: value}``.
        converter: runtime tensors -> checkpoint tensors (transformers' reverse weight conversion),
            set when an adapter targets runtime parameters (``ExpertDelta``).
        quantizer: the output quantization (with its ``ignore`` list for compressed-tensors), or None.
    """

    tensors: dict[str, OutputTensor]
    shards: list[Shard]
    index: dict[str, object] | None
    out_dtype: torch.dtype
    notes: list[str] = field(default_factory=list)
    config_updates: dict[str, object] = field(default_factory=dict)
    converter: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    quantizer: Bnb4bitSpec | CompressedSpec | Mxfp4Spec | Fp8BlockSpec | None = None

    @property
    def total_bytes(self) -> int:
        """Bytes of all weight files (headers included)."""
        return sum(s.nbytes for s in self.shards)

    @property
    def data_bytes(self) -> int:
        """Bytes of tensor data, the unit of the progress bar."""
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def merged(self) -> list[str]:
        """Names of tensors an adapter changes."""
        return [n for n, t in self.tensors.items() if t.changed]

    def index_bytes(self) -> bytes | None:
        """The index file's bytes, as transformers writes them (``indent=2, sort_keys=True`` + newline)."""
        if self.index is None:
            return None
        return (json.dumps(self.index, indent=2, sort_keys=True) + "\n").encode("utf-8")


def base_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The base's floating dtype: ``dtype`` / ``torch_dtype`` in config.json, else the most common one.

    A bitsandbytes-quantized base gives bfloat16, the usual 16-bit form of such models; another
    quantized base (FP8) its config's dtype, else bfloat16.
    """
    if ckpt.quant_method == "bitsandbytes":
        return torch.bfloat16
    name = ckpt.config.get("dtype") or ckpt.config.get("torch_dtype")
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    if isinstance(dt, torch.dtype) and dt in (torch.float16, torch.bfloat16, torch.float32):
        return dt
    if ckpt.quant_method is not None:
        return torch.bfloat16
    counts: dict[torch.dtype, int] = {}
    for e in ckpt.tensors.values():
        if e.dtype.torch_dtype in FLOAT_DTYPES:
            counts[e.dtype.torch_dtype] = counts.get(e.dtype.torch_dtype, 0) + e.nbytes
    return max(counts, key=lambda d: counts[d]) if counts else torch.float32


def _config_key(config: dict[str, Any], key: str) -> tuple[str, Any] | None:
    """``(dotted path, value)`` of ``key`` at the top of config.json or in ``text_config``."""
    if key in config:
        return key, config[key]
    sub = config.get("text_config")
    if isinstance(sub, dict) and key in sub:
        return f"text_config.{key}", sub[key]
    return None


def _ties_kept(name: str, partner: str, ops: dict[str, list[Operation]], sources: dict[str, Source], adapters: list[Adapter]) -> bool:
    """Whether a tied pair stays tied: nothing changes either, or only what PEFT applies to both."""
    changed = [n for n in (name, partner) if n in ops or n in sources]
    if not changed:
        return True
    if name in sources or name in ops:
        return False  # the dropped side (lm_head) itself is changed: the PeftModel computes it apart
    only_rows = all(isinstance(o, SetRows) for o in ops.get(partner, []))
    if partner not in sources and only_rows:
        return True  # trainable tokens are tied to lm_head by PEFT
    return any(a.config.get("ensure_weight_tying") for a in adapters)


def adapter_renames(config: dict[str, Any], adapters: list[Adapter], shapes: dict[str, tuple[int, ...]], arch: ArchitectureInfo) -> dict[str, str]:
    """``{runtime tensor name: checkpoint tensor name}`` for the adapters' targets the base stores under
    another name (``plan.targets.runtime_renames``; transformers 5 saves multimodal models such as
    ``Gemma3ForConditionalGeneration`` in their checkpoint layout, PEFT names runtime modules).
    Empty when every target is found as it is or transformers has no class for the config."""
    if not arch.model_class or all(f"{p.module}.weight" in shapes for ad in adapters for p in ad.parts.values()):
        return {}
    try:
        meta = meta_model(config)
    except UnsupportedModelError:
        return {}
    return runtime_renames(adapters, shapes, lambda state: revert_to_checkpoint(meta, state))


def build_plan(
    ckpt: Checkpoint,
    adapters: list[Adapter],
    arch: ArchitectureInfo,
    *,
    out_dtype: torch.dtype | None,
    max_shard_size: int,
    weights: list[float] | None = None,
    merge_into: Bnb4bitSpec | None = None,
    quantize: Bnb4bitSpec | CompressedSpec | Mxfp4Spec | Fp8BlockSpec | None = None,
) -> MergePlan:
    """Decide every output tensor, its dtype, recipe and shard.

    Args:
        ckpt: the base.
        adapters: the adapters, applied in order.
        arch: architecture facts (save order, layer types, fp32 modules, ties).
        out_dtype: floating output dtype, or None for the base's dtype.
        max_shard_size: shard limit in bytes.
        weights: combination weight of each adapter (default 1.0 each): W0 + Σ wᵢ·ΔWᵢ.
        merge_into: round-trip each LoRA-targeted W0 through this 4-bit quantization first
            (the base the adapter saw when it was trained with QLoRA on a 16-bit original).
        quantize: write the Linear weights transformers would quantize as bitsandbytes 4-bit, or
            (compressed-tensors) the ``nn.Linear`` weights but ``lm_head``, routers and shapes the
            scheme cannot take, which go to its ``ignore`` list; or (``Mxfp4Spec``) gpt-oss's fused
            experts as MXFP4, those no adapter changes copied from an MXFP4 base as they are; ``fp8_block``
            on a block-scaled FP8 base keeps its layout (``Fp8BlockSpec``): unchanged FP8 tensors copied,
            merged ones re-quantized.

    Raises:
        AdapterMismatchError: an adapter targets a tensor the base lacks, shapes disagree, or
            no adapter changes anything.
        UnsupportedAdapterError: a recipe lorasave cannot produce, or a combination it refuses.
        UnsupportedDtypeError: a sub-byte base tensor, or a changed weight that is not a 16/32/64-bit float.
        Fp8WeightsError: FP8 weights with scale tensors and no quantization_config (``weight_dtypes``).
    """
    notes: list[str] = []
    if arch.note:
        notes.append(arch.note)
    if ckpt.config.get("auto_map") and arch.model_class:
        notes.append(f"config.json has an auto_map (remote code); ignored: the built-in {arch.model_class} is used and no code from {ckpt.root} is run")
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise InvalidOptionError(f"{len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    if len(adapters) > 1 and any(a.uses_dora for a in adapters):
        raise UnsupportedAdapterError(
            "DoRA adapters cannot be combined: each one's magnitude normalizes its own W0 + ΔW, so the sum of several is not defined",
            path=next(a.root for a in adapters if a.uses_dora),
        )
    check_base_dtypes(ckpt.root, ckpt.tensors, quantization_config(ckpt.config))
    dtype = out_dtype or base_dtype(ckpt)
    fp32 = arch.fp32_pattern(dtype)

    # W0 of every tensor: the base's, or a full tensor an adapter saved
    sources: dict[str, Source] = {}
    for i, ad in enumerate(adapters):
        for name, key in ad.extra.items():
            if name in sources:
                raise UnsupportedAdapterError(
                    f"two adapters both save a full {name} (modules_to_save); their fine-tunes conflict and cannot be combined",
                    path=ad.root,
                )
            if name not in ckpt.tensors and name not in arch.tied_to:
                raise AdapterMismatchError(f"{ad.root}: the adapter saves {key}, but the base has no tensor {name}", path=ad.root)
            sources[name] = AdapterTensor(i, key, ad.shape(key), st_dtype(ad.dtype(key)))
    shapes = {n: tuple(e.shape) for n, e in ckpt.tensors.items()}
    for dropped, kept in arch.tied_to.items():
        if kept in shapes:
            shapes.setdefault(dropped, shapes[kept])
    shapes.update({n: src.shape for n, src in sources.items()})

    converter = None
    param_map = None
    if any(a.config.get("target_parameters") for a in adapters):
        model = meta_model(ckpt.config)

        def converter(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return revert_to_checkpoint(model, state)

        def param_map(name: str, shape: tuple[int, ...]) -> list[str]:
            if name in ckpt.tensors:  # the checkpoint stores the runtime parameter itself (fused experts)
                return [name]
            return list(converter({name: torch.empty(shape, device="meta")}))

    renames = adapter_renames(ckpt.config, list(adapters), shapes, arch)
    ops: dict[str, list[Operation]] = {}
    for i, ad in enumerate(adapters):
        for name, add in adapter_operations(i, ad, weights[i], arch, shapes, notes, param_map, renames).items():
            ops.setdefault(name, []).extend(add)
    if adapters and not ops and not sources:  # no adapter at all: the base alone (lorasave gguf BASE)
        raise AdapterMismatchError(f"the adapter{'s' if len(adapters) > 1 else ''} change nothing in the base {ckpt.root}", path=ckpt.root)

    # tied weights: write the dropped side only when the fine-tune makes the two differ
    config_updates: dict[str, object] = {}
    untied: dict[str, Source] = {}
    for dropped, kept in arch.tied_to.items():
        if kept not in ckpt.tensors and kept not in sources:
            continue
        if _ties_kept(dropped, kept, ops, sources, adapters):
            continue
        untied[dropped] = sources.get(dropped) or ckpt.tensors[kept]
        tie = _config_key(ckpt.config, "tie_word_embeddings")
        config_updates[tie[0] if tie else "tie_word_embeddings"] = False
        notes.append(f"{dropped} now differs from {kept}: written separately, tie_word_embeddings set to false")
    dropped_in_base = [n for n in ckpt.tensors if n in arch.tied_to and n not in untied]
    if dropped_in_base and arch.save_order is not None:
        notes.append(f"dropped {', '.join(dropped_in_base)}: tied to another tensor in {arch.model_class}, as save_pretrained does")

    names = [n for n in ckpt.tensors if n not in dropped_in_base] + [n for n in untied if n not in ckpt.tensors]
    if arch.save_order is not None:
        # transformers sorts a loaded model's state dict by dot_natural_key before sharding
        names.sort(key=dot_natural_key)
        unknown = [n for n in names if n not in set(arch.save_order) and n not in untied]
        if unknown:
            notes.append(f"{len(unknown)} tensors unknown to {arch.model_class} kept (first: {unknown[0]})")

    chosen = arch.bnb_quantizable
    keep_layout = False
    if isinstance(quantize, CompressedSpec) and quantize.save_method == "fp8_block" and ckpt.quant_method in ("fp8", "compressed-tensors"):
        qc = quantization_config(ckpt.config) or {}
        layout = fp8_layout(qc) if ckpt.quant_method == "compressed-tensors" else None
        quantize, chosen = fp8_block_spec(dict(ckpt.tensors), qc, ckpt.root / "config.json", layout)
        keep_layout = True
    elif isinstance(quantize, CompressedSpec):
        linear = [m for m, k in arch.module_kinds.items() if k is ModuleKind.LINEAR]
        weight_shapes = {n.removesuffix(".weight"): shapes[n] for n in names if n.endswith(".weight")}
        chosen, ignore, q_notes = select_modules(quantize, linear, arch.bnb_quantizable, weight_shapes)
        quantize = CompressedSpec(quantize.save_method, tuple(ignore))
        notes.extend(q_notes)
    if isinstance(quantize, Mxfp4Spec):
        keep_layout = True
        chosen = {n for n in names if quantize.quantizable(n, shapes[n])}
        if not chosen:
            raise UnsupportedAdapterError(
                f"--save-method mxfp4 writes gpt-oss's fused experts (mlp.experts.gate_up_proj / down_proj) as MXFP4; "
                f"{arch.model_class or ckpt.root} has none: use merged_16bit, or mxfp4a16 (compressed-tensors MXFP4 Linear weights)",
                path=ckpt.root,
            )
        if ckpt.quant_method == "mxfp4":  # the base's own quantization_config (its modules_to_not_convert)
            quantize = Mxfp4Spec(json.dumps(quantization_config(ckpt.config), sort_keys=True))
    tensors: dict[str, OutputTensor] = {}
    for name in names:
        src: Source = sources.get(name) or untied.get(name) or ckpt.tensors[name]
        tdt = src.dtype
        if tdt.torch_dtype in FLOAT_DTYPES and not is_scale(name):
            tdt = ST_DTYPES["F32"] if fp32 is not None and fp32.search(name) else st_dtype(dtype)
        t_ops = tuple(ops.get(name, ()))
        if keep_layout and name in chosen and not t_ops and isinstance(src, (Mxfp4Weight, Fp8Weight)):
            for e in src.entries():  # unchanged: the base's own codes and scales, byte for byte
                tensors[e.name] = OutputTensor(e.name, tuple(e.shape), e.dtype, e)
            continue
        rt = merge_into if isinstance(src, (TensorEntry, MemoryEntry)) and any(isinstance(o, LoraDelta) for o in t_ops) else None
        if keep_layout:
            q = quantize if name in chosen else None
        else:
            q = quantize if quantize is not None and name.endswith(".weight") and name.removesuffix(".weight") in chosen else None
        tensors[name] = OutputTensor(name, tuple(src.shape), tdt, src, t_ops, rt, q)
    missing = sorted(set(ops) - set(tensors))
    if missing:
        raise AdapterMismatchError(f"the adapters change {missing[0]}, which the output would not contain", path=ckpt.root)
    roots = [a.root for a in adapters]
    check_mergeable((n, t.source, roots[t.source.adapter] if isinstance(t.source, AdapterTensor) else ckpt.root) for n, t in tensors.items() if t.ops)
    _check_vocab(ckpt, tensors, arch, config_updates)

    if merge_into is not None and ckpt.quant_method is not None:
        raise UnsupportedAdapterError(
            f"{ckpt.root} is already quantized; --merge-into dequantized (merge_into) is for a 16-bit base: merge into this 4-bit base directly", path=ckpt.root
        )
    if quantize is not None and not keep_layout:
        if any(k is ModuleKind.CONV1D_GPT2 for k in arch.module_kinds.values()):
            raise UnsupportedAdapterError("quantized output of GPT-2 style Conv1D models is not supported yet", path=ckpt.root)
        if not any(t.quantize for t in tensors.values()):
            raise UnsupportedAdapterError(f"no Linear layer of {arch.model_class or ckpt.root} would be quantized; use merged_16bit", path=ckpt.root)
    shards, index = _shard(tensors, max_shard_size, arch, natural_order=arch.save_order is not None)
    return MergePlan(tensors, shards, index, dtype, notes, config_updates, converter, quantize)


def _check_vocab(ckpt: Checkpoint, tensors: dict[str, OutputTensor], arch: ArchitectureInfo, config_updates: dict[str, object]) -> None:
    """A resized vocabulary: every vocabulary-sized tensor must have the new size, and config.json follows.

    Raises:
        UnsupportedAdapterError: the adapter resized some vocabulary tensors but not others (their
            new rows were trained, or initialised, in a way the adapter does not record).
    """
    vocab = _config_key(ckpt.config, "vocab_size")
    if vocab is None or not isinstance(vocab[1], int):
        return
    old = vocab[1]
    sizes: dict[str, int] = {}
    for n, t in tensors.items():
        base = ckpt.tensors.get(n) or ckpt.tensors.get(arch.tied_to.get(n, ""))
        if _is_vocab(n, arch) and base is not None and base.shape and base.shape[0] == old and t.shape:
            sizes[n] = t.shape[0]
    if all(v == old for v in sizes.values()):
        return
    new = max(sizes.values())
    stale = [n for n, v in sizes.items() if v != new]
    if stale:
        raise UnsupportedAdapterError(
            f"the fine-tune resized the vocabulary from {old} to {new} rows, but the adapter does not hold the new rows of {stale[0]}; "
            "they were initialised or trained in memory and never saved, so lorasave cannot know them. Save the adapter with "
            "modules_to_save (or save_embedding_layers=True) covering every embedding and output layer",
            path=ckpt.root,
        )
    config_updates[vocab[0]] = new


def _is_vocab(name: str, arch: ArchitectureInfo) -> bool:
    module = name.removesuffix(".weight")
    return name.endswith(".weight") and (arch.kind_of(module) is ModuleKind.EMBEDDING or name in arch.tied_to or module.endswith("lm_head"))


def _shard(
    tensors: dict[str, OutputTensor], max_shard_size: int, arch: ArchitectureInfo, *, natural_order: bool
) -> tuple[list[Shard], dict[str, object] | None]:
    """Split the output into shards as ``save_pretrained`` does (greedy, in order, by storage bytes).

    A 4-bit weight's codes and statistics are produced together, so they are kept in one shard:
    the split then works on whole weights.
    """
    from huggingface_hub import split_state_dict_into_shards_factory

    files: dict[str, tuple[StDtype, tuple[int, ...]]] = {}
    owner: dict[str, str] = {}
    for t in tensors.values():
        for fname, spec in t.file_tensors().items():
            files[fname] = spec
            owner[fname] = t.name
    deferred = any(t.quantize is not None for t in tensors.values())
    if deferred and natural_order:  # 4-bit statistics sort in among the weights, as transformers saves them
        files = dict(sorted(files.items(), key=lambda kv: dot_natural_key(kv[0])))
    pattern = SAFE_WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors")
    if deferred:
        units: dict[str, int] = {}
        for fname, spec in files.items():
            units[owner[fname]] = units.get(owner[fname], 0) + nbytes(*spec)
        split = split_state_dict_into_shards_factory(units, get_storage_size=lambda n: n, filename_pattern=pattern, max_shard_size=max_shard_size)
        filename_to_tensors = {f: [n for n in files if owner[n] in set(ts)] for f, ts in split.filename_to_tensors.items()}
    else:
        split = split_state_dict_into_shards_factory(
            files, get_storage_size=lambda spec: nbytes(*spec), filename_pattern=pattern, max_shard_size=max_shard_size
        )
        filename_to_tensors = dict(split.filename_to_tensors)
    shards = []
    for filename, names in filename_to_tensors.items():
        lay = layout((n, *files[n]) for n in names)
        outputs = list(dict.fromkeys(owner[n] for n in names))
        shards.append(Shard(filename, lay, serialize_header(lay, SHARD_METADATA), outputs, deferred))
    if not split.is_sharded:
        return shards, None
    total_params = arch.num_parameters
    if total_params is None or deferred:
        total_params = sum(_numel(t.shape) for t in tensors.values() if t.dtype.torch_dtype in FLOAT_DTYPES)
    index = {
        "metadata": {"total_parameters": total_params, "total_size": sum(nbytes(*spec) for spec in files.values())},
        "weight_map": {n: f for f, names in filename_to_tensors.items() for n in names},
    }
    return shards, index


def dot_natural_key(name: str) -> tuple[tuple[object, ...], ...]:
    """Sort key of state-dict names: numbers numerically, text alphabetically, by dotted part.

    Same order as transformers' ``core_model_loading.dot_natural_key``, which ``save_pretrained``
    applies before sharding.
    """
    parts: list[tuple[object, ...]] = []
    for part in name.split("."):
        if part.isdigit():
            parts.append((0, int(part)))
        else:
            text = part.rstrip("0123456789")
            digits = part[len(text) :]
            parts.append((1, text, int(digits)) if digits else (1, part))
    return tuple(parts)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


INDEX_NAME = SAFE_WEIGHTS_INDEX_NAME
