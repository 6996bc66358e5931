"""Reading a PEFT LoRA adapter: folder checks, config, tensors, per-module scaling.

Layout (PEFT ``PeftModel.save_pretrained``): ``adapter_config.json`` and
``adapter_model.safetensors`` (``adapter_model.bin`` in old or ``safe_serialization=False``
saves). Keys are ``base_model.model.<module>.lora_A.weight`` with shape ``(r, in_features)`` and
``...lora_B.weight`` with shape ``(out_features, r)``.

Scaling (peft ``tuners/lora/layer.py`` ``LoraLayer.update_layer``): ``lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with ``use_rslora`` (Kalajdzievski 2023, arXiv:2312.03732), where ``r``
and ``lora_alpha`` are per module after ``rank_pattern`` / ``alpha_pattern`` resolution
(peft ``utils/other.py`` ``get_pattern_key``: the first pattern key, in dict order, for which
``re.match(rf"(.*\\.)?({key})$", module_name)`` matches; matched with bounded work, see ``patterns``).
"""

from __future__ import annotations

import enum
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorasave.errors import AdapterMismatchError, CheckpointFormatError, InvalidOptionError, NotAnAdapterError, PickleRefusedError, UnsupportedAdapterError
from lorasave.formats.safetensors.header import TensorEntry, read_header
from lorasave.plan.patterns import pattern_keys, pattern_rules, pattern_value, validate
from lorasave.sources.checkpoint import TensorReader, resolve_source
from lorasave.util.jsonio import read_json
from lorasave.util.paths import check_inside

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_SAFE_NAME = "adapter_model.safetensors"
ADAPTER_PICKLE_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."

#: ``init_lora_weights`` values with which PEFT mutates the base at initialisation, so the
#: adapter only fits the mutated base (peft ``tuners/lora/config.py``).
MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica", "eva", "orthogonal")


class TunerType(enum.Enum):
    """PEFT tuner types (``peft_type`` in adapter_config.json) lorasave merges."""

    LORA = "LORA"
    LOHA = "LOHA"
    LOKR = "LOKR"
    IA3 = "IA3"
    TRAINABLE_TOKENS = "TRAINABLE_TOKENS"


#: Tuners with a merge PEFT defines but lorasave does not implement, and why.
REFUSED_TUNERS = {
    "VERA": "VeRA (shared random projections) is not merged yet",
    "ADALORA": "AdaLoRA is not merged yet (its rank budget state is not saved with the adapter)",
    "OFT": "OFT (multiplicative orthogonal updates) is not merged yet",
    "BOFT": "BOFT (multiplicative orthogonal updates) is not merged yet",
}
#: Tuners that have no weights to merge at all.
UNMERGEABLE_TUNERS = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT", "POLY", "XLORA", "CPT", "CARTRIDGE")

#: Per-module factor names by tuner; ``.weight`` suffixes are stripped before matching.
_ROLES = {
    TunerType.LORA: ("lora_A", "lora_B", "lora_B.bias", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"),
    TunerType.LOHA: ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    TunerType.LOKR: ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    TunerType.IA3: ("ia3_l",),
    TunerType.TRAINABLE_TOKENS: (),
}
TOKENS_ROLE = "token_adapter.trainable_tokens_delta"
_UNSUPPORTED_KEYS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\.lora_E$"), "AdaLoRA"),
    (re.compile(r"\.vera_lambda_[bd]$"), "VeRA"),
    (re.compile(r"\.oft_[Rs]"), "OFT"),
]


@dataclass(frozen=True)
class ModuleParts:
    """One adapted module: its factor keys and scaling.

    Attributes:
        module: module name in the base model, e.g. ``model.layers.0.self_attn.q_proj``.
        keys: full tensor key by role: ``lora_A`` ``(r, in)`` (conv: ``(r, in, *k)``), ``lora_B``
            ``(out, r)``, ``lora_B.bias`` ``(out,)``, ``lora_embedding_A`` ``(r, vocab)``,
            ``lora_embedding_B`` ``(dim, r)``, ``lora_magnitude_vector`` (DoRA), LoHa ``hada_*``,
            LoKr ``lokr_*``, IA3 ``ia3_l``, trainable tokens ``token_adapter.trainable_tokens_delta``.
        r: rank (LoRA: rows of A; LoHa/LoKr: from the config), None for IA3 / trainable tokens.
        alpha: ``lora_alpha`` / ``alpha`` after ``alpha_pattern``.
        scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA; 1.0 where it does not apply.
    """

    module: str
    keys: dict[str, str]
    r: int | None
    alpha: float
    scaling: float

    @property
    def lora_A(self) -> str:
        """Key of the A factor (``lora_A`` or ``lora_embedding_A``)."""
        return self.keys.get("lora_A") or self.keys["lora_embedding_A"]

    @property
    def lora_B(self) -> str:
        """Key of the B factor (``lora_B`` or ``lora_embedding_B``)."""
        return self.keys.get("lora_B") or self.keys["lora_embedding_B"]

    @property
    def is_lora(self) -> bool:
        """Has a LoRA pair."""
        return ("lora_A" in self.keys and "lora_B" in self.keys) or "lora_embedding_A" in self.keys


# kept for callers that name the LoRA pair type
LoraWeights = ModuleParts


@dataclass
class Adapter:
    """A PEFT LoRA adapter on disk.

    Attributes:
        root: its folder.
        config: parsed ``adapter_config.json``.
        weights_file: ``adapter_model.safetensors`` (or ``.bin`` when pickle was allowed).
        entries: safetensors entries by full key (empty for a pickle file).
        loaded: tensors by full key, for a pickle file (empty for safetensors).
        tuner: the PEFT tuner type.
        parts: adapted modules by base module name, in file order.
        extra: full tensors (``modules_to_save`` copies, ``base_layer`` weights saved with
            ``save_embedding_layers``, trained biases) by base tensor name.
    """

    root: Path
    config: dict[str, Any]
    weights_file: Path
    entries: dict[str, TensorEntry] = field(default_factory=dict)
    loaded: dict[str, torch.Tensor] = field(default_factory=dict)
    tuner: TunerType = TunerType.LORA
    parts: dict[str, ModuleParts] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def lora(self) -> dict[str, ModuleParts]:
        """Modules with a LoRA pair."""
        return {m: p for m, p in self.parts.items() if p.is_lora}

    @property
    def uses_dora(self) -> bool:
        """Whether any module has a DoRA magnitude vector."""
        return any("lora_magnitude_vector" in p.keys for p in self.parts.values())

    def token_indices(self, module: str) -> list[int]:
        """``trainable_token_indices`` (LoRA) / ``token_indices`` (TRAINABLE_TOKENS) for ``module``.

        Raises:
            AdapterMismatchError: the config lists no indices for it.
        """
        spec = self.config.get("trainable_token_indices")
        if spec is None:
            spec = self.config.get("token_indices")
        if isinstance(spec, dict):
            for key, ids in spec.items():
                if module == key or module.endswith("." + key):
                    return list(ids)
            spec = None
        if spec is None:
            raise AdapterMismatchError(f"{self.root}: trainable tokens for {module} but no token indices in adapter_config.json", path=self.root)
        return list(spec)

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
        raise NotAnAdapterError(
            f"{root} is a model folder, not a PEFT adapter (no adapter_config.json); give the adapter folder (lorasave COMMAND takes BASE, then ADAPTER)",
            path=root,
        )
    raise NotAnAdapterError(f"{root} is not a PEFT adapter: no adapter_config.json; give the folder PeftModel.save_pretrained wrote", path=root)


def _check_config(root: Path, config: dict[str, Any]) -> TunerType:
    cfg_path = root / ADAPTER_CONFIG_NAME
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type in REFUSED_TUNERS:
        raise UnsupportedAdapterError(f"{cfg_path}: peft_type {peft_type}: {REFUSED_TUNERS[peft_type]}", path=cfg_path)
    if peft_type in UNMERGEABLE_TUNERS:
        raise UnsupportedAdapterError(
            f"{cfg_path}: peft_type {peft_type} adds virtual tokens or a routing module, not weight updates; it cannot be merged",
            path=cfg_path,
        )
    try:
        tuner = TunerType(peft_type)
    except ValueError:
        raise UnsupportedAdapterError(
            f"{cfg_path}: peft_type {config.get('peft_type')!r} is not supported; lorasave merges LORA, LOHA, LOKR, IA3 and TRAINABLE_TOKENS",
            path=cfg_path,
        ) from None
    if config.get("layer_replication"):
        raise UnsupportedAdapterError(f"{cfg_path}: layer_replication adapters cannot be merged (PEFT refuses too)", path=cfg_path)
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(MUTATING_INITS):
        raise UnsupportedAdapterError(
            f"{cfg_path}: init_lora_weights={init!r} changed the base weights during training, so this adapter only fits "
            "that modified base; re-save it with PEFT's path_initial_model_for_weight_conversion to get a plain LoRA",
            path=cfg_path,
        )
    if tuner in (TunerType.LORA, TunerType.LOHA, TunerType.LOKR):
        r = config.get("r")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise AdapterMismatchError(f"{cfg_path}: r must be a positive integer, got {r!r}", path=cfg_path)
    for name in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(name) or {}
        if not isinstance(patterns, dict):
            raise AdapterMismatchError(f"{cfg_path}: {name} must be a JSON object mapping module patterns to numbers, got {patterns!r}", path=cfg_path)
        for key, value in patterns.items():
            if name == "rank_pattern" and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise AdapterMismatchError(f"{cfg_path}: rank_pattern gives {key!r} the rank {value!r}; ranks must be positive integers", path=cfg_path)
        for rule in pattern_rules(name, patterns):
            validate(rule, cfg_path)
    return tuner


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
        PatternError: a ``rank_pattern`` / ``alpha_pattern`` key invalid or too long.
        PatternTimeoutError: a key whose matching (Python ``re``, no RE2 form) exceeds ``patterns.BUDGET_S``.
        UnsafePathError: the config or weights file is a symlink leaving the folder (rule in ``paths``).
    """
    root = locate_adapter(spec)
    config = read_json(check_inside(root / ADAPTER_CONFIG_NAME, root))
    tuner = _check_config(root, config)
    adapter: Adapter
    if (root / ADAPTER_SAFE_NAME).is_file():
        header = read_header(check_inside(root / ADAPTER_SAFE_NAME, root))
        adapter = Adapter(root, config, root / ADAPTER_SAFE_NAME, entries=dict(header.tensors), tuner=tuner)
    elif (root / ADAPTER_PICKLE_NAME).is_file():
        if not allow_pickle:
            raise PickleRefusedError(
                f"{root} has only {ADAPTER_PICKLE_NAME}, a pickle file that can run code when loaded; "
                "pass --allow-pickle to load it with torch.load(weights_only=True)",
                path=root / ADAPTER_PICKLE_NAME,
            )
        try:
            state = torch.load(check_inside(root / ADAPTER_PICKLE_NAME, root), map_location="cpu", weights_only=True)
        except Exception as e:
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
            raise CheckpointFormatError(
                f"{root / ADAPTER_PICKLE_NAME}: cannot be loaded safely ({type(e).__name__}: {first}); re-save the adapter as safetensors",
                path=root / ADAPTER_PICKLE_NAME,
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointFormatError(f"{root / ADAPTER_PICKLE_NAME}: not a dict of tensors", path=root)
        adapter = Adapter(root, config, root / ADAPTER_PICKLE_NAME, loaded={k: v.contiguous() for k, v in state.items()}, tuner=tuner)
    else:
        raise CheckpointFormatError(f"{root}: no {ADAPTER_SAFE_NAME}; the adapter weights are missing, copy or save them again", path=root)
    _resolve_modules(adapter)
    return adapter


def adapter_list(adapters: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None) -> list[str | os.PathLike[str]]:
    """One adapter path, several, or None -> a list of paths."""
    if adapters is None:
        return []
    if isinstance(adapters, (str, os.PathLike)):
        return [adapters]
    return list(adapters)


def load_adapters(specs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None, *, allow_pickle: bool = False) -> list[Adapter]:
    """``load_adapter`` for each of several adapters, refusing the same folder twice.

    ``specs`` may also be already loaded :class:`Adapter` objects (a batch job's, shared by its outputs).

    Raises:
        InvalidOptionError: an adapter folder is given twice (use a weight instead).
        Everything ``load_adapter`` raises.
    """
    if isinstance(specs, Sequence) and not isinstance(specs, str) and specs and all(isinstance(a, Adapter) for a in specs):
        ads: list[Adapter] = list(specs)  # type: ignore[arg-type]  # loaded once by a batch job, shared by its outputs
    else:
        ads = [load_adapter(a, allow_pickle=allow_pickle) for a in adapter_list(specs)]
    roots = [os.path.realpath(a.root) for a in ads]
    if len(set(roots)) != len(roots):
        raise InvalidOptionError("the same adapter is given twice; to apply it with more weight, use weights (--weights 2)")
    return ads


def _split_key(name: str, tuner: TunerType) -> tuple[str, str] | None:
    """``module.role`` -> ``(module, role)`` for a per-module factor, else None."""
    if name.endswith("." + TOKENS_ROLE):
        return name[: -len(TOKENS_ROLE) - 1], TOKENS_ROLE
    base = name.removesuffix(".weight")
    for role in sorted(_ROLES[tuner], key=len, reverse=True):
        if name.endswith("." + role):
            return name[: -len(role) - 1], role
        if base.endswith("." + role) and role != "lora_B.bias":
            return base[: -len(role) - 1], role
    return None


def _full_tensor_target(name: str) -> tuple[str, int]:
    """The base tensor a full adapter tensor stands for, and its priority (lower wins).

    With ``save_embedding_layers`` PEFT also saves a wrapper's internals: ``x.modules_to_save.weight``
    (a copy of the trained ``x.weight``) and ``x.original_module.weight`` (the untrained original);
    ``x.base_layer.weight`` is the W0 under a LoRA-wrapped layer.
    """
    for infix, rank in ((".modules_to_save.", 1), (".original_module.", 2), (".base_layer.", 0)):
        if infix in name:
            return name.replace(infix, "."), rank
    return name, 0


def _finite_number(x: object) -> bool:
    """A JSON number (not a bool) that is finite as a float (``10**400`` is not)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def _resolve_modules(adapter: Adapter) -> None:
    cfg = adapter.config
    path = adapter.weights_file
    found: dict[str, dict[str, str]] = {}
    full: dict[str, tuple[int, str]] = {}
    for key in adapter.keys():
        if not key.startswith(KEY_PREFIX):
            raise CheckpointFormatError(f"{path}: key {key!r} does not start with {KEY_PREFIX!r}; not a PEFT adapter file", path=path)
        name = key[len(KEY_PREFIX) :]
        for pat, what in _UNSUPPORTED_KEYS:
            if pat.search(name):
                raise UnsupportedAdapterError(f"{path}: the adapter uses {what} ({key}), which lorasave does not merge", path=path)
        split = _split_key(name, adapter.tuner)
        if split is not None:
            found.setdefault(split[0], {})[split[1]] = key
        else:  # a full tensor: modules_to_save copy, base_layer weight, trained bias
            target, rank = _full_tensor_target(name)
            if target not in full or rank < full[target][0]:
                full[target] = (rank, key)
    adapter.extra = {name: key for name, (_, key) in full.items()}
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    cfg_path = adapter.root / ADAPTER_CONFIG_NAME
    rank_keys = pattern_keys("rank_pattern", rank_pattern, list(found), source=cfg_path)
    alpha_keys = pattern_keys("alpha_pattern", alpha_pattern, list(found), source=cfg_path)
    alpha_default = cfg.get("lora_alpha", cfg.get("alpha", 8))
    for module, keys in found.items():
        r: int | None = None
        alpha = 1.0
        scaling = 1.0
        if adapter.tuner is TunerType.LORA and set(keys) & {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"}:
            a_role, b_role = ("lora_embedding_A", "lora_embedding_B") if "lora_embedding_A" in keys or "lora_embedding_B" in keys else ("lora_A", "lora_B")
            missing = [k for k in (a_role, b_role) if k not in keys]
            if missing:
                raise AdapterMismatchError(f"{path}: module {module} has no {missing[0]}; the adapter file is incomplete", path=path, module=module)
            a_shape, b_shape = adapter.shape(keys[a_role]), adapter.shape(keys[b_role])
            if len(a_shape) < 2 or len(b_shape) < 2 or a_shape[0] != b_shape[1]:
                raise AdapterMismatchError(
                    f"{path}: module {module} has {a_role} {list(a_shape)} and {b_role} {list(b_shape)}, which do not multiply (expected (r, in) and (out, r))",
                    path=path,
                    module=module,
                )
            r = a_shape[0]
        elif adapter.tuner in (TunerType.LOHA, TunerType.LOKR):
            r = pattern_value(rank_pattern, module, cfg["r"], rank_keys)
        if r is not None:
            if r == 0:
                raise AdapterMismatchError(f"{path}: module {module} has rank 0", path=path, module=module)
            r_cfg = pattern_value(rank_pattern, module, cfg.get("r"), rank_keys)
            if cfg.get("target_parameters") and isinstance(r_cfg, int) and r_cfg > 0 and r != r_cfg and r % r_cfg == 0:
                r = r_cfg  # LoRA on a 3-D expert parameter: A stacks r rows per expert
            if adapter.tuner is TunerType.LORA and r_cfg != r:
                raise AdapterMismatchError(
                    f"{path}: module {module} has rank {r} in the file but {r_cfg} in adapter_config.json (r/rank_pattern); "
                    "the config does not belong to these weights",
                    path=path,
                    module=module,
                )
            alpha = pattern_value(alpha_pattern, module, alpha_default, alpha_keys)
            if not _finite_number(alpha) or alpha == 0:
                raise AdapterMismatchError(
                    f"{adapter.root / ADAPTER_CONFIG_NAME}: lora_alpha (or alpha_pattern) for {module} is {alpha!r}; "
                    "it must be a non-zero number (0 would make the adapter change nothing)",
                    path=adapter.root,
                    module=module,
                )
            scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        adapter.parts[module] = ModuleParts(module, dict(keys), r, alpha, scaling)
    logger.debug("adapter %s: %d modules, %d full tensors", adapter.root, len(adapter.parts), len(adapter.extra))
