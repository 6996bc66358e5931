"""From adapter modules to operations on output tensors: which tensor each factor changes, and how.

Layer types come from the architecture (``ModuleKind``), not from flags the adapter saved:
PEFT rewrites ``fan_in_fan_out`` for GPT-2 ``Conv1D`` layers, so the flag cannot be trusted.
"""

from __future__ import annotations

import math
from typing import Any

from .adapter import TOKENS_ROLE, Adapter, ModuleParts, TunerType
from .architecture import ArchitectureInfo, ModuleKind
from .errors import AdapterMismatchError, UnsupportedAdapterError
from .recipes import Axis, DoraNorm, LoraDelta, Lycoris, LycorisDelta, Operation, Scale, SetRows, VectorDelta

Shapes = dict[str, tuple[int, ...]]  # tensor name -> shape of W0 (base or adapter-provided)


def _prod(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def _missing(adapter: Adapter, module: str, name: str, arch: ArchitectureInfo) -> AdapterMismatchError:
    return AdapterMismatchError(
        f"{adapter.root}: the adapter targets {module}, but the base has no tensor {name}; was it trained on another model "
        f"(adapter base_model_name_or_path: {adapter.config.get('base_model_name_or_path')}, base: {arch.model_class or 'unknown'})? "
        "Adapters saved with transformers 4 module names for a model whose layout changed in transformers 5 are not mapped",
        path=adapter.root,
        module=module,
    )


def _lora_ops(i: int, p: ModuleParts, ad: Adapter, arch: ArchitectureInfo, shapes: Shapes, weight: float, notes: list[str]) -> dict[str, list[Operation]]:
    name = f"{p.module}.weight"
    if name not in shapes:
        raise _missing(ad, p.module, name, arch)
    w_shape = shapes[name]
    a_shape, b_shape = ad.shape(p.lora_A), ad.shape(p.lora_B)
    kind = arch.kind_of(p.module)
    embedding = "lora_embedding_A" in p.keys
    if embedding:
        transpose = True  # ΔW = (B @ A).T: A is (r, vocab), B is (dim, r)
    elif kind is ModuleKind.CONV1D_GPT2:
        transpose = True
    elif kind in (ModuleKind.LINEAR, ModuleKind.CONV, ModuleKind.EMBEDDING):
        transpose = False
    else:
        transpose = bool(ad.config.get("fan_in_fan_out", False))
        if kind is None:
            notes.append(f"{p.module}: layer type unknown, using fan_in_fan_out={transpose} from adapter_config.json")
    if kind is ModuleKind.CONV and len(a_shape) > 2:
        groups = arch.conv_groups.get(p.module, 1)
        if groups != 1:
            raise UnsupportedAdapterError(f"{ad.root}: LoRA on grouped convolution {p.module} (groups={groups}) cannot be merged (PEFT refuses too)")
        want_ok = len(w_shape) == len(a_shape) and w_shape[0] == b_shape[0] and w_shape[1:] == a_shape[1:]
    else:
        out_f, in_f = b_shape[0], a_shape[1]
        want_ok = tuple(w_shape) == ((in_f, out_f) if transpose else (out_f, in_f))
    if not want_ok:
        raise AdapterMismatchError(
            f"{ad.root}: {p.module} has lora_B {list(b_shape)} and lora_A {list(a_shape)}, which do not fit the base weight "
            f"{name} {list(w_shape)}; the adapter belongs to another model",
            path=ad.root,
            module=p.module,
        )
    ops: dict[str, list[Operation]] = {name: [LoraDelta(i, p.lora_A, p.lora_B, p.scaling, transpose, weight)]}
    if "lora_magnitude_vector" in p.keys:
        axis = Axis.COLS if transpose else Axis.ROWS
        ops[name].append(DoraNorm(i, p.keys["lora_magnitude_vector"], axis))
    if "lora_B.bias" in p.keys:
        bias = f"{p.module}.bias"
        if bias not in shapes:
            raise AdapterMismatchError(f"{ad.root}: lora_bias on {p.module}, whose base layer has no bias (PEFT refuses to merge it too)", path=ad.root)
        ops[bias] = [VectorDelta(i, p.keys["lora_B.bias"], p.scaling, weight)]
    return ops


def _lycoris_ops(i: int, p: ModuleParts, ad: Adapter, arch: ArchitectureInfo, shapes: Shapes, weight: float) -> dict[str, list[Operation]]:
    name = f"{p.module}.weight"
    if name not in shapes:
        raise _missing(ad, p.module, name, arch)
    if any(r in p.keys for r in ("hada_t1", "hada_t2", "lokr_t2")):
        raise UnsupportedAdapterError(f"{ad.root}: {p.module} uses the Tucker (CP) decomposition of LoHa/LoKr conv layers, not merged yet", path=ad.root)
    kind = Lycoris.LOHA if ad.tuner is TunerType.LOHA else Lycoris.LOKR
    if arch.kind_of(p.module) is ModuleKind.CONV1D_GPT2:
        raise UnsupportedAdapterError(f"{ad.root}: {kind.value} on GPT-2 Conv1D layers is not merged yet", path=ad.root)
    return {name: [LycorisDelta(i, kind, tuple(sorted(p.keys.items())), p.scaling, weight)]}


def _ia3_ops(i: int, p: ModuleParts, ad: Adapter, arch: ArchitectureInfo, shapes: Shapes, weight: float) -> dict[str, list[Operation]]:
    name = f"{p.module}.weight"
    if name not in shapes:
        raise _missing(ad, p.module, name, arch)
    if weight != 1.0:
        raise UnsupportedAdapterError(f"{ad.root}: IA3 scales weights multiplicatively; a combination weight other than 1 has no meaning", path=ad.root)
    if arch.kind_of(p.module) is ModuleKind.CONV1D_GPT2:
        raise UnsupportedAdapterError(f"{ad.root}: IA3 on GPT-2 Conv1D layers is not merged yet", path=ad.root)
    key = p.keys["ia3_l"]
    l_shape = ad.shape(key)
    w_shape = shapes[name]
    feedforward = l_shape[0] == 1 and _prod(l_shape) != w_shape[0]
    axis = Axis.COLS if feedforward else Axis.ROWS
    want = w_shape[1] if feedforward else w_shape[0]
    if _prod(l_shape) != want:
        raise AdapterMismatchError(f"{ad.root}: ia3_l of {p.module} has shape {list(l_shape)}, which does not fit {name} {list(w_shape)}", path=ad.root)
    ops: dict[str, list[Operation]] = {name: [Scale(i, key, axis)]}
    if not feedforward and f"{p.module}.bias" in shapes:  # the forward scales the layer's output, bias included
        ops[f"{p.module}.bias"] = [Scale(i, key, Axis.ROWS)]
    return ops


def _token_ops(i: int, p: ModuleParts, ad: Adapter, arch: ArchitectureInfo, shapes: Shapes, weight: float) -> dict[str, list[Operation]]:
    name = f"{p.module}.weight"
    if name not in shapes:
        raise _missing(ad, p.module, name, arch)
    if weight != 1.0:
        raise UnsupportedAdapterError(f"{ad.root}: trainable tokens replace rows; a combination weight other than 1 has no meaning", path=ad.root)
    key = p.keys[TOKENS_ROLE]
    indices = tuple(ad.token_indices(p.module))
    rows = shapes[name][0]
    if ad.shape(key)[0] != len(indices) or any(not 0 <= t < rows for t in indices):
        raise AdapterMismatchError(
            f"{ad.root}: trainable tokens of {p.module}: {ad.shape(key)[0]} rows saved for indices {list(indices)} of a {rows}-row embedding",
            path=ad.root,
        )
    return {name: [SetRows(i, key, indices)]}


def adapter_operations(i: int, ad: Adapter, weight: float, arch: ArchitectureInfo, shapes: Shapes, notes: list[str]) -> dict[str, list[Operation]]:
    """Every operation adapter ``i`` applies, by output tensor name.

    Args:
        i: the adapter's index.
        ad: the adapter.
        weight: its combination weight (scales additive deltas).
        arch: layer types.
        shapes: shape of W0 per tensor name (the base's, or an adapter-provided one).
        notes: receives fallbacks taken.

    Raises:
        AdapterMismatchError: a targeted tensor is missing or its shape does not fit.
        UnsupportedAdapterError: a layer/tuner combination lorasave does not merge.
    """
    out: dict[str, list[Operation]] = {}
    for p in ad.parts.values():
        if TOKENS_ROLE in p.keys:
            part = _token_ops(i, p, ad, arch, shapes, weight)
        elif ad.tuner is TunerType.LORA:
            part = _lora_ops(i, p, ad, arch, shapes, weight, notes)
        elif ad.tuner in (TunerType.LOHA, TunerType.LOKR):
            part = _lycoris_ops(i, p, ad, arch, shapes, weight)
        elif ad.tuner is TunerType.IA3:
            part = _ia3_ops(i, p, ad, arch, shapes, weight)
        else:  # pragma: no cover - _check_config admits no other tuner
            raise UnsupportedAdapterError(f"{ad.root}: {ad.tuner.value} modules are not merged")
        for name, ops in part.items():
            out.setdefault(name, []).extend(ops)
    return out


def describe_ops(ops: list[Any]) -> str:
    """Short human form, for notes and errors."""
    return ", ".join(type(o).__name__ for o in ops)
