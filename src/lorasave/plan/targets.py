"""From adapter modules to operations on output tensors: which tensor each factor changes, and how.

Layer types come from the architecture (``ModuleKind``), not from flags the adapter saved:
PEFT rewrites ``fan_in_fan_out`` for GPT-2 ``Conv1D`` layers, so the flag cannot be trusted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from lorasave.errors import AdapterMismatchError, UnsupportedAdapterError
from lorasave.plan.recipes import Axis, DoraNorm, ExpertDelta, LoraDelta, Lycoris, LycorisDelta, Operation, Scale, SetRows, VectorDelta
from lorasave.sources.adapter import TOKENS_ROLE, Adapter, ModuleParts, TunerType
from lorasave.sources.architecture import ArchitectureInfo, ModuleKind

Shapes = dict[str, tuple[int, ...]]  # tensor name -> shape of W0 (base or adapter-provided)
ParamMap = Callable[[str, tuple[int, ...]], list[str]]  # runtime parameter -> checkpoint tensor names


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


def _weight_name(p: ModuleParts, ad: Adapter, arch: ArchitectureInfo, shapes: Shapes) -> str:
    """``<module>.weight``, the base tensor an adapter module changes.

    Raises:
        AdapterMismatchError: the base has no such tensor (``_missing``).
    """
    name = f"{p.module}.weight"
    if name not in shapes:
        raise _missing(ad, p.module, name, arch)
    return name


def _require_unit_weight(ad: Adapter, weight: float, why: str) -> None:
    """Refuse a combination weight other than 1 for a tuner that does not add a delta (``why`` says what it does)."""
    if weight != 1.0:
        raise UnsupportedAdapterError(f"{ad.root}: {why}; a combination weight other than 1 has no meaning", path=ad.root)


def _lora_ops(i: int, p: ModuleParts, ad: Adapter, arch: ArchitectureInfo, shapes: Shapes, weight: float, notes: list[str]) -> dict[str, list[Operation]]:
    name = _weight_name(p, ad, arch, shapes)
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
    name = _weight_name(p, ad, arch, shapes)
    if any(r in p.keys for r in ("hada_t1", "hada_t2", "lokr_t2")):
        raise UnsupportedAdapterError(f"{ad.root}: {p.module} uses the Tucker (CP) decomposition of LoHa/LoKr conv layers, not merged yet", path=ad.root)
    kind = Lycoris.LOHA if ad.tuner is TunerType.LOHA else Lycoris.LOKR
    if arch.kind_of(p.module) is ModuleKind.CONV1D_GPT2:
        raise UnsupportedAdapterError(f"{ad.root}: {kind.value} on GPT-2 Conv1D layers is not merged yet", path=ad.root)
    return {name: [LycorisDelta(i, kind, tuple(sorted(p.keys.items())), p.scaling, weight)]}


def _ia3_ops(i: int, p: ModuleParts, ad: Adapter, arch: ArchitectureInfo, shapes: Shapes, weight: float) -> dict[str, list[Operation]]:
    name = _weight_name(p, ad, arch, shapes)
    _require_unit_weight(ad, weight, "IA3 scales weights multiplicatively")
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
    name = _weight_name(p, ad, arch, shapes)
    _require_unit_weight(ad, weight, "trainable tokens replace rows")
    key = p.keys[TOKENS_ROLE]
    indices = tuple(ad.token_indices(p.module))
    rows = shapes[name][0]
    if ad.shape(key)[0] != len(indices) or any(not 0 <= t < rows for t in indices):
        raise AdapterMismatchError(
            f"{ad.root}: trainable tokens of {p.module}: {ad.shape(key)[0]} rows saved for indices {list(indices)} of a {rows}-row embedding",
            path=ad.root,
        )
    return {name: [SetRows(i, key, indices)]}


def _fits(arch: ArchitectureInfo, name: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> bool:
    shape, transposed = arch.params3d[name]
    experts = shape[0]
    in_f, out_f = (shape[1], shape[2]) if transposed else (shape[2], shape[1])
    return len(a_shape) == 2 and a_shape[1] == in_f and a_shape[0] % experts == 0 and b_shape[0] == out_f and b_shape[1] == a_shape[0]


def _param_target(ad: Adapter, p: ModuleParts, arch: ArchitectureInfo) -> tuple[str, str] | None:
    """For LoRA on runtime parameters (``target_parameters``): ``(module, parameter)`` of a saved module path.

    PEFT nests one ``ParamWrapper`` per targeted parameter of a module (saved under ``<module>``
    plus one ``.base_layer`` per nesting level), in an order ``adapter_config.json`` does not keep,
    so the parameter is recognised by its shape against the factors' shapes.
    """
    targets = ad.config.get("target_parameters") or []
    if not targets or not p.is_lora:
        return None
    module = p.module
    while module.endswith(".base_layer"):
        module = module[: -len(".base_layer")]
    params = [t.rsplit(".", 1)[1] for t in targets if "." in t and (module == t.rsplit(".", 1)[0] or module.endswith("." + t.rsplit(".", 1)[0]))]
    params += [t for t in targets if "." not in t]
    a_shape, b_shape = ad.shape(p.lora_A), ad.shape(p.lora_B)
    fitting = [q for q in dict.fromkeys(params) if f"{module}.{q}" in arch.params3d and _fits(arch, f"{module}.{q}", a_shape, b_shape)]
    if len(fitting) != 1:
        if params:
            raise AdapterMismatchError(
                f"{ad.root}: LoRA factors {list(a_shape)} / {list(b_shape)} under {p.module} fit {len(fitting)} of the targeted "
                f"parameters {params}; cannot tell which one they belong to",
                path=ad.root,
            )
        return None
    return module, fitting[0]


def _param_ops(
    i: int, p: ModuleParts, ad: Adapter, arch: ArchitectureInfo, weight: float, module: str, param: str, param_map: ParamMap | None
) -> dict[str, list[Operation]]:
    name = f"{module}.{param}"
    if name not in arch.params3d or param_map is None:
        raise _missing(ad, p.module, name, arch)
    shape, transposed = arch.params3d[name]
    experts = shape[0]
    a_shape, b_shape = ad.shape(p.lora_A), ad.shape(p.lora_B)
    in_f, out_f = (shape[1], shape[2]) if transposed else (shape[2], shape[1])
    if a_shape != (experts * (a_shape[0] // experts), in_f) or b_shape[0] != out_f or a_shape[0] % experts:
        raise AdapterMismatchError(
            f"{ad.root}: LoRA on {name} has lora_A {list(a_shape)} and lora_B {list(b_shape)}, which do not fit the parameter {shape}",
            path=ad.root,
        )
    out: dict[str, list[Operation]] = {}
    for target in param_map(name, tuple(shape)):
        out[target] = [ExpertDelta(i, p.lora_A, p.lora_B, p.scaling, name, tuple(shape), transposed, target, weight)]
    return out


def adapter_operations(
    i: int,
    ad: Adapter,
    weight: float,
    arch: ArchitectureInfo,
    shapes: Shapes,
    notes: list[str],
    param_map: ParamMap | None = None,
    renames: dict[str, str] | None = None,
) -> dict[str, list[Operation]]:
    """Every operation adapter ``i`` applies, by output tensor name.

    Args:
        i: the adapter's index.
        ad: the adapter.
        weight: its combination weight (scales additive deltas).
        arch: layer types.
        shapes: shape of W0 per tensor name (the base's, or an adapter-provided one).
        notes: receives fallbacks taken.
        param_map: runtime parameter name and shape -> the checkpoint tensors it is stored as
            (transformers' reverse weight conversion), for ``target_parameters`` adapters.
        renames: runtime tensor name -> the checkpoint's name for it (:func:`runtime_renames`:
            ``model.language_model.layers.0...`` saved as ``language_model.model.layers.0...``).

    Raises:
        AdapterMismatchError: a targeted tensor is missing or its shape does not fit.
        UnsupportedAdapterError: a layer/tuner combination lorasave does not merge.
    """
    renames = renames or {}
    shapes = {**shapes, **{r: shapes[c] for r, c in renames.items() if c in shapes and r not in shapes}}
    out: dict[str, list[Operation]] = {}
    for p in ad.parts.values():
        target = _param_target(ad, p, arch) if f"{p.module}.weight" not in shapes else None
        if target is not None:
            if "lora_magnitude_vector" in p.keys:
                raise UnsupportedAdapterError(f"{ad.root}: DoRA on runtime parameters is not defined (PEFT refuses it too)", path=ad.root)
            part = _param_ops(i, p, ad, arch, weight, *target, param_map)
        elif TOKENS_ROLE in p.keys:
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
            out.setdefault(renames.get(name, name), []).extend(ops)
    return out


def runtime_renames(adapters: list[Adapter], shapes: Shapes, revert: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, str]:
    """Checkpoint names of the adapters' target tensors that the base stores under another name.

    PEFT saves module paths of the loaded (runtime) model; transformers 5 saves some models in
    their checkpoint layout (``Gemma3ForConditionalGeneration``: runtime ``model.language_model.*``
    is ``language_model.model.*`` on disk). ``revert`` is transformers' reverse weight conversion
    (``sources.architecture.revert_to_checkpoint``) applied to ``{runtime name: meta tensor}``.

    Returns:
        ``{runtime name: checkpoint name}`` for the ``<module>.weight`` / ``.bias`` the base lacks and
        whose reverted name it has; empty when every target is found as it is.
    """
    import torch

    wanted = [f"{p.module}.{s}" for ad in adapters for p in ad.parts.values() for s in ("weight", "bias")]
    missing = [n for n in dict.fromkeys(wanted) if n not in shapes]
    out = {}
    for name in missing:
        try:  # transformers builds regexes from the name: a hostile module name is simply not renamed
            reverted = list(revert({name: torch.empty(0, device="meta")}))
        except (re.error, ValueError, KeyError, TypeError):
            continue
        if len(reverted) == 1 and reverted[0] in shapes:
            out[name] = reverted[0]
    return out


def describe_ops(ops: list[Any]) -> str:
    """Short human form, for notes and errors."""
    return ", ".join(type(o).__name__ for o in ops)
