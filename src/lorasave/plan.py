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
from dataclasses import dataclass, field

import torch

from .adapter import Adapter, LoraWeights
from .architecture import ArchitectureInfo, ModuleKind
from .checkpoint import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, Checkpoint
from .dtypes import FLOAT_DTYPES, ST_DTYPES, StDtype, nbytes, st_dtype
from .errors import AdapterMismatchError, UnsupportedAdapterError
from .quant.bnb import Bnb4bitSpec, QuantizedWeight
from .safetensors_format import TensorEntry, TensorLayout, layout, serialize_header

logger = logging.getLogger(__name__)

SHARD_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class LoraDelta:
    """One LoRA term ``scaling * (B @ A)`` added to a weight.

    Attributes:
        adapter: index of the adapter in the plan's adapter list.
        weights: the module's LoRA pair and scaling.
        transpose: True for GPT-2 ``Conv1D`` weights stored ``(in, out)``: the delta is
            ``(B @ A).T`` (peft ``lora.Linear`` with ``fan_in_fan_out``).
    """

    adapter: int
    weights: LoraWeights
    transpose: bool


@dataclass(frozen=True)
class Replacement:
    """A full tensor saved in the adapter (``modules_to_save``, trained bias) that replaces the base's."""

    adapter: int
    key: str


@dataclass
class OutputTensor:
    """One tensor of the output.

    Attributes:
        name: tensor name in the output.
        shape: its shape.
        dtype: its safetensors dtype.
        source: the base tensor it starts from.
        deltas: LoRA terms to add (empty: copied, with a dtype cast if needed).
        replacement: adapter tensor that replaces the base tensor instead.
        roundtrip: round-trip W0 through this 4-bit quantization first (``merge_into="dequantized"``).
        quantize: write the result as bitsandbytes 4-bit (``save_method="merged_4bit"``).
    """

    name: str
    shape: tuple[int, ...]
    dtype: StDtype
    source: TensorEntry | QuantizedWeight
    deltas: tuple[LoraDelta, ...] = ()
    replacement: Replacement | None = None
    roundtrip: Bnb4bitSpec | None = None
    quantize: Bnb4bitSpec | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of data in the output file(s); estimated for a quantized output (see ``file_tensors``)."""
        return sum(nbytes(dt, shape) for dt, shape in self.file_tensors().values())

    def file_tensors(self) -> dict[str, tuple[StDtype, tuple[int, ...]]]:
        """The tensors this output writes: itself, or its 4-bit codes and statistics."""
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
    """

    tensors: dict[str, OutputTensor]
    shards: list[Shard]
    index: dict[str, object] | None
    out_dtype: torch.dtype
    notes: list[str] = field(default_factory=list)

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
        """Names of tensors that receive LoRA deltas."""
        return [n for n, t in self.tensors.items() if t.deltas]

    def index_bytes(self) -> bytes | None:
        """The index file's bytes, as transformers writes them (``indent=2, sort_keys=True`` + newline)."""
        if self.index is None:
            return None
        return (json.dumps(self.index, indent=2, sort_keys=True) + "\n").encode("utf-8")


def base_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The base's floating dtype: ``dtype`` / ``torch_dtype`` in config.json, else the most common one.

    A bitsandbytes-quantized base gives bfloat16, the usual 16-bit form of such models.
    """
    if ckpt.quant_method is not None:
        return torch.bfloat16
    name = ckpt.config.get("dtype") or ckpt.config.get("torch_dtype")
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    if isinstance(dt, torch.dtype) and dt in (torch.float16, torch.bfloat16, torch.float32):
        return dt
    counts: dict[torch.dtype, int] = {}
    for e in ckpt.tensors.values():
        if e.dtype.torch_dtype in FLOAT_DTYPES:
            counts[e.dtype.torch_dtype] = counts.get(e.dtype.torch_dtype, 0) + e.nbytes
    return max(counts, key=lambda d: counts[d]) if counts else torch.float32


def _tied_embeddings(ckpt: Checkpoint) -> bool:
    cfg = ckpt.config
    tie = cfg.get("tie_word_embeddings")
    if tie is None and isinstance(cfg.get("text_config"), dict):
        tie = cfg["text_config"].get("tie_word_embeddings")
    return bool(tie) if tie is not None else True  # transformers' default is True


def _lora_delta(i: int, lw: LoraWeights, ckpt: Checkpoint, adapter: Adapter, arch: ArchitectureInfo, notes: list[str]) -> tuple[str, LoraDelta]:
    name = f"{lw.module}.weight"
    if name not in ckpt.tensors:
        if name in arch.tied_names:
            raise UnsupportedAdapterError(
                f"{adapter.root}: the adapter targets {lw.module}, which the base ties to its input embeddings; untying tied embeddings is not supported yet",
                path=adapter.root,
            )
        raise AdapterMismatchError(
            f"{adapter.root}: the adapter targets {lw.module}, but the base {ckpt.root} has no tensor {name}; "
            f"was it trained on another model (adapter base_model_name_or_path: {adapter.config.get('base_model_name_or_path')})?",
            path=adapter.root,
            module=lw.module,
        )
    kind = arch.kind_of(lw.module)
    if kind is None:
        transpose = bool(adapter.config.get("fan_in_fan_out", False))
        if arch.save_order is None and transpose:
            notes.append(f"{lw.module}: layer type unknown, using fan_in_fan_out={transpose} from adapter_config.json")
    elif kind is ModuleKind.CONV1D_GPT2:
        transpose = True
    elif kind is ModuleKind.LINEAR:
        transpose = False
    else:
        raise UnsupportedAdapterError(f"{adapter.root}: LoRA on {lw.module} ({kind.value} layer) is not supported yet", path=adapter.root)
    w_shape = ckpt.tensors[name].shape
    out_f, in_f = adapter.shape(lw.lora_B)[0], adapter.shape(lw.lora_A)[1]
    want = (in_f, out_f) if transpose else (out_f, in_f)
    if tuple(w_shape) != want:
        raise AdapterMismatchError(
            f"{adapter.root}: {lw.module} has lora_B {list(adapter.shape(lw.lora_B))} and lora_A {list(adapter.shape(lw.lora_A))}, "
            f"which make a {list(want)} delta, but the base weight {name} is {list(w_shape)}; the adapter belongs to another model",
            path=adapter.root,
            module=lw.module,
        )
    return name, LoraDelta(i, lw, transpose)


def build_plan(
    ckpt: Checkpoint,
    adapters: list[Adapter],
    arch: ArchitectureInfo,
    *,
    out_dtype: torch.dtype | None,
    max_shard_size: int,
    merge_into: Bnb4bitSpec | None = None,
    quantize: Bnb4bitSpec | None = None,
) -> MergePlan:
    """Decide every output tensor, its dtype, recipe and shard.

    Args:
        ckpt: the base.
        adapters: the adapters, applied in order.
        arch: architecture facts (save order, layer types, fp32 modules).
        out_dtype: floating output dtype, or None for the base's dtype.
        max_shard_size: shard limit in bytes.
        merge_into: round-trip each LoRA-targeted W0 through this 4-bit quantization first
            (the base the adapter saw when it was trained with QLoRA on a 16-bit original).
        quantize: write the Linear weights transformers would quantize as bitsandbytes 4-bit.

    Raises:
        AdapterMismatchError: an adapter targets a tensor the base lacks, shapes disagree, or
            no adapter changes anything.
        UnsupportedAdapterError: a recipe lorasave cannot produce yet.
    """
    notes: list[str] = []
    if arch.note:
        notes.append(arch.note)
    dtype = out_dtype or base_dtype(ckpt)
    fp32 = arch.fp32_pattern(dtype)
    deltas: dict[str, list[LoraDelta]] = {}
    replacements: dict[str, Replacement] = {}
    for i, ad in enumerate(adapters):
        for lw in ad.lora.values():
            name, d = _lora_delta(i, lw, ckpt, ad, arch, notes)
            deltas.setdefault(name, []).append(d)
        for name, key in ad.extra.items():
            if name not in ckpt.tensors or tuple(ckpt.tensors[name].shape) != tuple(ad.shape(key)):
                raise UnsupportedAdapterError(
                    f"{ad.root}: the adapter saves a full tensor {key} that does not fit the base "
                    f"({'missing' if name not in ckpt.tensors else list(ckpt.tensors[name].shape)}); resized or new modules are not supported yet",
                    path=ad.root,
                )
            kind = arch.kind_of(name.rsplit(".", 1)[0])
            if _tied_embeddings(ckpt) and (kind is ModuleKind.EMBEDDING or name.startswith("lm_head")):
                raise UnsupportedAdapterError(
                    f"{ad.root}: the adapter replaces {name} of a base with tied embeddings; untying is not supported yet",
                    path=ad.root,
                )
            if name in replacements:
                raise UnsupportedAdapterError(f"two adapters both replace {name}", path=ad.root)
            replacements[name] = Replacement(i, key)
    if not deltas and not replacements:
        raise AdapterMismatchError(f"the adapter{'s' if len(adapters) > 1 else ''} change nothing in the base {ckpt.root}", path=ckpt.root)
    both = set(deltas) & set(replacements)
    if both:
        raise UnsupportedAdapterError(f"{sorted(both)[0]} is both replaced and LoRA-targeted by the adapters", path=ckpt.root)

    if arch.save_order is not None:
        order = [n for n in arch.save_order if n in ckpt.tensors]
        dropped = [n for n in ckpt.tensors if n in arch.tied_names]
        if dropped:
            notes.append(f"dropped {', '.join(dropped)}: tied to another tensor in {arch.model_class}, as save_pretrained does")
        known = set(order) | set(dropped)
        rest = [n for n in ckpt.tensors if n not in known]
        if rest:
            notes.append(f"{len(rest)} tensors unknown to {arch.model_class} kept after the others (first: {rest[0]})")
        order += rest
    else:
        order = list(ckpt.tensors)

    tensors: dict[str, OutputTensor] = {}
    for name in order:
        src = ckpt.tensors[name]
        tdt = src.dtype
        if tdt.torch_dtype in FLOAT_DTYPES:
            tdt = ST_DTYPES["F32"] if fp32 is not None and fp32.search(name) else st_dtype(dtype)
        ds = tuple(deltas.get(name, ()))
        rt = merge_into if ds and isinstance(src, TensorEntry) else None
        q = quantize if quantize is not None and name.removesuffix(".weight") in arch.bnb_quantizable and name.endswith(".weight") else None
        tensors[name] = OutputTensor(name, src.shape, tdt, src, ds, replacements.get(name), rt, q)
    if merge_into is not None and ckpt.quant_method is not None:
        raise UnsupportedAdapterError(f"{ckpt.root} is already quantized; merge_into='dequantized' applies to a 16-bit base", path=ckpt.root)
    if quantize is not None:
        if any(k is ModuleKind.CONV1D_GPT2 for k in arch.module_kinds.values()):
            raise UnsupportedAdapterError("merged_4bit output of GPT-2 style Conv1D models is not supported yet", path=ckpt.root)
        if not any(t.quantize for t in tensors.values()):
            raise UnsupportedAdapterError(f"no Linear layer of {arch.model_class or ckpt.root} would be quantized; use merged_16bit", path=ckpt.root)
    shards, index = _shard(tensors, max_shard_size, arch, natural_order=arch.save_order is not None)
    return MergePlan(tensors, shards, index, dtype, notes)


def _shard(
    tensors: dict[str, OutputTensor], max_shard_size: int, arch: ArchitectureInfo, *, natural_order: bool
) -> tuple[list[Shard], dict[str, object] | None]:
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
    split = split_state_dict_into_shards_factory(
        files,
        get_storage_size=lambda spec: nbytes(*spec),
        filename_pattern=SAFE_WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"),
        max_shard_size=max_shard_size,
    )
    shards = []
    for filename, names in split.filename_to_tensors.items():
        lay = layout((n, *files[n]) for n in names)
        outputs = list(dict.fromkeys(owner[n] for n in names))
        shards.append(Shard(filename, lay, serialize_header(lay, SHARD_METADATA), outputs, deferred))
    if deferred:
        _check_whole(shards, owner)
    if not split.is_sharded:
        return shards, None
    total_params = arch.num_parameters
    if total_params is None or deferred:
        total_params = sum(_numel(t.shape) for t in tensors.values() if t.dtype.torch_dtype in FLOAT_DTYPES)
    index = {
        "metadata": {"total_parameters": total_params, **split.metadata},
        "weight_map": dict(split.tensor_to_filename),
    }
    return shards, index


def _check_whole(shards: list[Shard], owner: dict[str, str]) -> None:
    """A quantized weight's codes and statistics must land in one shard (they are produced together)."""
    seen: dict[str, str] = {}
    for shard in shards:
        for lay in shard.layouts:
            o = owner[lay.name]
            if seen.setdefault(o, shard.filename) != shard.filename:
                # the greedy split cut a weight's statistics off: move them with their weight
                raise UnsupportedAdapterError(f"max_shard_size splits the 4-bit statistics of {o} across shards; use a larger max_shard_size")


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
