"""``verify``'s logits level: OUT's logits against base + adapter(s) under PEFT (float32) on a fixed text.

A float output (safetensors, f32/f16/bf16 GGUF, float ONNX) is judged: ``max |logit diff|`` must
stay within ``max(1e-3, 16·eps(dtype))·max|logit|`` and the top-1 token must agree at 99% of the
positions that are not near ties (:func:`decisive_top1`). A quantized output (q8_0 ... q6_k GGUF,
int8 ONNX) is judged at the tensors level (bit-equal to the reference quantizer's encoding of the
merge); here its KL divergence, top-1 agreement and ``max |logit diff|`` against PEFT are reported,
not judged. The bound depends on the output only, never on the runtime that ran it, which is named.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lorasave.plan.patterns import check_peft_patterns
from lorasave.verify.report import VerifyReport

logger = logging.getLogger("lorasave.verify.run")

#: dtype of a float output -> its epsilon (the logit bound is ``max(1e-3, 16·eps)`` of max |logit|).
FLOAT_EPS: dict[str, float] = {"f32": 2.0**-23, "float32": 2.0**-23, "f16": 2.0**-10, "float16": 2.0**-10, "bf16": 2.0**-7, "bfloat16": 2.0**-7}
#: Least share of positions, near ties left out, where a float output's top-1 token equals PEFT's.
MIN_TOP1 = 0.99


def logit_bound(dtype: str) -> float:
    """``max |logit diff|`` allowed, as a fraction of max |logit|, for a float output of ``dtype``."""
    return max(1e-3, 16 * FLOAT_EPS[dtype])


def output_precision(command: str | None, settings: dict[str, Any], base_dtype: str) -> str | None:
    """The float dtype the output's weights are stored in (``"f32"``...), or None for a quantized output."""
    if command in ("gguf", "gguf-adapter"):
        t = str(settings.get("type"))
        return t if t in FLOAT_EPS else None
    if command == "adapter":  # "as-is" keeps the source adapter's tensors
        dtype = str(settings.get("dtype") or "").replace("torch.", "")
        return dtype if dtype in FLOAT_EPS else "f32"
    if settings.get("save_method") not in (None, "merged_16bit"):  # bitsandbytes 4-bit or compressed-tensors
        return None
    if command == "onnx-adapter":  # on a quantized ONNX base (``settings`` then carry ``base_quantize``): reported
        return None if settings.get("base_quantize") else str(settings.get("dtype") or "float32")
    if command == "onnx":
        return None if settings.get("quantize") else str(settings.get("dtype") or "float32").replace("torch.", "")
    dtype = str(settings.get("dtype") or "auto").replace("torch.", "")
    return dtype if dtype in FLOAT_EPS else base_dtype


FIXED_IDS = [1, 17, 42, 7, 99, 3, 64, 28, 5, 11, 80, 33, 2, 56, 19, 70]
TEXT = "The quick brown fox jumps over the lazy dog. Verify: 1, 2, 3."


def _fits(out: Path, ckpt: Any) -> bool:
    """Base + PEFT model + output in float32, twice over, against the free memory."""
    need = 4 * 2 * sum(int(torch.Size(e.shape).numel()) for e in ckpt.tensors.values()) + sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return True
    return need * 2 <= free


def _ids(out: Path, vocab: int) -> torch.Tensor:
    try:
        from lorasave.sources.hf_load import load_tokenizer

        ids = load_tokenizer(out)(TEXT, return_tensors="pt")["input_ids"]
    except Exception:  # no tokenizer in the output: fixed ids
        ids = torch.tensor([FIXED_IDS])
    return ids % vocab


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No "Loading weights" bars or FutureWarnings from transformers while verify loads models."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def check_logits(out: Path, manifest: dict[str, Any], report: VerifyReport, base: Any, adapters: Any) -> None:
    """Logits of OUT (transformers, llama.cpp or transformers' GGUF loader, onnxruntime) against base +
    adapter(s) under PEFT in float32: judged for float outputs, reported for quantized ones (module docstring).

    Raises:
        SourceNotFoundError: the sources are gone (pass ``base`` / ``adapters``).
        LlamaCppNotInstalledError: a GGUF LoRA adapter without the llama.cpp runtime.
    """
    from lorasave.formats.bnb import preload_bnb

    preload_bnb()  # before transformers/PEFT import it: no Hub kernel is fetched (formats.bnb.preload_bnb)
    from peft import PeftModel

    from lorasave.sources.hf_load import load_causal_lm
    from lorasave.verify.sources import live_adapter_unsaved, sources

    command = manifest.get("command")
    settings = manifest.get("settings", {})
    if command not in ("merge", "gguf", "gguf-adapter", "onnx", "onnx-adapter", "adapter"):
        report.skipped = f"logits: nothing to compare for a {command!r} output"
        return
    ckpt, ads, weights = sources(out, manifest, base, adapters)
    if live_adapter_unsaved(manifest, adapters):
        report.skipped = "logits: the adapter lived in a PeftModel and was not saved: pass --adapter DIR (model.save_pretrained(DIR)) to compare"
        return
    if any(w != 1.0 for w in weights):
        report.skipped = "logits: weighted adapter combinations are not compared"
        return
    if not _fits(out, ckpt):
        report.skipped = "logits: base, PEFT model and output do not fit the free memory"
        return
    base_dtype = {"BF16": "bf16", "F16": "f16"}.get(max(_dtype_bytes(ckpt).items(), key=lambda kv: kv[1], default=("F32", 0))[0], "f32")
    precision = output_precision(command, settings, base_dtype)
    with torch.no_grad(), _quiet_transformers():
        model = load_causal_lm(ckpt.root, dtype=torch.float32)
        module_names = [n for n, _ in model.named_modules()]
        for ad in ads:  # PEFT matches these with Python's re, uninterruptibly: try them first under a budget
            check_peft_patterns(ad.config, module_names, source=ad.root / "adapter_config.json")
        names = [f"a{i}" for i in range(len(ads))]
        peft = PeftModel.from_pretrained(model, ads[0].root, adapter_name=names[0]) if ads else model  # no adapter: the base as it is
        for n, ad in zip(names[1:], ads[1:], strict=True):
            peft.load_adapter(ad.root, adapter_name=n)
        if len(names) > 1:
            peft.base_model.set_adapter(names)
        peft.eval()
        vocab = int(model.get_output_embeddings().weight.shape[0])
        if command == "gguf":  # Gemma 3's token_embd may be cut to the tokenizer's size (gguf_vocab.embedding_rows)
            vocab = min(vocab, _gguf_n_vocab(out, manifest))
        ids = _ids(out, vocab)
        ref = peft(input_ids=ids).logits.float()
        del peft, model
        if command == "onnx":
            from lorasave.formats.onnx.run import OnnxDecoder

            dec = OnnxDecoder(out)
            got_np, _ = dec(ids.numpy(), torch.ones_like(ids).numpy(), dec.empty_past(ids.shape[0]))
            got = torch.from_numpy(got_np)
            report.logits_runtime = "onnxruntime"
        elif command == "onnx-adapter":  # the ONNX base with the adapter active in onnxruntime
            from lorasave.verify.onnx_adapter import onnx_adapter_logits

            got, report.logits_runtime = onnx_adapter_logits(out, manifest, ckpt.root, ids)
        elif command == "adapter":  # PEFT with the adapter as saved against PEFT with the source adapter
            from lorasave.verify.sources import adapter_output_logits

            got = adapter_output_logits(ckpt.root, out, ids)
            report.logits_runtime = "transformers"
        elif command in ("gguf", "gguf-adapter"):
            got, runtime = _gguf_logits(out, manifest, ids) if command == "gguf" else _gguf_adapter_logits(out, manifest, ckpt.root, ids)
            report.logits_runtime = runtime
        else:
            loaded = load_causal_lm(out, dtype=torch.float32).eval()
            got = loaded(input_ids=ids).logits.float()
            report.logits_runtime = "transformers"
    got, ref = got[..., :vocab], ref[..., :vocab]
    diff = float((got - ref).abs().max())
    scale = float(ref.abs().max())
    report.logits_max_diff, report.logits_scale = diff, scale
    report.top1_agreement = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    logp_ref, logp_got = torch.log_softmax(ref.double(), -1), torch.log_softmax(got.double(), -1)
    report.logits_kl = float((logp_ref.exp() * (logp_ref - logp_got)).sum(-1).mean())
    report.logits_judged = precision is not None
    if precision is None:
        return
    rel = logit_bound(precision)
    report.logits_limit = rel * scale
    decisive = decisive_top1(ref, got, min(rel, NEAR_TIE) * scale)
    if decisive < MIN_TOP1 or diff > rel * scale:
        report.fail(
            "logits",
            f"max |logit diff| {diff:.3g} (limit {rel:g}·{scale:.3g} for {precision}), top-1 agreement {decisive:.3f} where not a near tie (limit {MIN_TOP1})",
            tensors=0,
        )


def _dtype_bytes(ckpt: Any) -> dict[str, int]:
    """Safetensors dtype name -> bytes of the base's tensors."""
    out: dict[str, int] = {}
    for t in ckpt.tensors.values():
        name = getattr(getattr(t, "dtype", None), "name", "F32")
        out[name] = out.get(name, 0) + int(getattr(t, "nbytes", 0))
    return out


#: A position whose reference top-1 leads the output's choice by at most twice this fraction of
#: max |logit| is a near tie, for types without a logit bound (q4..q6).
NEAR_TIE = 5e-2


def decisive_top1(ref: torch.Tensor, got: torch.Tensor, tol: float) -> float:
    """Top-1 agreement of ``got`` with ``ref`` (both (..., vocab) float32), not counting near ties.

    A position where the argmaxes differ but the reference's logit for its own top-1 exceeds its
    logit for ``got``'s top-1 by at most ``2 * tol`` is counted as agreeing: with every logit within
    ``tol`` of the reference, that flip is within the allowed error (random tiny models are full of
    such near ties; real models rarely are).
    """
    want, chosen = ref.argmax(-1, keepdim=True), got.argmax(-1, keepdim=True)
    margin = (ref.gather(-1, want) - ref.gather(-1, chosen)).squeeze(-1)  # (...,) >= 0
    return float((margin <= 2 * tol).float().mean())


def _gguf_n_vocab(out: Path, manifest: dict[str, Any]) -> int:
    """Tokens in OUT's GGUF file (``tokenizer.ggml.tokens``; rows of its ``token_embd``)."""
    from lorasave.formats.gguf.read import open_gguf

    gguf_file = out / next(n for n in manifest.get("files", {}) if n.endswith(".gguf"))
    tokens = open_gguf(gguf_file).fields.get("tokenizer.ggml.tokens")
    return len(tokens.data) if tokens is not None else 1 << 62


def _llama_cpp_logits(gguf_file: Path, ids: torch.Tensor, loras: list[tuple[Path, float]] | None = None) -> torch.Tensor:
    """llama.cpp's logits (batch, seq, vocab) float32 for ``ids`` (batch, seq), one sequence at a time."""
    from lorasave.runtimes.llama_cpp import lib as llama_cpp

    with llama_cpp.LlamaCppModel(gguf_file, loras=loras or (), n_ctx=max(512, int(ids.shape[1]))) as model:
        return torch.stack([torch.from_numpy(model.logits(row.tolist())) for row in ids])  # each row (seq, vocab)


def _gguf_adapter_logits(out: Path, manifest: dict[str, Any], base_dir: Path, ids: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Logits of OUT's GGUF LoRA adapter applied (scale 1) by llama.cpp to an f32 GGUF of the base.

    The base GGUF is written by ``export_gguf(base, [])`` into a hidden folder beside OUT and
    removed afterwards. Needs the llama.cpp runtime (transformers cannot load GGUF adapters).

    Returns:
        ``(logits (batch, seq, vocab) float32, "llama.cpp")``.

    Raises:
        LlamaCppNotInstalledError: the runtime is not installed (the message names the command).
    """
    import shutil
    import tempfile

    from lorasave.formats.gguf.model import write_gguf_file
    from lorasave.formats.gguf.quant import GgufType
    from lorasave.runtimes.llama_cpp import lib as llama_cpp

    llama_cpp.require()
    lora = out / next(n for n in manifest.get("files", {}) if n.endswith(".gguf"))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.lorasave-verify-", dir=out.parent))
    export_log = logging.getLogger("lorasave.formats.gguf.model")
    level = export_log.level
    export_log.setLevel(logging.WARNING)  # the helper base file's notes are not the user's business
    try:
        base_gguf = write_gguf_file(base_dir, tmp / "base", GgufType.F32)
        logits = _llama_cpp_logits(base_gguf, ids, loras=[(lora, 1.0)])
    finally:
        export_log.setLevel(level)
        shutil.rmtree(tmp, ignore_errors=True)
    return logits, "llama.cpp"


def _gguf_logits(out: Path, manifest: dict[str, Any], ids: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Logits of OUT's GGUF file for ``ids`` (batch, seq): in llama.cpp when its runtime is installed
    (``lorasave.runtimes.llama_cpp.lib``), else through transformers' GGUF loader (which dequantizes to float32).

    Returns:
        ``(logits (batch, seq, vocab) float32, "llama.cpp" | "transformers")``.
    """
    from lorasave.runtimes.llama_cpp import lib as llama_cpp

    gguf_file = out / next(n for n in manifest.get("files", {}) if n.endswith(".gguf"))
    if llama_cpp.available():
        return _llama_cpp_logits(gguf_file, ids), "llama.cpp"
    from lorasave.sources.hf_load import load_causal_lm

    logger.info("llama.cpp runtime not installed (install it with: %s): GGUF logits come from transformers' GGUF loader", llama_cpp.INSTALL_COMMAND)
    model = load_causal_lm(out, gguf_file=gguf_file.name, dtype=torch.float32).eval()
    return model(input_ids=ids).logits.float(), "transformers"
