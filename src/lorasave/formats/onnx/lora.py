"""LoRA as inputs of the ONNX decoder: which Linears take them, and a PEFT adapter's values for them.

The graph side (``formats.onnx.graph``): every Linear whose projection name is chosen with
``--lora-inputs`` computes ``y + (x @ A) @ B`` where ``A = <module>.lora_A.weight`` (in, lora_r) and
``B = <module>.lora_B.weight`` (lora_r, out) are graph inputs with zero-rank default initializers.
These are the names and layout Olive writes (``ExtractAdapters`` with ``make_inputs``, and its
``convert-adapters`` command for a PEFT folder): the PEFT key ``base_model.model.<module>.lora_A.weight``
becomes ``<module>.lora_A.weight``, each factor is transposed, and the module's PEFT scaling
(``alpha / r``, ``alpha / sqrt(r)`` with rsLoRA, after ``rank_pattern`` / ``alpha_pattern``) is folded
into B in float32, as onnxruntime-genai's builder does (``make_matmul_lora``)::

    A_onnx = A.T                      (in, r)
    B_onnx = (scaling * B).T          (r, out)      so  x @ A_onnx @ B_onnx == scaling * B(A(x))

A graph with LoRA inputs therefore serves adapters of any rank and alpha; onnxruntime-genai feeds
the active adapter's tensors by name and an inactive one's as empty (rank 0) tensors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorasave.errors import AdapterMismatchError, InvalidOptionError, UnsupportedAdapterError
from lorasave.formats.onnx.graph import LORA_SUFFIXES, lora_input_names
from lorasave.formats.onnx.spec import PROJECTIONS
from lorasave.sources.adapter import Adapter, load_adapter
from lorasave.sources.checkpoint import Checkpoint, TensorReader

PathLike = str | os.PathLike[str]

#: What every refusal of an adapter ends with.
MERGED_HINT = "merge it into the graph instead with `lorasave onnx BASE ADAPTER`"
#: The ``--lora-inputs`` value that takes every projection of the family.
ALL_LINEAR = "all-linear"


def parse_lora_inputs(values: PathLike | Sequence[PathLike] | None, family: str, model_type: str, *, allow_pickle: bool = False) -> tuple[str, ...]:
    """The projections that take LoRA inputs, in the family's order.

    Args:
        values: projection names (``q_proj``; several in one item with commas), ``all-linear``, or
            PEFT adapter folders (their LoRA modules' projection names); None or [] for none.
        family, model_type: the architecture (``spec.PROJECTIONS[family]`` are its Linears).
        allow_pickle: accept an adapter folder with ``adapter_model.bin``.

    Raises:
        InvalidOptionError: a name that is not one of the family's projections.
        UnsupportedAdapterError: an adapter folder adapting something else (embeddings, lm_head).
    """
    if values is None:
        return ()
    items = [values] if isinstance(values, (str, os.PathLike)) else list(values)
    allowed = PROJECTIONS[family]
    chosen: set[str] = set()
    for item in items:
        if isinstance(item, os.PathLike) or Path(str(item)).is_dir():
            ad = load_adapter(item, allow_pickle=allow_pickle)
            names = {p.module.rsplit(".", 1)[-1] for p in ad.lora.values()}
            other = sorted(names - set(allowed))
            if other or not names:
                what = f"LoRA on {', '.join(other)}" if other else "no LoRA module"
                raise UnsupportedAdapterError(f"{ad.root}: {what}; the {model_type} graph takes LoRA inputs on {', '.join(allowed)}", path=ad.root)
            chosen |= names
            continue
        for name in (n.strip() for n in str(item).split(",")):
            if name == ALL_LINEAR:
                chosen |= set(allowed)
            elif name in allowed:
                chosen.add(name)
            elif name:
                raise InvalidOptionError(
                    f"--lora-inputs {name!r}: the {model_type} graph's Linears are {', '.join(allowed)} (or {ALL_LINEAR}, or a PEFT adapter folder)"
                )
    if items and not chosen:
        raise InvalidOptionError(f"--lora-inputs names no projection; give some of {', '.join(allowed)}, or {ALL_LINEAR}")
    return tuple(p for p in allowed if p in chosen)


@dataclass(frozen=True)
class LoraPair:
    """One adapted Linear: the PEFT keys of its factors and the graph inputs they fill.

    Attributes:
        module: the module name (``model.layers.0.self_attn.q_proj``).
        lora_A, lora_B: adapter keys of A (r, in) and B (out, r).
        rank: r.
        scaling: PEFT's scaling of the module, folded into B.
        in_features, out_features: the base Linear's sizes.
    """

    module: str
    lora_A: str
    lora_B: str
    rank: int
    scaling: float
    in_features: int
    out_features: int

    @property
    def names(self) -> tuple[str, str]:
        """The graph inputs ``(<module>.lora_A.weight, <module>.lora_B.weight)``."""
        return lora_input_names(self.module)


def projection_of(input_name: str) -> str:
    """``q_proj`` of ``model.layers.0.self_attn.q_proj.lora_A.weight``."""
    return input_name.rsplit(".", 2)[0].rsplit(".", 1)[-1]


def refuse(adapter: Adapter, what: str) -> UnsupportedAdapterError:
    """The one-line refusal of what an ONNX LoRA adapter cannot hold."""
    return UnsupportedAdapterError(f"{adapter.root}: {what}, which an ONNX LoRA adapter cannot express; {MERGED_HINT}", path=adapter.root)


def adapter_pairs(adapter: Adapter, ckpt: Checkpoint, family: str) -> list[LoraPair]:
    """Every LoRA module of ``adapter`` as a :class:`LoraPair`, checked against the base checkpoint.

    Raises:
        UnsupportedAdapterError: what the format cannot express (``gguf.adapter.check_expressible``'s
            list: DoRA, ``modules_to_save``, new tokens, ``lora_bias``, non-LoRA tuners...), a
            ``fan_in_fan_out`` LoRA, a LoRA on the embeddings, lm_head or another module that is not
            one of the family's projections.
        AdapterMismatchError: a module the base lacks, or factors whose shapes do not fit it.
    """
    from lorasave.formats.gguf.adapter import check_expressible

    check_expressible(adapter, ckpt, refuse=refuse)
    if adapter.config.get("fan_in_fan_out"):
        raise refuse(adapter, "fan_in_fan_out stores transposed (Conv1D) LoRA factors")
    allowed = PROJECTIONS[family]
    pairs = []
    for part in adapter.lora.values():
        if "lora_embedding_A" in part.keys:
            raise refuse(adapter, f"{part.module} is an embedding LoRA (the graph's embeddings take no LoRA input)")
        if part.module.rsplit(".", 1)[-1] not in allowed:
            raise refuse(adapter, f"it adapts {part.module} (the graph takes LoRA inputs on {', '.join(allowed)})")
        entry = ckpt.tensors.get(part.module + ".weight")
        if entry is None:
            raise AdapterMismatchError(f"{adapter.root}: {part.module} is not a module of the base {ckpt.root}", path=adapter.root, module=part.module)
        out_f, in_f = (int(d) for d in entry.shape)
        assert part.r is not None
        a_shape, b_shape = tuple(adapter.shape(part.lora_A)), tuple(adapter.shape(part.lora_B))
        if a_shape != (part.r, in_f) or b_shape != (out_f, part.r):
            raise AdapterMismatchError(
                f"{adapter.root}: {part.module} has lora_A {list(a_shape)} and lora_B {list(b_shape)}; the base's ({out_f}, {in_f}) weight needs "
                f"({part.r}, {in_f}) and ({out_f}, {part.r})",
                path=adapter.root,
                module=part.module,
            )
        pairs.append(LoraPair(part.module, part.lora_A, part.lora_B, part.r, float(part.scaling), in_f, out_f))
    if not pairs:
        raise refuse(adapter, "it has no LoRA module")
    return pairs


def pair_arrays(pair: LoraPair, adapter: Adapter, reader: TensorReader, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """``(A.T, (scaling * B).T)`` of one pair in ``dtype``, the product computed in float32."""
    a = adapter.tensor(pair.lora_A, reader).to(torch.float32)
    b = adapter.tensor(pair.lora_B, reader).to(torch.float32) * torch.tensor(pair.scaling, dtype=torch.float32)
    return a.T.contiguous().numpy().astype(dtype), b.T.contiguous().numpy().astype(dtype)


def graph_lora_inputs(model_path: Path) -> dict[str, tuple[np.dtype, tuple[int | str, ...]]]:
    """The LoRA inputs of an ONNX graph (names ending ``.lora_A.weight`` / ``.lora_B.weight``): ``{name: (numpy dtype, dims)}``."""
    import onnx
    from onnx import helper

    model = onnx.load(str(model_path), load_external_data=False)
    found: dict[str, tuple[np.dtype, tuple[int | str, ...]]] = {}
    for i in model.graph.input:
        if i.name.endswith(LORA_SUFFIXES):
            t = i.type.tensor_type
            dims = tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim)
            found[i.name] = (np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)), dims)
    return found


def adapter_run_options(path: Path) -> tuple[Any, Any]:
    """``(RunOptions, LoraAdapter)``: onnxruntime's own multi-LoRA API with the ``.onnx_adapter`` at ``path`` active.

    Keep the adapter alive as long as the options are used.
    """
    import onnxruntime as ort

    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    return options, adapter
