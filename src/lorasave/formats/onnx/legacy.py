"""ONNX export of a merged model: a decoder with KV cache, in optimum's layout, that onnxruntime runs.

``export_onnx`` merges the adapter(s) into the base with ``lorasave.api.merge`` (streaming, float32,
into a scratch folder inside the staging folder), loads the merged checkpoint with transformers and
exports it with ``torch.onnx.export(dynamo=True)`` through ``KVCacheDecoder``, a wrapper that takes
the past keys and values as flat tensors. The graph (``model.onnx``) has optimum's names:

- inputs ``input_ids`` (batch, seq) int64, ``attention_mask`` (batch, past_seq + seq) int64 (1 =
  token, 0 = padding), ``position_ids`` (batch, seq) int64, and per layer N
  ``past_key_values.N.key`` / ``past_key_values.N.value`` (batch, num_kv_heads, past_seq, head_dim);
- outputs ``logits`` (batch, seq, vocab) and ``present.N.key`` / ``present.N.value``
  (batch, num_kv_heads, past_seq + seq, head_dim).

The first step passes empty past tensors (past_seq = 0), as optimum's ``ORTModelForCausalLM`` does.
Weights over 2 GB go to an external data file beside ``model.onnx``. The output folder also holds
``config.json``, ``generation_config.json``, the tokenizer and ``lorasave.json``; it appears
atomically. ``onnx_generate`` is a small greedy runner that needs only onnxruntime and a tokenizer.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lorasave.errors import InvalidOptionError, UnsupportedModelError
from lorasave.formats.card_sources import card_sources
from lorasave.formats.onnx.run import ONNX_NAME, OnnxDecoder, OnnxVerificationError, import_onnx, onnx_bytes_bound, onnx_generate, verify_onnx
from lorasave.merging.stream import Timings
from lorasave.pipeline.manifest import MANIFEST_NAME, result_dict, sha256_file, sha256_source, write_manifest
from lorasave.pipeline.output import StagedOutput, align_generation_eos, carry_files, carry_plan, check_output_path, write_config
from lorasave.pipeline.run import PlannedOutput, run_single
from lorasave.sources import stamp as source_stamp
from lorasave.sources.adapter import adapter_list
from lorasave.util.jsonio import read_json

if TYPE_CHECKING:
    from lorasave.sources.checkpoint import Checkpoint

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

__all__ = [
    "KVCacheDecoder",
    "OnnxDecoder",
    "OnnxResult",
    "OnnxVerificationError",
    "export_onnx",
    "input_names",
    "onnx_generate",
    "output_names",
    "verify_onnx",
]
#: Weights above this many bytes (decimal, as lorasave's sizes) go to external data: protobuf caps a file at 2 GiB.
EXTERNAL_DATA_BYTES = 2 * 10**9
#: Largest |ONNX logit − transformers logit| accepted by the verification, relative to max |logit|.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16", "fp16": "float16", "half": "float16"}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass
class OnnxResult:
    """What ``export_onnx`` wrote.

    Attributes:
        output: the output folder.
        files: names of the files written, manifest included.
        verification: ``verify_onnx``'s numbers, None with ``verify=False``.
        seconds: wall time of the whole call.
        dtype: ``"float32"`` or ``"float16"`` (weights, cache and logits).
        quantize: ``"int8"`` (dynamic quantization of the MatMul weights) or None.
        opset: the ONNX opset of the default domain.
        n_layers: decoder layers (one key and one value tensor each in the cache).
        num_kv_heads: key/value heads, dimension 1 of the cache tensors.
        head_dim: dimension 3 of the key cache tensors.
        total_bytes: bytes of the ONNX files (graph and external data).
        timings: seconds per phase: merge, load, export, quantize, verify.
    """

    output: Path
    files: list[str]
    verification: dict[str, Any] | None
    seconds: float
    dtype: str
    quantize: str | None
    opset: int
    n_layers: int
    num_kv_heads: int
    head_dim: int
    total_bytes: int
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``--json``)."""
        return result_dict(self)

    def summary(self) -> str:
        """One line for humans."""
        form = f"int8 weights, {self.dtype} activations" if self.quantize else self.dtype
        line = (
            f"exported an ONNX decoder ({self.n_layers} layers, KV cache {self.num_kv_heads} heads x {self.head_dim}, {form}) "
            f"to {self.output} ({self.total_bytes / 1e6:.1f} MB) in {self.seconds:.1f} s"
        )
        v = self.verification
        if v:
            verdict = "not checked" if v["passed"] is None else ("passed" if v["passed"] else "FAILED")
            line += (
                f"; onnxruntime vs transformers: max |dlogit| {v['max_abs_diff']:.3g} = {v['relative_diff']:.2g} of max |logit|, "
                f"top-1 {v['top1_agreement']:.1%} ({verdict})"
            )
        return line


def parse_onnx_options(dtype: str | torch.dtype, quantize: str | None, opset: int) -> tuple[str, str | None]:
    """Validate ``export_onnx``'s options.

    Returns:
        ``(dtype, quantize)`` normalized: ``"float32"``/``"float16"``, ``"int8"``/None.

    Raises:
        InvalidOptionError: unknown dtype or quantization, int8 with float16, opset below 18.
    """
    key = str(dtype).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise InvalidOptionError(f"ONNX dtype {dtype!r}: use float32 or float16 (onnxruntime has few bfloat16 kernels)")
    name = _DTYPES[key]
    q = None if quantize is None or str(quantize).lower() in ("", "none") else str(quantize).lower()
    if q not in (None, "int8"):
        raise InvalidOptionError(f"quantize {quantize!r}: the only quantization offered is int8 (onnxruntime dynamic quantization)")
    if q == "int8" and name != "float32":
        raise InvalidOptionError("quantize int8 starts from the float32 graph; use dtype float32 with it")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 18:
        raise InvalidOptionError(f"opset {opset!r}: torch's ONNX exporter needs opset 18 or newer")
    return name, q


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Silence stdout, Python warnings, transformers' progress bars and the named loggers (below ERROR) for a block."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in saved:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


# ------------------------------------------------------------------------------------ the graph


def input_names(n_layers: int) -> list[str]:
    """Graph input names in order: ``input_ids``, ``attention_mask``, ``position_ids``, then ``past_key_values.N.key/value``."""
    return ["input_ids", "attention_mask", "position_ids", *(f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value"))]


def output_names(n_layers: int) -> list[str]:
    """Graph output names in order: ``logits``, then ``present.N.key/value``."""
    return ["logits", *(f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value"))]


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers 5.24 renamed ``past_key_values`` to ``cache``; use whichever the forward takes."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _output_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


class KVCacheDecoder(torch.nn.Module):
    """A causal LM with its KV cache as flat tensors: the module that is exported.

    ``forward(input_ids, attention_mask, position_ids, *past)`` with ``past`` = key0, value0, key1,
    value1, ... each (batch, num_kv_heads, past_seq, head_dim), builds a transformers
    ``DynamicCache`` holding them, runs the model and returns ``(logits, *present)``: logits
    (batch, seq, vocab) and the updated key/value tensors (batch, num_kv_heads, past_seq + seq, head_dim).
    """

    def __init__(self, model: torch.nn.Module, n_layers: int) -> None:
        super().__init__()
        self.model = model
        self.n_layers = n_layers
        self._cache_kwarg = _cache_kwarg(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        layers = []
        for i in range(self.n_layers):
            layer = DynamicLayer()
            layer.lazy_initialization(past[2 * i], past[2 * i + 1])
            layer.keys, layer.values = past[2 * i], past[2 * i + 1]
            layers.append(layer)
        cache = DynamicCache()
        cache.layers = layers
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **{self._cache_kwarg: cache})
        present = _output_cache(out)
        flat = [t for layer in present.layers for t in (layer.keys, layer.values)]
        return (out.logits, *flat)


@dataclass
class CacheGeometry:
    """Shape of one layer's cache entries: keys (batch, num_kv_heads, seq, head_dim), values (..., value_dim)."""

    n_layers: int
    num_kv_heads: int
    head_dim: int
    value_dim: int


def load_causal_lm(folder: Path) -> torch.nn.Module:
    """Load a checkpoint folder as a float32 causal LM with eager attention (safetensors only, no remote code).

    Raises:
        UnsupportedModelError: transformers has no causal-LM class for it, or it is an encoder-decoder.
    """
    from lorasave.sources.hf_load import load_causal_lm, load_config

    try:
        config = load_config(folder)
    except UnsupportedModelError:
        raise
    except (ValueError, KeyError) as e:
        raise UnsupportedModelError(f"{folder}: transformers does not know this model type, so it cannot be exported ({e})", path=folder) from None
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{folder}: {config.model_type} is an encoder-decoder; ONNX export handles decoder-only causal LMs", path=folder)
    try:
        model = load_causal_lm(folder, dtype=torch.float32, attn_implementation="eager", use_safetensors=True)
    except UnsupportedModelError:
        raise
    except ValueError as e:
        raise UnsupportedModelError(f"{folder}: {config.model_type} has no causal-LM class in transformers ({e})", path=folder) from None
    return model.eval()


@torch.no_grad()
def cache_geometry(model: torch.nn.Module) -> CacheGeometry:
    """Run two tokens through ``model`` and read the shapes of the cache it builds.

    Raises:
        UnsupportedModelError: the cache is not one plain key/value tensor pair per layer (sliding
            window, hybrid or linear-attention layers), which optimum's layout cannot express.
    """
    from transformers.cache_utils import DynamicLayer

    name = type(model).__name__
    out = model(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=True)
    cache = _output_cache(out)
    layers = getattr(cache, "layers", None)
    if not layers:
        raise UnsupportedModelError(f"{name} returns no transformers cache, so it cannot be exported with a KV cache")
    kinds = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if kinds:
        raise UnsupportedModelError(
            f"{name} uses {', '.join(kinds)} cache layers (sliding window or hybrid attention); "
            "the ONNX export handles models whose every layer keeps a full key/value cache"
        )
    shapes = {(tuple(layer.keys.shape), tuple(layer.values.shape)) for layer in layers}
    if len(shapes) != 1:
        raise UnsupportedModelError(f"{name}: the cache layers differ in shape ({sorted(shapes)}), which optimum's layout cannot express")
    (k, v) = shapes.pop()
    return CacheGeometry(n_layers=len(layers), num_kv_heads=k[1], head_dim=k[3], value_dim=v[3])


def _weight_bytes(model: torch.nn.Module) -> int:
    seen = {id(t): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    return sum(seen.values())


def export_decoder(model: torch.nn.Module, path: Path, geometry: CacheGeometry, *, opset: int = 18) -> None:
    """Export ``model`` (in its own dtype) to ``path`` with dynamic batch, sequence and past lengths.

    The example inputs are a left-padded batch of two with a past of 4, so no branch is traced for
    an all-ones mask or an empty cache. Weights over ``EXTERNAL_DATA_BYTES`` go to ``<path>.data``.

    Raises:
        UnsupportedModelError: torch.export or the ONNX translation failed for this architecture.
    """
    from torch.export import Dim

    dtype = next(model.parameters()).dtype
    batch, seq, past_len = 2, 3, 4
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    mask[1, :2] = 0
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -seq:]
    gen = torch.Generator().manual_seed(0)  # example values only; the caller's RNG is left alone
    past = []
    for _ in range(geometry.n_layers):
        past.append(torch.randn(batch, geometry.num_kv_heads, past_len, geometry.head_dim, generator=gen).to(dtype))
        past.append(torch.randn(batch, geometry.num_kv_heads, past_len, geometry.value_dim, generator=gen).to(dtype))
    ids = torch.randint(0, 8, (batch, seq), generator=gen)
    b, s, p, t = Dim("batch_size"), Dim("sequence_length"), Dim("past_sequence_length"), Dim("total_sequence_length")
    shapes = ({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in past))
    wrapper = KVCacheDecoder(model, geometry.n_layers).eval()
    try:
        with _quiet("torch.onnx", "onnx_ir", "onnxscript"), torch.no_grad():
            program = torch.onnx.export(
                wrapper,
                (ids, mask, positions, *past),
                input_names=input_names(geometry.n_layers),
                output_names=output_names(geometry.n_layers),
                dynamic_shapes=shapes,
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
            program.save(str(path), external_data=_weight_bytes(model) > EXTERNAL_DATA_BYTES)
    except (MemoryError, OSError):  # out of memory or disk: not the architecture's fault
        raise
    except Exception as e:  # torch.export / onnxscript errors have no common base class
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsupportedModelError(f"{type(model).__name__} could not be exported to ONNX with torch.onnx.export(dynamo=True): {first}") from e


def quantize_int8(src: Path, dst: Path) -> None:
    """onnxruntime dynamic quantization: MatMul weights to int8 (per tensor), activations quantized at run time.

    External data is used for the output when ``src`` has it.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    external = any(p.name != src.name for p in src.parent.iterdir() if p.name.startswith(src.name))
    with _quiet("", "onnxruntime"):  # it advises shape-inference pre-processing on the root logger
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, use_external_data_format=external)


# ------------------------------------------------------------------------------------ the export


@contextlib.contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] = round(timings.get(phase, 0.0) + time.perf_counter() - start, 3)


def _side_files(source: Path, dst: Path, dtype: str) -> list[str]:
    """Copy a merged output's non-weight files (config, generation config, tokenizer, licenses), config.json's dtype set."""
    skip = (".safetensors", ".safetensors.index.json")
    names = []
    for p in sorted(source.iterdir()):
        if p.is_file() and not p.name.endswith(skip) and p.name not in (MANIFEST_NAME, "README.md"):  # the merge's card describes safetensors
            shutil.copyfile(p, dst / p.name)
            names.append(p.name)
    cfg = read_json(source / "config.json")
    write_config(cfg, dst / "config.json", dtype=_TORCH_DTYPES[dtype])
    return names


def _write_card(
    folder: Path,
    title: str,
    ckpt: Any,
    described: dict[str, Any],
    dtype: str,
    quant: str | None,
    opset: int,
    geometry: CacheGeometry,
    verification: dict[str, Any] | None,
) -> None:
    """The output's ``README.md`` (``lorasave.pipeline.cards.write_card``), with an onnxruntime snippet."""
    from lorasave.pipeline.cards import write_card

    snippet = (
        "from lorasave.formats.onnx.export import onnx_generate  # greedy, onnxruntime only\n\n"
        f'print(onnx_generate("{title}", "Once upon a time", max_new_tokens=20))\n\n'
        "# or any runner of optimum's layout: inputs input_ids, attention_mask, position_ids,\n"
        "# past_key_values.N.key/value; outputs logits, present.N.key/value"
    )
    checked = None
    if verification:
        checked = (
            f"onnxruntime against transformers (float32) on a prefill, a decode step with the cache and a left-padded batch of two: "
            f"max |logit difference| {verification['max_abs_diff']:.3g} (max |logit| {verification['max_abs_logit']:.3g}), "
            f"top-1 agreement {verification['top1_agreement']:.1%}. Every file's sha256 is recorded in `lorasave.json`."
        )
    write_card(
        folder,
        kind="onnx",
        **card_sources(ckpt, described.get("adapters") or []),
        settings={
            "format": f"ONNX (opset {opset}), decoder with KV cache in optimum's layout",
            "dtype": dtype,
            "quantization": "int8 dynamic (onnxruntime)" if quant else None,
            "cache": f"{geometry.n_layers} layers x (batch, {geometry.num_kv_heads} KV heads, seq, {geometry.head_dim})",
        },
        load_snippet=snippet,
        verification=checked,
        title=title,
    )


def export_onnx(
    base: PathLike | Checkpoint | None,
    adapters: PathLike | Sequence[PathLike] | None,
    output: PathLike,
    *,
    dtype: str | torch.dtype = "float32",
    quantize: str | None = None,
    opset: int = 18,
    overwrite: bool = False,
    verify: bool = True,
    weights: Sequence[float] | None = None,
    tokenizer: PathLike | None = None,
    allow_pickle: bool = False,
) -> OnnxResult:
    """Merge LoRA adapter(s) into a base and export an ONNX decoder with KV cache that onnxruntime runs.

    The merge is ``lorasave.merge`` in float32 (streaming) into a scratch folder inside the staging
    folder; with no adapter, the base itself is exported. The graph's names and shapes are the
    module docstring's (optimum's layout). OUT gets ``model.onnx`` (plus ``model.onnx.data`` when the
    weights exceed 2 GB), ``config.json`` (``dtype`` set), ``generation_config.json``, the tokenizer,
    license files and ``lorasave.json``; it appears atomically, complete or not at all.

    Args:
        base: base folder or a Hub id in the local HF cache.
        adapters: PEFT adapter folder(s), or None / [] to export the base.
        output: the folder to create.
        dtype: ``"float32"`` or ``"float16"``: weights, cache tensors and logits.
        quantize: ``"int8"``: onnxruntime dynamic quantization of the float32 graph's MatMul
            weights (the cache and logits stay float32); None for none.
        opset: ONNX opset of the default domain (18 or newer).
        overwrite: replace an existing lorasave output at ``output``.
        verify: run ``verify_onnx`` (onnxruntime against transformers on the merged model) and store
            its numbers in the result and manifest; float32 must agree within 1e-4 of max |logit|,
            float16 within 2e-2, int8 is reported without a threshold.
        weights, tokenizer, allow_pickle: passed to ``lorasave.merge``.

    Returns:
        OnnxResult.

    Raises:
        LorasaveError subclasses: InvalidOptionError (dtype, quantize, opset), UnsupportedModelError
        (onnx or onnxruntime missing, an architecture transformers or torch.onnx cannot export, a
        sliding-window or hybrid cache), OnnxVerificationError, OutputExistsError, UnsafePathError,
        InsufficientDiskError (``onnx_run.onnx_bytes_bound`` plus carried files exceed the free
        space; DiskFullError when the disk fills anyway), and those of ``lorasave.merge``.
    """
    from lorasave.sources.named_base import open_base

    t_start = time.perf_counter()
    dtype_name, quant = parse_onnx_options(dtype, quantize, opset)
    onnx, ort = import_onnx()
    if opset > onnx.defs.onnx_opset_version():
        raise InvalidOptionError(f"opset {opset}: the installed onnx {onnx.__version__} knows opsets up to {onnx.defs.onnx_opset_version()}")
    ads = adapter_list(adapters)
    ckpt = open_base(base, ads)
    if not ads and ckpt.quant_method is not None:
        raise UnsupportedModelError(
            f"{ckpt.root} is a {ckpt.quant_method} quantized checkpoint; give its adapter (the merge dequantizes it) "
            "or write a float32 copy first with lorasave merge",
            path=ckpt.root,
        )
    sources = [ckpt.root, *(Path(a) for a in ads), *([Path(tokenizer)] if tokenizer is not None else [])]
    final = check_output_path(Path(output), sources, overwrite)
    tok_dir = Path(tokenizer) if tokenizer is not None else ckpt.root  # the merge picks its own tokenizer: counted alike
    carry = carry_plan(ckpt.root, tok_dir)
    n_elements = sum(math.prod(e.shape) for e in ckpt.tensors.values())
    needed = onnx_bytes_bound(n_elements, merged=bool(ads), dtype=dtype_name, quantize=quant)
    timings: dict[str, float] = {}

    def finish(folder: Path, _: Timings) -> OnnxResult:
        work = folder / ".work"
        work.mkdir()
        if ads:
            from lorasave.api import merge

            with _timed(timings, "merge"):
                merge(ckpt, ads, work / "merged", dtype="float32", weights=weights, tokenizer=tokenizer, allow_pickle=allow_pickle)
            model_dir = work / "merged"
            merge_manifest = json.loads((model_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
            described = merge_manifest["sources"]
            merge_summary = {k: merge_manifest["result"].get(k) for k in ("n_tensors", "n_merged", "architecture", "notes")}
        else:
            model_dir = ckpt.root
            described = {
                "base": {
                    "path": str(ckpt.root.resolve()),
                    "hub_id": ckpt.hub_id,
                    "files": {str(p.relative_to(ckpt.root)): sha256_source(p) for p in ckpt.source_files()},
                }
            }
            merge_summary = None
        with _timed(timings, "load"), _quiet():
            model = load_causal_lm(model_dir)
            geometry = cache_geometry(model)
        graph = folder / ONNX_NAME
        with _timed(timings, "export"):
            exported = model if dtype_name == "float32" else copy.deepcopy(model).to(_TORCH_DTYPES[dtype_name])
            if quant:
                (work / "float32").mkdir()
                export_decoder(exported, work / "float32" / ONNX_NAME, geometry, opset=opset)
            else:
                export_decoder(exported, graph, geometry, opset=opset)
            del exported
        if quant:
            with _timed(timings, "quantize"):
                quantize_int8(work / "float32" / ONNX_NAME, graph)
        verification = None
        if verify:
            with _timed(timings, "verify"):
                verification = verify_onnx(graph, model, tolerance=None if quant else TOLERANCE[dtype_name])
            logger.debug("verification: %s", verification)
            if verification["passed"] is False:
                raise OnnxVerificationError(
                    f"onnxruntime's logits differ from transformers' by {verification['max_abs_diff']:.3g} "
                    f"({verification['relative_diff']:.3g} of max |logit|, tolerance {verification['tolerance']:.0e}; per step: "
                    f"{', '.join(f'{k} {v:.3g}' for k, v in verification['checks'].items())}); nothing was written. "
                    "This is an export bug worth reporting; --no-verify (verify=False) keeps the graph anyway",
                    verification=verification,
                )
        del model
        if ads:
            _side_files(model_dir, folder, dtype_name)
        else:
            carry_files(ckpt.root, tok_dir, folder, carry)
            write_config(ckpt.config, folder / "config.json", dtype=_TORCH_DTYPES[dtype_name])
            if tok_dir.resolve() != ckpt.root.resolve():
                align_generation_eos(folder, tok_dir)
        _write_card(folder, final.name, ckpt, described, dtype_name, quant, opset, geometry, verification)
        shutil.rmtree(work)
        names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != StagedOutput.LOCK)
        files = {n: sha256_file(folder / n) for n in names}
        onnx_bytes = sum((folder / n).stat().st_size for n in names if n.startswith(ONNX_NAME))
        settings = {
            "dtype": dtype_name,
            "quantize": quant,
            "opset": opset,
            "verify": verify,
            "weights": list(weights) if weights is not None else None,
            "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        }
        summary = {
            "inputs": input_names(geometry.n_layers),
            "outputs": output_names(geometry.n_layers),
            "cache": asdict(geometry),
            "verification": verification,
            "merge": merge_summary,
        }
        write_manifest(folder, command="onnx", sources=described, settings=settings, result=summary, files=files)
        result = OnnxResult(
            output=final,
            files=sorted([*files, MANIFEST_NAME]),
            verification=verification,
            seconds=round(time.perf_counter() - t_start, 3),
            dtype=dtype_name,
            quantize=quant,
            opset=opset,
            n_layers=geometry.n_layers,
            num_kv_heads=geometry.num_kv_heads,
            head_dim=geometry.head_dim,
            total_bytes=onnx_bytes,
            timings=timings,
        )
        logger.debug("%s", result.summary())
        return result

    planned = PlannedOutput("onnx", final, overwrite, source_stamp.record(ckpt), needed, finish, carried_bytes=2 * carry.nbytes)  # merge + OUT
    result: OnnxResult = run_single(planned)
    return result
