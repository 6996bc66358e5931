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
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InvalidOptionError, LorasaveError, UnsupportedModelError
from .manifest import MANIFEST_NAME, sha256_file, sha256_source, write_manifest
from .output import StagedOutput, carry_files, check_output_path, write_config

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

ONNX_NAME = "model.onnx"
#: Weights above this many bytes (decimal, as lorasave's sizes) go to external data: protobuf caps a file at 2 GiB.
EXTERNAL_DATA_BYTES = 2 * 10**9
#: Largest |ONNX logit − transformers logit| accepted by the verification, relative to max |logit|.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16", "fp16": "float16", "half": "float16"}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_INSTALL = "pip install 'lorasave[onnx]' (onnx, onnxruntime, onnxscript)"


class OnnxVerificationError(LorasaveError, ArithmeticError):
    """onnxruntime's logits differ from transformers' beyond the tolerance; nothing was written.

    Attributes:
        verification: the numbers (``verify_onnx``'s dict).
    """

    def __init__(self, message: str, *, verification: dict[str, Any]) -> None:
        super().__init__(message)
        self.verification = verification


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
        d = asdict(self)
        d["output"] = str(self.output)
        return d

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


def import_onnx() -> tuple[Any, Any]:
    """Import ``onnx`` and ``onnxruntime`` (and check ``onnxscript``, which torch's exporter needs).

    Raises:
        UnsupportedModelError: one of them is not installed; the message names ``pip install 'lorasave[onnx]'``.
    """
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  # torch.onnx.export(dynamo=True) builds the graph with it
    except ImportError as e:
        raise UnsupportedModelError(f"ONNX export needs onnx, onnxruntime and onnxscript ({e.name} is missing): {_INSTALL}") from None
    return onnx, onnxruntime


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
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, KeyError) as e:
        raise UnsupportedModelError(f"{folder}: transformers does not know this model type, so it cannot be exported ({e})", path=folder) from None
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{folder}: {config.model_type} is an encoder-decoder; ONNX export handles decoder-only causal LMs", path=folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager", use_safetensors=True, trust_remote_code=False)
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
    past = []
    for _ in range(geometry.n_layers):
        past.append(torch.randn(batch, geometry.num_kv_heads, past_len, geometry.head_dim, dtype=dtype))
        past.append(torch.randn(batch, geometry.num_kv_heads, past_len, geometry.value_dim, dtype=dtype))
    ids = torch.randint(0, 8, (batch, seq))
    b, s, p, t = Dim("batch_size"), Dim("sequence_length"), Dim("past_sequence_length"), Dim("total_sequence_length")
    shapes = ({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in past))
    wrapper = KVCacheDecoder(model, geometry.n_layers).eval()
    logs = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(logs), torch.no_grad():
            warnings.simplefilter("ignore")
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
    except Exception as e:  # torch.export / onnxscript errors have no common base class
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsupportedModelError(f"{type(model).__name__} could not be exported to ONNX with torch.onnx.export(dynamo=True): {first}") from e
    logger.debug("torch.onnx: %s", logs.getvalue())


def quantize_int8(src: Path, dst: Path) -> None:
    """onnxruntime dynamic quantization: MatMul weights to int8 (per tensor), activations quantized at run time.

    External data is used for the output when ``src`` has it.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    external = any(p.name != src.name for p in src.parent.iterdir() if p.name.startswith(src.name))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, use_external_data_format=external)


# ----------------------------------------------------------------------------------- the runner


class OnnxDecoder:
    """An onnxruntime session over a graph in optimum's layout, with the cache bookkeeping.

    Args:
        path: ``model.onnx`` or the folder holding it.
        providers: onnxruntime execution providers (default: CPU).

    Attributes:
        n_layers, num_kv_heads, head_dim: read from the graph's past inputs.
        dtype: numpy dtype of the cache tensors (float32 or float16).
    """

    def __init__(self, path: PathLike, providers: Sequence[str] | None = None) -> None:
        _, ort = import_onnx()
        path = Path(path)
        self.path = path / ONNX_NAME if path.is_dir() else path
        self.session = ort.InferenceSession(str(self.path), providers=list(providers or ["CPUExecutionProvider"]))
        self.past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.n_layers = len(self.past_inputs) // 2
        first = self.past_inputs[0]
        self.num_kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.dtype = np.float16 if first.type == "tensor(float16)" else np.float32

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Past tensors of length 0 for the first step: (batch, num_kv_heads, 0, dim) each."""
        return [np.zeros((batch, int(i.shape[1]), 0, int(i.shape[3])), dtype=self.dtype) for i in self.past_inputs]

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One step.

        Args:
            input_ids: (batch, seq) int64, the new tokens.
            attention_mask: (batch, past_seq + seq) int64, 1 for tokens and 0 for (left) padding.
            past: the cache, as ``empty_past`` or a previous call's ``present``.

        Returns:
            ``(logits, present)``: logits (batch, seq, vocab) as float32, and the new cache.
        """
        positions = np.cumsum(attention_mask, axis=-1) - 1
        positions = np.where(attention_mask == 0, 1, positions)[:, -input_ids.shape[1] :]
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64), "position_ids": positions.astype(np.int64)}
        feed.update({i.name: t for i, t in zip(self.past_inputs, past, strict=True)})
        logits, *present = self.session.run(self.output_names, feed)
        return logits.astype(np.float32), present


def _eos_ids(folder: Path, tokenizer: Any) -> set[int]:
    gen = folder / "generation_config.json"
    eos = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id") if gen.is_file() else None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, list) else {int(eos)}


def onnx_generate(onnx_dir: PathLike, prompt: str, max_new_tokens: int = 20, *, providers: Sequence[str] | None = None) -> str:
    """Greedy continuation of ``prompt`` with onnxruntime alone (no torch model).

    The prompt is tokenized with the folder's tokenizer (transformers' loader, special tokens
    added as ``tokenizer(prompt)`` adds them); each step feeds the new token and the cache back.
    Generation stops after ``max_new_tokens`` tokens or at an EOS id of ``generation_config.json``
    (else the tokenizer's), as transformers' greedy ``generate`` does.

    Args:
        onnx_dir: an ``export_onnx`` output folder.
        prompt: the text to continue.
        max_new_tokens: most tokens to generate.
        providers: onnxruntime execution providers (default: CPU).

    Returns:
        The generated text only (not the prompt), decoded with ``skip_special_tokens=True``.
    """
    from transformers import AutoTokenizer

    folder = Path(onnx_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    eos = _eos_ids(folder, tokenizer)
    decoder = OnnxDecoder(folder, providers)
    ids = np.asarray([tokenizer(prompt)["input_ids"]], dtype=np.int64)
    mask = np.ones_like(ids)
    past = decoder.empty_past(1)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits, past = decoder(ids, mask, past)
        token = int(logits[0, -1].argmax())
        new.append(token)
        if token in eos:
            break
        ids = np.asarray([[token]], dtype=np.int64)
        mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
    return tokenizer.decode(new, skip_special_tokens=True)


# ----------------------------------------------------------------------------- the verification


@torch.no_grad()
def verify_onnx(onnx_path: PathLike, model: torch.nn.Module, *, tolerance: float | None, seed: int = 0) -> dict[str, Any]:
    """Compare onnxruntime's logits with ``model``'s (transformers, float32) on four steps.

    1. prefill: one prompt of 7 tokens, empty past; 2. decode: one more token with the prefill's
    past; 3. batch prefill: that prompt and one of 4 tokens, left-padded to 7; 4. batch decode:
    one more token per row with the batch's past. Each ONNX row is compared, on its real
    positions, with transformers on that row's unpadded tokens (no cache). Token ids are drawn
    from the vocabulary with ``seed``; each decode token is the reference's greedy choice.

    Args:
        onnx_path: ``model.onnx`` or its folder.
        model: the float32 transformers model the graph was exported from.
        tolerance: largest accepted max |difference| / max |logit|; None reports without judging.

    Returns:
        ``max_abs_diff``, ``max_abs_logit`` (reference), ``relative_diff``, ``top1_agreement``
        (fraction of compared positions with the same argmax), ``checks`` (max |difference| per
        step), ``positions``, ``tolerance``, ``passed`` (None when ``tolerance`` is None; False on NaN).
    """
    decoder = OnnxDecoder(onnx_path)
    vocab = model.get_input_embeddings().num_embeddings
    rng = np.random.default_rng(seed)
    low = min(3, vocab - 1)
    rows = [rng.integers(low, vocab, 7).tolist(), rng.integers(low, vocab, 4).tolist()]

    def ref(tokens: list[int]) -> np.ndarray:
        return model(input_ids=torch.tensor([tokens])).logits[0].float().numpy()

    diffs: dict[str, float] = {}
    pairs: list[tuple[np.ndarray, np.ndarray]] = []

    def check(name: str, got: np.ndarray, want: np.ndarray) -> None:
        diffs[name] = max(diffs.get(name, 0.0), float(np.abs(got - want).max()))
        pairs.append((got, want))

    # 1-2: one prompt, then one step with the past
    r0 = ref(rows[0])
    logits, past = decoder(np.asarray([rows[0]]), np.ones((1, 7), dtype=np.int64), decoder.empty_past(1))
    check("prefill", logits[0], r0)
    nxt = int(r0[-1].argmax())
    logits, _ = decoder(np.asarray([[nxt]]), np.ones((1, 8), dtype=np.int64), past)
    check("decode", logits[0], ref([*rows[0], nxt])[-1:])
    # 3-4: left-padded batch of two, each row against its unpadded reference
    width = max(len(r) for r in rows)
    ids = np.zeros((2, width), dtype=np.int64)
    mask = np.zeros((2, width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    logits, past = decoder(ids, mask, decoder.empty_past(2))
    nexts = []
    for i, r in enumerate(rows):
        want = ref(r)
        check("batch_prefill", logits[i, width - len(r) :], want)
        nexts.append(int(want[-1].argmax()))
    mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
    logits, _ = decoder(np.asarray([[n] for n in nexts]), mask, past)
    for i, r in enumerate(rows):
        check("batch_decode", logits[i], ref([*r, nexts[i]])[-1:])

    got = np.concatenate([g for g, _ in pairs])
    want = np.concatenate([w for _, w in pairs])
    max_diff = float(np.abs(got - want).max())
    max_logit = float(np.abs(want).max())
    relative = max_diff / max_logit if max_logit > 0 else max_diff
    finite = bool(np.isfinite(got).all())
    return {
        "reference": "transformers, float32, no cache, each row unpadded",
        "max_abs_diff": max_diff if finite else float("nan"),
        "max_abs_logit": max_logit,
        "relative_diff": relative if finite else float("nan"),
        "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
        "checks": diffs,
        "positions": int(got.shape[0]),
        "tolerance": tolerance,
        "passed": None if tolerance is None else bool(finite and relative <= tolerance),
    }
