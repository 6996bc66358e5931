"""Reading a PEFT LoRA adapter: folder checks, config, tensors, per-module scaling.

Layout (PEFT ``PeftModel.save_pretrained``): ``adapter_config.json`` and
``adapter_model.safetensors`` (``adapter_model.bin`` in old or ``safe_serialization=False``
saves). Keys are ``base_model.model.<module>.lora_A.weight`` with shape ``(r, in_features)`` and
``...lora_B.weight`` with shape ``(out_features, r)``.

Scaling (peft ``tuners/lora/layer.py`` ``LoraLayer.update_layer``): ``lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with ``use_rslora`` (Kalajdzievski 2023, arXiv:2312.03732), where ``r``
and ``lora_alpha`` are per module after ``rank_pattern`` / ``alpha_pattern`` resolution
(peft ``utils/other.py`` ``get_pattern_key``: the first pattern key, in dict order, for which
``re.match(rf"(.*\\.)?({key})$", module_name)`` matches).
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import TensorReader, read_json, resolve_source
from .errors import AdapterMismatchError, CheckpointFormatError, NotAnAdapterError, PickleRefusedError, UnsupportedAdapterError
from .safetensors_format import TensorEntry, read_header

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_SAFE_NAME = "adapter_model.safetensors"
ADAPTER_PICKLE_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."

#: ``init_lora_weights`` values with which PEFT mutates the base at initialisation, so the
#: adapter only fits the mutated base (peft ``tuners/lora/config.py``).
MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica", "eva", "orthogonal")

_LORA_RE = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_UNSUPPORTED_KEYS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\.lora_magnitude_vector(\.weight)?$"), "DoRA (use_dora) magnitude vectors"),
    (re.compile(r"\.lora_embedding_[AB]$"), "embedding LoRA (lora_embedding_A/B)"),
    (re.compile(r"\.lora_B\.bias$"), "lora_bias"),
    (re.compile(r"\.trainable_tokens_delta$"), "trainable tokens"),
    (re.compile(r"\.lora_E$"), "AdaLoRA"),
]


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """Resolve ``rank_pattern`` / ``alpha_pattern`` for ``module`` as PEFT's ``get_pattern_key`` does."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return patterns.get(module, default)


@dataclass(frozen=True)
class LoraWeights:
    """The LoRA pair of one targeted module.

    Attributes:
        module: module name in the base model, e.g. ``model.layers.0.self_attn.q_proj``.
        lora_A: key of A, shape ``(r, in_features)``.
        lora_B: key of B, shape ``(out_features, r)``.
        r: rank (rows of A).
        lora_alpha: alpha after ``alpha_pattern``.
        scaling: ``lora_alpha / r`` or ``lora_alpha / sqrt(r)`` (rsLoRA).
    """

    module: str
    lora_A: str
    lora_B: str
    r: int
    lora_alpha: float
    scaling: float


@dataclass
class Adapter:
    """A PEFT LoRA adapter on disk.

    Attributes:
        root: its folder.
        config: parsed ``adapter_config.json``.
        weights_file: ``adapter_model.safetensors`` (or ``.bin`` when pickle was allowed).
        entries: safetensors entries by full key (empty for a pickle file).
        loaded: tensors by full key, for a pickle file (empty for safetensors).
        lora: LoRA pairs by base module name, in file order.
        extra: non-LoRA keys (``modules_to_save`` copies, trained biases) by base tensor name.
    """

    root: Path
    config: dict[str, Any]
    weights_file: Path
    entries: dict[str, TensorEntry] = field(default_factory=dict)
    loaded: dict[str, torch.Tensor] = field(default_factory=dict)
    lora: dict[str, LoraWeights] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)

    def keys(self) -> list[str]:
        """Every tensor key in the weights file."""
        return list(self.entries or self.loaded)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of a tensor, from the header (no data read)."""
        return self.entries[key].shape if self.entries else tuple(self.loaded[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        """torch dtype of a tensor."""
        if self.entries:
            dt = self.entries[key].dtype.torch_dtype
            assert dt is not None
            return dt
        return self.loaded[key].dtype

    def tensor(self, key: str, reader: TensorReader) -> torch.Tensor:
        """Load one tensor (small: LoRA factors are ``r`` rows or columns)."""
        if self.entries:
            return reader.read(self.entries[key])
        return self.loaded[key]

    def source_files(self) -> list[Path]:
        """The files that define the adapter."""
        return [self.root / ADAPTER_CONFIG_NAME, self.weights_file]


def _find_adapters_below(root: Path) -> list[str]:
    found = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if (sub / ADAPTER_CONFIG_NAME).is_file():
            found.append(sub.name)
    return found


def _natural(name: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def locate_adapter(spec: str | os.PathLike[str]) -> Path:
    """Find the adapter folder, or explain what the given folder holds instead.

    Raises:
        SourceNotFoundError: the folder does not exist.
        NotAnAdapterError: no ``adapter_config.json``; lists named-adapter subfolders or
            Trainer ``checkpoint-N`` folders found below.
    """
    root, _ = resolve_source(spec, "adapter")
    if (root / ADAPTER_CONFIG_NAME).is_file():
        return root
    found = sorted(_find_adapters_below(root), key=_natural)
    if found:
        listing = ", ".join(str(root / f) for f in found)
        raise NotAnAdapterError(
            f"{root} has no adapter_config.json but holds adapters in subfolders: {listing}; pass one of them as ADAPTER",
            path=root,
            found=found,
        )
    if (root / "config.json").is_file():
        raise NotAnAdapterError(f"{root} is a model folder, not a PEFT adapter (no adapter_config.json); the order is BASE then ADAPTER", path=root)
    raise NotAnAdapterError(f"{root} is not a PEFT adapter: no adapter_config.json", path=root)


def _check_config(root: Path, config: dict[str, Any]) -> None:
    cfg_path = root / ADAPTER_CONFIG_NAME
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise UnsupportedAdapterError(
            f"{cfg_path}: peft_type {config.get('peft_type')!r} is not supported yet; lorasave merges LoRA adapters",
            path=cfg_path,
        )
    if config.get("layer_replication"):
        raise UnsupportedAdapterError(f"{cfg_path}: layer_replication adapters cannot be merged (PEFT refuses too)", path=cfg_path)
    if config.get("use_dora"):
        raise UnsupportedAdapterError(f"{cfg_path}: DoRA (use_dora) adapters are not supported yet", path=cfg_path)
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(MUTATING_INITS):
        raise UnsupportedAdapterError(
            f"{cfg_path}: init_lora_weights={init!r} changed the base weights during training, so this adapter only fits "
            "that modified base; re-save it with PEFT's path_initial_model_for_weight_conversion to get a plain LoRA",
            path=cfg_path,
        )
    r = config.get("r")
    if not isinstance(r, int) or r <= 0:
        raise AdapterMismatchError(f"{cfg_path}: r must be a positive integer, got {r!r}", path=cfg_path)


def load_adapter(spec: str | os.PathLike[str], *, allow_pickle: bool = False) -> Adapter:
    """Read an adapter's config and tensor table and resolve each module's LoRA pair and scaling.

    Args:
        spec: adapter folder (or a Hub id in the local cache).
        allow_pickle: accept ``adapter_model.bin``, loaded with ``torch.load(weights_only=True)``.

    Raises:
        NotAnAdapterError, SourceNotFoundError: see ``locate_adapter``.
        PickleRefusedError: only ``adapter_model.bin`` and ``allow_pickle`` is False.
        CheckpointFormatError: malformed files, or keys outside ``base_model.model.``.
        UnsupportedAdapterError: a tuner or variant lorasave does not merge yet.
        AdapterMismatchError: a LoRA factor missing its pair, r = 0, ranks disagreeing with the config.
    """
    root = locate_adapter(spec)
    config = read_json(root / ADAPTER_CONFIG_NAME)
    _check_config(root, config)
    adapter: Adapter
    if (root / ADAPTER_SAFE_NAME).is_file():
        header = read_header(root / ADAPTER_SAFE_NAME)
        adapter = Adapter(root, config, root / ADAPTER_SAFE_NAME, entries=dict(header.tensors))
    elif (root / ADAPTER_PICKLE_NAME).is_file():
        if not allow_pickle:
            raise PickleRefusedError(
                f"{root} has only {ADAPTER_PICKLE_NAME}, a pickle file that can run code when loaded; "
                "pass --allow-pickle to load it with torch.load(weights_only=True)",
                path=root / ADAPTER_PICKLE_NAME,
            )
        try:
            state = torch.load(root / ADAPTER_PICKLE_NAME, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointFormatError(f"{root / ADAPTER_PICKLE_NAME}: cannot be loaded safely ({type(e).__name__}: {e})", path=root) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointFormatError(f"{root / ADAPTER_PICKLE_NAME}: not a dict of tensors", path=root)
        adapter = Adapter(root, config, root / ADAPTER_PICKLE_NAME, loaded={k: v.contiguous() for k, v in state.items()})
    else:
        raise CheckpointFormatError(f"{root}: no {ADAPTER_SAFE_NAME}; the adapter weights are missing", path=root)
    _resolve_modules(adapter)
    return adapter


def _resolve_modules(adapter: Adapter) -> None:
    cfg = adapter.config
    path = adapter.weights_file
    pairs: dict[str, dict[str, str]] = {}
    for key in adapter.keys():
        if not key.startswith(KEY_PREFIX):
            raise CheckpointFormatError(f"{path}: key {key!r} does not start with {KEY_PREFIX!r}; not a PEFT adapter file", path=path)
        name = key[len(KEY_PREFIX) :]
        for pat, what in _UNSUPPORTED_KEYS:
            if pat.search(name):
                raise UnsupportedAdapterError(f"{path}: the adapter uses {what} ({key}), which lorasave does not merge yet", path=path)
        m = _LORA_RE.match(name)
        if m:
            pairs.setdefault(m["module"], {})[m["part"]] = key
        else:
            adapter.extra[name.replace(".base_layer.", ".")] = key
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    for module, parts in pairs.items():
        if set(parts) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(parts)).pop()
            raise AdapterMismatchError(f"{path}: module {module} has no {missing}; the adapter file is incomplete", path=path, module=module)
        a_shape, b_shape = adapter.shape(parts["lora_A"]), adapter.shape(parts["lora_B"])
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise AdapterMismatchError(
                f"{path}: module {module} has lora_A {list(a_shape)} and lora_B {list(b_shape)}, which do not multiply (expected (r, in) and (out, r))",
                path=path,
                module=module,
            )
        r = a_shape[0]
        if r == 0:
            raise AdapterMismatchError(f"{path}: module {module} has rank 0", path=path, module=module)
        r_cfg = pattern_value(rank_pattern, module, cfg["r"])
        if r_cfg != r:
            raise AdapterMismatchError(
                f"{path}: module {module} has rank {r} in the file but {r_cfg} in adapter_config.json (r/rank_pattern); "
                "the config does not belong to these weights",
                path=path,
                module=module,
            )
        alpha = pattern_value(alpha_pattern, module, cfg.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        adapter.lora[module] = LoraWeights(module, parts["lora_A"], parts["lora_B"], r, alpha, scaling)
    logger.debug("adapter %s: %d LoRA modules, %d other tensors", adapter.root, len(adapter.lora), len(adapter.extra))
