"""What transformers knows about the base's architecture, learned without weights or remote code.

The model class named in ``config.json`` is built on the meta device (no memory, no data), which
gives: the ``state_dict`` order that ``save_pretrained`` shards in (tied weights removed and
checkpoint renames reverted, as transformers 5 does in ``PreTrainedModel.save_pretrained``),
each module's layer type (``nn.Linear`` vs GPT-2 ``Conv1D`` decides whether a LoRA delta is
transposed), the modules transformers keeps in float32, and the parameter count written to
the shard index. Only classes built into transformers are used: ``trust_remote_code`` is never
set, and a ``model_type`` transformers does not know falls back to the checkpoint's own order.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import re
from dataclasses import dataclass, field, fields
from typing import Any

import torch

logger = logging.getLogger(__name__)


#: Bump when what ``build_architecture`` computes changes, so cached facts are recomputed.
CACHE_SCHEMA = 4


class ModuleKind(enum.Enum):
    """Layer types that decide how a LoRA delta is shaped."""

    LINEAR = "linear"
    CONV1D_GPT2 = "conv1d_gpt2"  # transformers.pytorch_utils.Conv1D: weight stored (in, out)
    EMBEDDING = "embedding"
    CONV = "conv"
    OTHER = "other"


@dataclass
class ArchitectureInfo:
    """Facts about the base's architecture.

    Attributes:
        model_class: name of the transformers class used, or None when none was usable.
        save_order: tensor names in the order ``save_pretrained`` writes them (tied removed),
            or None when no class was usable.
        tied_names: names present in the class's state_dict that ``save_pretrained`` drops as tied.
        module_kinds: module name -> layer type.
        keep_fp32: module-name patterns kept in float32 for fp16 outputs.
        keep_fp32_strict: module-name patterns kept in float32 for fp16 and bf16 outputs.
        num_parameters: ``model.num_parameters()``, written as ``total_parameters`` in the index.
        note: why the fallback was taken, when it was.
        bnb_quantizable: modules transformers + bitsandbytes would quantize (``replace_with_bnb_linear``
            with the default skips: ``get_keys_to_not_convert`` and the fp32 modules).
        tied_to: each tensor ``save_pretrained`` drops as tied -> the tensor it shares storage with
            (``lm_head.weight`` -> ``model.embed_tokens.weight``).
        conv_groups: ``groups`` of convolutions that have more than one.
        params3d: 3-D runtime parameters (fused MoE experts) -> (shape, ``is_transposed``): stored
            ``(experts, out, in)`` unless the module says ``is_transposed`` (then ``(experts, in, out)``).
    """

    model_class: str | None = None
    save_order: list[str] | None = None
    tied_names: set[str] = field(default_factory=set)
    module_kinds: dict[str, ModuleKind] = field(default_factory=dict)
    keep_fp32: set[str] = field(default_factory=set)
    keep_fp32_strict: set[str] = field(default_factory=set)
    num_parameters: int | None = None
    note: str | None = None
    bnb_quantizable: set[str] = field(default_factory=set)
    tied_to: dict[str, str] = field(default_factory=dict)
    conv_groups: dict[str, int] = field(default_factory=dict)
    params3d: dict[str, tuple[list[int], bool]] = field(default_factory=dict)

    def kind_of(self, module: str) -> ModuleKind | None:
        """The layer type of ``module``, or None when the class is unknown or has no such module."""
        return self.module_kinds.get(module)

    def fp32_pattern(self, out_dtype: torch.dtype) -> re.Pattern[str] | None:
        """Regex of tensor names transformers keeps in float32 when loading in ``out_dtype``.

        Mirrors ``PreTrainedModel._get_dtype_plan``: ``_keep_in_fp32_modules`` applies to
        float16 only, ``_keep_in_fp32_modules_strict`` to float16 and bfloat16; names are
        matched with ``re.search`` as transformers' ``build_glob_alternation`` does.
        """
        pats: set[str] = set()
        if out_dtype == torch.float16:
            pats |= self.keep_fp32
        if out_dtype in (torch.float16, torch.bfloat16):
            pats |= self.keep_fp32_strict
        if not pats:
            return None
        return re.compile("|".join(f"(?:{p})" for p in sorted(pats)))

    def to_json(self) -> dict[str, Any]:
        """JSON form, for the cache."""
        d = dict(vars(self))
        d["tied_names"] = sorted(self.tied_names)
        d["keep_fp32"] = sorted(self.keep_fp32)
        d["keep_fp32_strict"] = sorted(self.keep_fp32_strict)
        d["bnb_quantizable"] = sorted(self.bnb_quantizable)
        d["tied_to"] = dict(self.tied_to)
        d["conv_groups"] = dict(self.conv_groups)
        d["params3d"] = dict(self.params3d)
        d["module_kinds"] = {k: v.value for k, v in self.module_kinds.items()}
        return d

    @classmethod
    def from_json(cls, d: Any) -> ArchitectureInfo:
        """Inverse of ``to_json``, checking every field's type (the cache file may be anything).

        Raises:
            ValueError: ``d`` is not what ``to_json`` writes (a missing or extra field, a wrong type).
        """
        if not isinstance(d, dict) or set(d) != {f.name for f in fields(cls)}:
            raise ValueError("not an ArchitectureInfo object")
        kinds = _str_dict(d["module_kinds"], str)
        params3d = _str_dict(d["params3d"], list)
        for v in params3d.values():
            if len(v) != 2 or not isinstance(v[1], bool) or not isinstance(v[0], list) or not all(_count(x) for x in v[0]):
                raise ValueError("params3d entries must be [shape, bool]")
        groups = _str_dict(d["conv_groups"], int)
        if not all(_count(g) for g in groups.values()):
            raise ValueError("conv_groups must be counts")
        if not (d["num_parameters"] is None or _count(d["num_parameters"])):
            raise ValueError("num_parameters must be a count")
        keep, strict = _str_list(d["keep_fp32"]), _str_list(d["keep_fp32_strict"])
        try:
            for pat in keep + strict:
                re.compile(pat)
        except re.error as e:
            raise ValueError(f"keep_fp32 pattern: {e}") from None
        return cls(
            model_class=_opt_str(d["model_class"]),
            save_order=None if d["save_order"] is None else _str_list(d["save_order"]),
            tied_names=set(_str_list(d["tied_names"])),
            module_kinds={k: ModuleKind(v) for k, v in kinds.items()},
            keep_fp32=set(keep),
            keep_fp32_strict=set(strict),
            num_parameters=d["num_parameters"],
            note=_opt_str(d["note"]),
            bnb_quantizable=set(_str_list(d["bnb_quantizable"])),
            tied_to=_str_dict(d["tied_to"], str),
            conv_groups=groups,
            params3d={k: (list(v[0]), v[1]) for k, v in params3d.items()},
        )


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _opt_str(x: Any) -> str | None:
    if x is not None and not isinstance(x, str):
        raise ValueError("expected a string or null")
    return x


def _str_list(x: Any) -> list[str]:
    if not isinstance(x, list) or not all(isinstance(v, str) for v in x):
        raise ValueError("expected a list of strings")
    return x


def _str_dict(x: Any, value_type: type) -> dict[str, Any]:
    if not isinstance(x, dict) or not all(isinstance(v, value_type) and not (value_type is int and isinstance(v, bool)) for v in x.values()):
        raise ValueError(f"expected an object of {value_type.__name__} values")
    return dict(x)


def _kind(module: torch.nn.Module) -> ModuleKind:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return ModuleKind.CONV1D_GPT2
    if isinstance(module, torch.nn.Linear):
        return ModuleKind.LINEAR
    if isinstance(module, torch.nn.Embedding):
        return ModuleKind.EMBEDDING
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        return ModuleKind.CONV
    return ModuleKind.OTHER


def _model_class(config: Any, architectures: list[str]) -> type | None:
    import transformers

    for name in architectures:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        mapping = getattr(auto, "_model_mapping", None)
        if mapping is not None and type(config) in mapping:
            return mapping[type(config)]
    return None


def inspect_architecture(config_json: dict[str, Any]) -> ArchitectureInfo:
    """``build_architecture``, remembered in the cache by config content and library versions."""
    from importlib.metadata import version

    from lorasave import __version__
    from lorasave.sources import cache

    key = (json.dumps(config_json, sort_keys=True), version("transformers"), version("torch"), __version__, str(CACHE_SCHEMA))
    hit = cache.get("architecture", *key)
    if hit is not None:
        try:
            return ArchitectureInfo.from_json(hit)
        except (ValueError, TypeError, KeyError, RecursionError) as e:  # a damaged or foreign cache file: rebuilt below
            logger.info("ignoring a malformed architecture cache entry (%s); rebuilding it", e)
    info = build_architecture(config_json)
    cache.put("architecture", info.to_json(), *key)
    return info


def build_architecture(config_json: dict[str, Any]) -> ArchitectureInfo:
    """Build the base's model class on the meta device and read its layout.

    Args:
        config_json: the parsed ``config.json`` of the base.

    Returns:
        The facts, or an ArchitectureInfo with ``note`` set (and ``save_order`` None) when
        transformers has no built-in class for this ``model_type``; lorasave then keeps the
        checkpoint's own tensor order.
    """
    try:
        model = _instantiate(config_json)
        state = model.state_dict()
        kept = _drop_tied(state, model)
        kept = _revert_conversion(kept, model)
    except _NoClass as e:
        return ArchitectureInfo(note=f"{e}; keeping the base's tensor order")
    except Exception as e:  # a config or class transformers cannot build on meta: fall back, say why
        return ArchitectureInfo(note=f"could not build the model on the meta device ({type(e).__name__}: {e}); keeping the base's tensor order")
    cls = type(model)
    info = ArchitectureInfo(
        model_class=cls.__name__,
        save_order=list(kept),
        tied_names=set(state) - set(kept),
        module_kinds={name: _kind(mod) for name, mod in model.named_modules() if name},
        keep_fp32=set(getattr(model, "_keep_in_fp32_modules", None) or ()),
        keep_fp32_strict=set(getattr(model, "_keep_in_fp32_modules_strict", None) or ()),
        num_parameters=int(model.num_parameters()),
        bnb_quantizable=_bnb_quantizable(model),
        tied_to=_tie_partners(model, set(state) - set(kept), kept),
        conv_groups={n: int(m.groups) for n, m in model.named_modules() if isinstance(m, torch.nn.modules.conv._ConvNd) and m.groups != 1},
        params3d=_params3d(model),
    )
    logger.debug("architecture %s: %d tensors in save order", info.model_class, len(kept))
    return info


def _bnb_quantizable(model: Any) -> set[str]:
    """Modules ``replace_with_bnb_linear`` converts with transformers' default skips (no user skip list)."""
    try:
        from transformers.pytorch_utils import Conv1D
        from transformers.quantizers.base import get_keys_to_not_convert
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:
        return set()
    skip = list(get_keys_to_not_convert(model)) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return {name for name, mod in model.named_modules() if (type(mod) is torch.nn.Linear or isinstance(mod, Conv1D)) and should_convert_module(name, skip)}


def _params3d(model: Any) -> dict[str, tuple[list[int], bool]]:
    out = {}
    for mname, mod in model.named_modules():
        for pname, param in mod.named_parameters(recurse=False):
            if param.dim() == 3:
                out[f"{mname}.{pname}" if mname else pname] = (list(param.shape), bool(getattr(mod, "is_transposed", False)))
    return out


class _NoClass(Exception):
    """transformers has no built-in class for this config (message says why)."""


def _instantiate(config_json: dict[str, Any]) -> Any:
    """The config's built-in transformers class, built on the meta device (no weights, no remote code).

    Raises:
        _NoClass: unknown ``model_type`` or no built-in class for ``architectures``.
        Exception: whatever transformers raises for a config it cannot build.
    """
    import transformers
    from transformers import CONFIG_MAPPING

    model_type = config_json.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise _NoClass(f"transformers has no built-in model_type {model_type!r}")
    config = CONFIG_MAPPING[model_type].from_dict(dict(config_json))
    cls = _model_class(config, list(config_json.get("architectures") or []))
    if cls is None:
        raise _NoClass(f"no built-in transformers class for {config_json.get('architectures')}")
    tf_logger = transformers.utils.logging.get_logger("transformers")
    old_level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    try:
        with torch.device("meta"), contextlib.redirect_stdout(None):
            return cls._from_config(config)
    finally:
        tf_logger.setLevel(old_level)


def meta_model(config_json: dict[str, Any]) -> Any:
    """The base's transformers class on the meta device, with the weight conversions a loaded model carries.

    Used to map runtime parameters (fused MoE experts) to checkpoint tensors with
    ``transformers.core_model_loading.revert_weight_conversion``.

    Raises:
        UnsupportedModelError: transformers has no built-in class for this config.
    """
    from lorasave.errors import UnsupportedModelError

    try:
        model = _instantiate(config_json)
    except _NoClass as e:
        raise UnsupportedModelError(f"{e}; cannot map its runtime parameters") from None
    _revert_conversion({}, model)  # attaches the conversions
    return model


def revert_to_checkpoint(model: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Runtime tensors -> checkpoint tensors, as ``save_pretrained`` does (transformers' own mapping)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(state))


def _tie_partners(model: Any, dropped: set[str], kept: dict[str, Any]) -> dict[str, str]:
    """For each dropped tied name, the kept name whose parameter object it shares."""
    by_id: dict[int, str] = {}
    for name in kept:
        with contextlib.suppress(AttributeError):
            by_id.setdefault(id(model.get_parameter_or_buffer(name)), name)
    out = {}
    for name in dropped:
        with contextlib.suppress(AttributeError):
            partner = by_id.get(id(model.get_parameter_or_buffer(name)))
            if partner is not None:
                out[name] = partner
    return out


def _drop_tied(state: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """``save_pretrained``'s tied-weight removal (transformers.modeling_utils)."""
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:  # older/newer transformers: drop the declared tied keys ourselves
        tied = getattr(model, "_tied_weights_keys", None) or {}
        return {k: v for k, v in state.items() if k not in tied}
    return remove_tied_weights_from_state_dict(dict(state), model)


def _revert_conversion(state: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """``save_pretrained``'s revert of load-time renames (transformers.core_model_loading).

    A model loaded with ``from_pretrained`` carries ``_weight_conversions`` (a list, often
    empty), and ``revert_weight_conversion`` then sorts the state dict by ``dot_natural_key``
    before splitting it into shards. The merged model a user saves was loaded, so lorasave
    reproduces that: it attaches the conversions a fresh model would use (as a list, even empty).
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, revert_weight_conversion
    except ImportError:
        return state
    conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
    model._weight_conversions = conversions
    return revert_weight_conversion(model, state)
