"""Running an ``export_onnx`` output with onnxruntime: a cache-aware step, greedy generation, verification.

The graph follows optimum's layout (see ``lorasave.formats.onnx.export``): inputs ``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.N.key/value``; outputs ``logits``,
``present.N.key/value``. Nothing here needs torch except ``verify_onnx``, whose reference is a
transformers model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorasave.errors import InvalidOptionError, LorasaveError, SourceNotFoundError, UnsupportedModelError
from lorasave.util.jsonio import read_json

PathLike = str | os.PathLike[str]

ONNX_NAME = "model.onnx"
INSTALL_HINT = "pip install 'lorasave[onnx]' (onnx, onnxruntime, onnxscript)"


def onnx_bytes_bound(n_elements: int, *, merged: bool, dtype: str, quantize: str | None) -> int:
    """Bytes ``export_onnx`` holds on OUT's file system at its peak, for its free-space check.

    The float32 merge in the staging folder (with adapters), the graph in ``dtype`` (with
    ``quantize``: the float32 graph and its int8 copy), and 16 MiB for configs, card and tokenizer
    overheads; carried files are counted separately.
    """
    graph = n_elements * (5 if quantize else 2 if dtype == "float16" else 4)
    return (4 * n_elements if merged else 0) + graph + (16 << 20)


def import_onnx(*, exporter: bool = True) -> tuple[Any, Any]:
    """Import ``onnx`` and ``onnxruntime``, and with ``exporter`` check ``onnxscript`` (torch's exporter needs it).

    Returns:
        The ``onnx`` and ``onnxruntime`` modules.

    Raises:
        UnsupportedModelError: one of them is not installed; the message names ``pip install 'lorasave[onnx]'``.
    """
    try:
        import onnx
        import onnxruntime

        if exporter:
            import onnxscript  # noqa: F401
    except ImportError as e:
        raise UnsupportedModelError(f"ONNX export and inference need onnx, onnxruntime and onnxscript ({e.name} is missing): {INSTALL_HINT}") from None
    return onnx, onnxruntime


class OnnxDecoder:
    """An onnxruntime session over a graph in optimum's layout, with the cache bookkeeping.

    Args:
        path: ``model.onnx`` or the folder holding it.
        providers: onnxruntime execution providers (default: CPU).

    Raises:
        SourceNotFoundError: no such graph.
        UnsupportedModelError: onnxruntime is missing, or the graph has no ``past_key_values.*`` inputs.

    Attributes:
        n_layers, num_kv_heads, head_dim: read from the graph's past inputs.
        dtype: numpy dtype of the cache tensors (float32 or float16).
    """

    def __init__(self, path: PathLike, providers: Sequence[str] | None = None) -> None:
        _, ort = import_onnx(exporter=False)
        path = Path(path)
        self.path = path / ONNX_NAME if path.is_dir() else path
        if not self.path.is_file():
            raise SourceNotFoundError(f"{self.path}: no ONNX graph there; give an export_onnx output folder or its model.onnx", path=self.path)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # no warning per LoRA input that also has a default initializer
        self.session = ort.InferenceSession(str(self.path), options, providers=list(providers or ["CPUExecutionProvider"]))
        self.past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.output_names = [o.name for o in self.session.get_outputs()]
        if not self.past_inputs:
            raise UnsupportedModelError(
                f"{self.path} has no past_key_values.N.key/value inputs: not a decoder with KV cache in optimum's layout", path=self.path
            )
        self.n_layers = len(self.past_inputs) // 2
        first = self.past_inputs[0]
        self.num_kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.dtype = np.float16 if first.type == "tensor(float16)" else np.float32

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Past tensors of length 0 for the first step: (batch, num_kv_heads, 0, dim) each."""
        return [np.zeros((batch, int(i.shape[1]), 0, int(i.shape[3])), dtype=self.dtype) for i in self.past_inputs]

    def __call__(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray], run_options: Any = None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One step.

        Args:
            input_ids: (batch, seq) int64, the new tokens.
            attention_mask: (batch, past_seq + seq) int64, 1 for tokens and 0 for (left) padding.
            past: the cache, as ``empty_past`` or a previous call's ``present``.
            run_options: ``onnxruntime.RunOptions`` (an active LoRA adapter: ``formats.onnx.lora.adapter_run_options``).

        Returns:
            ``(logits, present)``: logits (batch, seq, vocab) as float32, and the new cache.
        """
        positions = np.cumsum(attention_mask, axis=-1) - 1
        positions = np.where(attention_mask == 0, 1, positions)[:, -input_ids.shape[1] :]
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64), "position_ids": positions.astype(np.int64)}
        feed.update({i.name: t for i, t in zip(self.past_inputs, past, strict=True)})
        logits, *present = self.session.run(self.output_names, feed, run_options)
        return logits.astype(np.float32), present


def _eos_ids(folder: Path, tokenizer: Any) -> set[int]:
    gen = folder / "generation_config.json"
    eos = read_json(gen).get("eos_token_id") if gen.is_file() else None
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

    Raises:
        SourceNotFoundError, UnsupportedModelError: as ``OnnxDecoder``.
        InvalidOptionError: the prompt tokenizes to nothing.
    """
    from lorasave.sources.hf_load import load_tokenizer

    folder = Path(onnx_dir)
    tokenizer = load_tokenizer(folder)
    eos = _eos_ids(folder, tokenizer)
    decoder = OnnxDecoder(folder, providers)
    ids = np.asarray([tokenizer(prompt)["input_ids"]], dtype=np.int64)
    if ids.shape[1] == 0:
        raise InvalidOptionError(f"the prompt {prompt!r} tokenizes to no tokens; give some text")
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


class OnnxVerificationError(LorasaveError, ArithmeticError):
    """onnxruntime's logits differ from transformers' beyond the tolerance; nothing was written.

    Attributes:
        verification: the numbers (``verify_onnx``'s dict).
    """

    def __init__(self, message: str, *, verification: dict[str, Any]) -> None:
        super().__init__(message)
        self.verification = verification


def verify_onnx(onnx_path: PathLike, model: Any, *, tolerance: float | None, seed: int = 0) -> dict[str, Any]:
    """Compare onnxruntime's logits with ``model``'s (transformers, float32) on four steps.

    1. prefill: one prompt of 7 tokens, empty past; 2. decode: one more token with the prefill's
    past; 3. batch prefill: that prompt and one of 4 tokens, left-padded to 7; 4. batch decode:
    one more token per row with the batch's past. Each ONNX row is compared, on its real
    positions, with transformers on that row's unpadded tokens (no cache). Token ids are drawn
    from the vocabulary with ``seed``; each decode token is the reference's greedy choice.

    Args:
        onnx_path: ``model.onnx`` or its folder.
        model: the float32 transformers model (``torch.nn.Module``) the graph was exported from.
        tolerance: largest accepted max |difference| / max |logit|; None reports without judging.

    Returns:
        ``max_abs_diff``, ``max_abs_logit`` (reference), ``relative_diff``, ``top1_agreement``
        (fraction of compared positions with the same argmax), ``checks`` (max |difference| per
        step), ``positions``, ``tolerance``, ``passed`` (None when ``tolerance`` is None; False on NaN).
    """
    import torch

    decoder = OnnxDecoder(onnx_path)
    vocab = model.get_input_embeddings().num_embeddings
    rng = np.random.default_rng(seed)
    low = min(3, vocab - 1)
    rows = [rng.integers(low, vocab, 7).tolist(), rng.integers(low, vocab, 4).tolist()]

    def ref(tokens: list[int]) -> np.ndarray:
        with torch.no_grad():
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
