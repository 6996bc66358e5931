"""``lorasave verify OUT``: check an output against its manifest and its sources.

- ``files``: every file's sha256 and size against ``lorasave.json``.
- ``tensors`` (default): every tensor of OUT against an independent recomputation from the
  sources named in the manifest. It deliberately does not reuse the merge path: a LoRA-merged
  weight ``W'`` is probed with random vectors ``x`` and ``W'·x`` is compared with
  ``W0·x + s·B(A·x)`` (the factors applied to the vector, never multiplied into a matrix),
  within a bound derived from the output dtype: ``|W'·x − y| ≤ 2·eps·(|W'|·|x|) + 1e-6·(|W0|·|x| + |s·B|·|A·x|)``
  (one rounding of each output element, plus float32 accumulation). Tensors no adapter changed
  must equal the base tensor cast to the output dtype, bit for bit.

Probed recipes (see ``verify_probes``): LoRA (rsLoRA, patterns, GPT-2 Conv1D, embeddings, conv,
weighted sums), DoRA, IA3, modules_to_save replacements, bitsandbytes bases (dequantized W0), and
GGUF outputs (read back, dequantized, renamed, Q/K un-permuted). LoHa/LoKr, trainable tokens,
lora_bias, MoE experts and re-quantized outputs are reported as not probed, never as passed.
``logits``: OUT's logits against base + adapter(s) under PEFT (fp32) on a fixed text.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointFormatError, LorasaveError, SourceNotFoundError
from .jsonio import load_json
from .paths import check_relative_entry
from .patterns import check_peft_patterns
from .printable import escape

logger = logging.getLogger(__name__)


class Level(enum.Enum):
    """How deep ``verify`` checks."""

    FILES = "files"
    TENSORS = "tensors"
    LOGITS = "logits"


class VerificationError(LorasaveError, ValueError):
    """An output does not match its manifest or its sources.

    Attributes:
        failures: ``[(file or tensor, what is wrong)]``.
    """

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None, failures: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message, path=path)
        self.failures = list(failures or [])


@dataclass
class VerifyReport:
    """The outcome of ``verify``.

    Attributes:
        output: the folder checked.
        level: ``"files"`` or ``"tensors"``.
        files_checked: files whose sha256 matched.
        tensors_exact: tensors equal to the base's bit for bit.
        tensors_probed: LoRA-merged tensors that passed the probe.
        not_probed: tensors whose recipe the probe does not cover, with the reason.
        failures: ``[(name, what is wrong)]``; empty when the output is correct.
        max_probe_error: largest ``|W'·x − y| / bound`` seen (≤ 1 passes).
        logits_max_diff / logits_scale / top1_agreement: the logits level's findings.
        logits_runtime: what ran a GGUF output at the logits level (``"llama.cpp"`` or ``"transformers"``).
    """

    output: str
    level: str
    files_checked: int = 0
    tensors_exact: int = 0
    tensors_probed: int = 0
    not_probed: dict[str, str] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    max_probe_error: float = 0.0
    logits_max_diff: float | None = None
    logits_scale: float | None = None
    top1_agreement: float | None = None
    logits_runtime: str | None = None
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        """No failure."""
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    def summary(self) -> str:
        """One line for humans."""
        if not self.ok:
            name, why = self.failures[0]
            return escape(f"FAILED {self.output}: {name}: {why} ({len(self.failures)} problem(s))")
        parts = [f"{self.files_checked} files match lorasave.json"]
        if self.level == Level.TENSORS.value:
            parts.append(f"{self.tensors_exact} tensors equal the base, {self.tensors_probed} merged tensors pass the probe")
            if self.not_probed:
                parts.append(f"{len(self.not_probed)} not probed")
        if self.top1_agreement is not None:
            where = f" in {self.logits_runtime}" if self.logits_runtime else ""
            parts.append(f"logits{where} within {self.logits_max_diff:.3g} of PEFT's, top-1 agreement {self.top1_agreement:.3f}")
        if self.skipped:
            parts.append(self.skipped)
        return escape(f"verified {self.output}: " + "; ".join(parts))


def _manifest(out: Path) -> dict[str, Any]:
    path = out / "lorasave.json"
    if not path.is_file():
        raise SourceNotFoundError(f"{out} has no lorasave.json; verify checks outputs lorasave wrote", path=out)
    manifest = load_json(path, hint="the output is damaged, run the merge again")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise CheckpointFormatError(
            f"{path}: not a lorasave manifest (expected an object with a files map); the output is damaged, run the merge again", path=path
        )
    for name in manifest.get("files", {}):
        check_relative_entry(name, path)  # an absolute or '..' entry would make verify read (and report on) files outside OUT
    return manifest


def _check_files(out: Path, manifest: dict[str, Any], report: VerifyReport) -> None:
    from .manifest import sha256_file

    for name, info in sorted(manifest.get("files", {}).items()):
        p = out / name
        if not p.is_file():
            report.failures.append((name, "missing"))
        elif p.stat().st_size != info.get("bytes"):
            report.failures.append((name, f"{p.stat().st_size} bytes, manifest says {info.get('bytes')}"))
        elif sha256_file(p) != info.get("sha256"):
            report.failures.append((name, "sha256 differs from lorasave.json (the file was modified or corrupted)"))
        else:
            report.files_checked += 1


def verify(
    output: str | os.PathLike[str],
    *,
    level: str | Level = Level.TENSORS,
    base: str | os.PathLike[str] | None = None,
    adapters: list[str | os.PathLike[str]] | None = None,
    seed: int = 0,
) -> VerifyReport:
    """Check OUT against ``lorasave.json`` and (tensors level) against an independent recomputation.

    Args:
        output: a folder lorasave wrote.
        level: ``"files"`` or ``"tensors"``.
        base, adapters: where the sources are now, when they moved since the merge.
        seed: seed of the random probe vectors.

    Returns:
        The report; ``report.ok`` tells whether everything matched.

    Raises:
        SourceNotFoundError: no ``lorasave.json``, or the sources are gone (pass ``base`` / ``adapters``).
        CheckpointFormatError: an unreadable manifest or output file.
        PatternError, PatternTimeoutError (logits level): an adapter regex PEFT would choke or hang on.
        UnsafePathError: ``lorasave.json`` lists a file that is absolute or contains ``..``.
    """
    from .options import parse_enum

    lvl = parse_enum(Level, level, "level")
    out = Path(output)
    manifest = _manifest(out)
    report = VerifyReport(str(out), lvl.value)
    _check_files(out, manifest, report)
    command = manifest.get("command")
    if lvl is Level.TENSORS and command == "merge":
        _check_tensors(out, manifest, report, base, adapters, seed)
    elif lvl is Level.TENSORS and command == "gguf":
        _check_gguf(out, manifest, report, base, adapters, seed)
    elif lvl is Level.LOGITS and not report.failures:
        _check_logits(out, manifest, report, base, adapters)
    return report


def _sources(out: Path, manifest: dict[str, Any], base: Any, adapters: Any) -> tuple[Any, list[Any], list[float]]:
    """The base checkpoint, the adapters and their weights named in the manifest (or given): ``verify_sources.sources``."""
    from .verify_sources import sources

    return sources(out, manifest, base, adapters)


class _Checker:
    """Checks written tensors (float32 views plus their error model) against :mod:`verify_probes` expectations."""

    def __init__(self, ckpt: Any, ads: list[Any], weights: list[float], reader: Any, report: VerifyReport, seed: int) -> None:
        from .architecture import ModuleKind, inspect_architecture
        from .verify_probes import expectations

        self.ckpt, self.reader, self.report = ckpt, reader, report
        self.exp = expectations(ads, weights)
        self.gen = torch.Generator().manual_seed(seed)
        arch = inspect_architecture(ckpt.config)
        self.transposed = lambda part: "lora_embedding_A" in part.keys or arch.kind_of(part.module) is ModuleKind.CONV1D_GPT2
        self.conv1d = lambda name: arch.kind_of(name.rsplit(".", 1)[0]) is ModuleKind.CONV1D_GPT2

    def check(self, name: str, w1: torch.Tensor, exact_dtype: torch.dtype | None, err: torch.Tensor | float, what: str = "") -> None:
        """One tensor. ``exact_dtype``: the dtype copies must equal bit for bit after a cast (None: within ``err``)."""
        from .verify_probes import base_tensor, ia3_error, probe

        rep = self.report
        e = self.exp.get(name)
        if e is not None and e.kind == "skip":
            rep.not_probed[name] = e.reason
            return
        if e is None or e.kind == "replace":
            if e is not None:
                assert e.replace is not None
                ad, key = e.replace
                w0, why = ad.tensor(key, self.reader), "differs from the adapter's full tensor (modules_to_save)"
            elif name in self.ckpt.tensors:
                w0, why = base_tensor(self.ckpt, name, self.reader), "differs from the base tensor, though no adapter changes it"
            else:
                rep.not_probed[name] = "not in the base (a tied tensor written separately)"
                return
            if exact_dtype is not None:
                good = w0.shape == w1.shape and torch.equal(w0.to(exact_dtype), w1)
            else:
                good = w0.shape == w1.shape and bool(((w1.float() - w0.float()).abs() <= _elem(err, w0) + 1e-30).all())
            if good:
                rep.tensors_exact += 1
            else:
                rep.failures.append((name, why + what))
            return
        if name not in self.ckpt.tensors:
            rep.not_probed[name] = "adapted tensor not in the base"
            return
        w0 = e.replace[0].tensor(e.replace[1], self.reader) if e.replace else base_tensor(self.ckpt, name, self.reader)
        if w0.shape != w1.shape:
            rep.failures.append((name, f"shape {tuple(w1.shape)}, expected {tuple(w0.shape)}{what}"))
            return
        if e.kind == "ia3":
            eps = err if isinstance(err, float) else float(err.max()) or 1e-30
            worst = ia3_error(w1, w0, e, self.conv1d(name), self.reader, eps)
            recipe = "W0 ⊙ l"
        else:
            shape = w0.shape
            flat = (lambda t: t.float().reshape(shape[0], -1)) if len(shape) != 1 else (lambda t: t.float().reshape(1, -1))
            rel = 1e-5 if e.kind == "dora" else 1e-6
            errm = flat(err) if isinstance(err, torch.Tensor) else 2 * err
            worst = probe(flat(w1), flat(w0), e, self.transposed, self.reader, self.gen, errm, rel)
            recipe = "W0·x + s·B(A·x)" if e.kind == "lora" else "m/||W0+s·BA|| ⊙ (W0·x + s·B(A·x))"
        rep.max_probe_error = max(rep.max_probe_error, worst)
        if not worst <= 1.0:
            rep.failures.append(
                (name, f"{e.kind}: W' differs from {recipe} by {worst:.1f}× the rounding bound (wrong scaling, rank, layout or corrupted bytes){what}")
            )
        else:
            rep.tensors_probed += 1


def _elem(err: torch.Tensor | float, w0: torch.Tensor) -> torch.Tensor | float:
    from .verify_probes import TINY

    return err if isinstance(err, torch.Tensor) else 2 * err * w0.float().abs() + TINY


def _check_tensors(out: Path, manifest: dict[str, Any], report: VerifyReport, base: Any, adapters: Any, seed: int) -> None:
    from .checkpoint import TensorReader
    from .safetensors_format import read_header

    settings = manifest.get("settings", {})
    ckpt, ads, weights = _sources(out, manifest, base, adapters)
    if settings.get("save_method") == "merged_4bit" or settings.get("merge_into") == "dequantized":
        report.not_probed["*"] = "re-quantized output or merge into a quantization round trip: files level only"
        return
    with TensorReader() as reader:
        checker = _Checker(ckpt, ads, weights, reader, report, seed)
        from .verify_probes import Expect
        from .verify_sources import live_unprobed

        checker.exp.update({n: Expect("skip", reason=why) for n, why in live_unprobed(manifest, adapters).items()})
        for shard in sorted(out.glob("*.safetensors")):
            for name, entry in read_header(shard).tensors.items():
                w1 = reader.read(entry)
                eps = torch.finfo(w1.dtype).eps if w1.dtype.is_floating_point else 0.0
                checker.check(name, w1, w1.dtype, float(eps))


def _check_gguf(out: Path, manifest: dict[str, Any], report: VerifyReport, base: Any, adapters: Any, seed: int) -> None:
    """GGUF outputs: read back, dequantize, rename, un-permute, then probe (bound per GGML type)."""
    from .checkpoint import TensorReader
    from .verify_probes import TINY, block_error, ggml_eps, norm_shift, q8_0_error, read_gguf

    ckpt, ads, weights = _sources(out, manifest, base, adapters)
    files = [out / n for n in manifest.get("files", {}) if n.endswith(".gguf")]
    with TensorReader() as reader:
        checker = _Checker(ckpt, ads, weights, reader, report, seed)
        for path in files:
            if not path.is_file():
                continue
            tensors, unknown = read_gguf(path, ckpt)
            for g in unknown:
                report.not_probed[g] = "GGUF tensor with no base tensor name"
            for name, (w, qtype, gname) in tensors.items():
                eps = ggml_eps(qtype)
                if eps is None and qtype.name == "Q8_0":
                    err: torch.Tensor | float = q8_0_error(w)
                elif eps is None and (block := block_error(w, qtype.name)) is not None:
                    err = block
                elif eps is None:
                    report.not_probed[name] = f"GGML type {qtype.name} not probed"
                    continue
                else:
                    err = eps
                if (shift := norm_shift(ckpt.config, name)) and not isinstance(err, torch.Tensor):
                    err = 2 * err * (w.abs() + abs(shift)) + TINY  # the export rounded w + shift
                checker.check(name, w, None, err, f" (GGUF {gname}, {qtype.name})")


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
        from .hf_load import load_tokenizer

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


def _check_logits(out: Path, manifest: dict[str, Any], report: VerifyReport, base: Any, adapters: Any) -> None:
    """Logits of OUT (transformers, gguf loader, or onnxruntime) against base + adapter(s) under PEFT, fp32."""
    from peft import PeftModel

    from .hf_load import load_causal_lm

    command = manifest.get("command")
    settings = manifest.get("settings", {})
    if command not in ("merge", "gguf", "gguf-adapter", "onnx", "adapter"):
        report.skipped = f"logits: nothing to compare for a {command!r} output"
        return
    ckpt, ads, weights = _sources(out, manifest, base, adapters)
    from .verify_sources import live_adapter_unsaved

    if live_adapter_unsaved(manifest, adapters):
        report.skipped = "logits: the adapter lived in a PeftModel and was not saved: pass --adapter DIR (model.save_pretrained(DIR)) to compare"
        return
    if any(w != 1.0 for w in weights):
        report.skipped = "logits: weighted adapter combinations are not compared"
        return
    if not _fits(out, ckpt):
        report.skipped = "logits: base, PEFT model and output do not fit the free memory"
        return
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
        sixteen = True
        if command == "onnx":
            from .onnx_run import OnnxDecoder

            dec = OnnxDecoder(out)
            got_np, _ = dec(ids.numpy(), torch.ones_like(ids).numpy(), dec.empty_past(ids.shape[0]))
            got = torch.from_numpy(got_np)
            sixteen = settings.get("dtype") != "float32" or bool(settings.get("quantize"))
        elif command == "adapter":  # PEFT with the adapter as saved against PEFT with the source adapter
            from .verify_sources import adapter_output_logits

            got = adapter_output_logits(ckpt.root, out, ids)
            sixteen = str(settings.get("dtype")) not in ("float32", "as-is")
        elif command in ("gguf", "gguf-adapter"):
            got, runtime = _gguf_logits(out, manifest, ids) if command == "gguf" else _gguf_adapter_logits(out, manifest, ckpt.root, ids)
            report.logits_runtime = runtime
            limits = GGUF_LOGIT_LIMITS.get(str(settings.get("type")), (float("inf"), 0.5))
        else:
            got = load_causal_lm(out, dtype=torch.float32).eval()(input_ids=ids).logits.float()
            sixteen = str(settings.get("dtype")) not in ("float32", "torch.float32")
    got, ref = got[..., :vocab], ref[..., :vocab]
    diff = float((got - ref).abs().max())
    scale = float(ref.abs().max())
    top1 = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    report.logits_max_diff, report.logits_scale, report.top1_agreement = diff, scale, top1
    rel, min_top1 = limits if command in ("gguf", "gguf-adapter") else (2e-2 if sixteen else 1e-4, 0.99)
    decisive = decisive_top1(ref, got, min(rel, NEAR_TIE) * scale)
    if decisive < min_top1 or diff > rel * scale:
        report.failures.append(
            ("logits", f"max |logit diff| {diff:.3g} (limit {rel:g}·{scale:.3g}), top-1 agreement {decisive:.3f} where not a near tie (limit {min_top1})")
        )


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


#: GGUF ``type`` -> (max |logit diff| as a fraction of max |logit|, least top-1 agreement) against
#: PEFT in float32. f32/f16 follow issue 5's bound for llama.cpp; bf16 and q8_0 round every weight
#: to 8 bits of mantissa or 8-bit blocks; the 4..6-bit types only promise the top-1 bound.
GGUF_LOGIT_LIMITS: dict[str, tuple[float, float]] = {
    "f32": (1e-3, 0.99),
    "f16": (2e-2, 0.99),
    "bf16": (5e-2, 0.95),
    "q8_0": (5e-2, 0.95),
    **{t: (float("inf"), 0.8) for t in ("q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1", "q4_k_m", "q4_k_s", "q4_0", "q4_1")},
}


def _gguf_n_vocab(out: Path, manifest: dict[str, Any]) -> int:
    """Tokens in OUT's GGUF file (``tokenizer.ggml.tokens``; rows of its ``token_embd``)."""
    import gguf

    gguf_file = out / next(n for n in manifest.get("files", {}) if n.endswith(".gguf"))
    return len(gguf.GGUFReader(gguf_file).fields["tokenizer.ggml.tokens"].data)


def _llama_cpp_logits(gguf_file: Path, ids: torch.Tensor, loras: list[tuple[Path, float]] | None = None) -> torch.Tensor:
    """llama.cpp's logits (batch, seq, vocab) float32 for ``ids`` (batch, seq), one sequence at a time."""
    from . import llama_cpp

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

    from . import llama_cpp
    from .gguf_export import export_gguf

    llama_cpp.require()
    lora = out / next(n for n in manifest.get("files", {}) if n.endswith(".gguf"))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.lorasave-verify-", dir=out.parent))
    export_log = logging.getLogger("lorasave.gguf_export")
    level = export_log.level
    export_log.setLevel(logging.WARNING)  # the helper base file's notes are not the user's business
    try:
        base_gguf = export_gguf(base_dir, [], tmp / "base", type="f32", modelfile=False).gguf_file
        logits = _llama_cpp_logits(base_gguf, ids, loras=[(lora, 1.0)])
    finally:
        export_log.setLevel(level)
        shutil.rmtree(tmp, ignore_errors=True)
    return logits, "llama.cpp"


def _gguf_logits(out: Path, manifest: dict[str, Any], ids: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Logits of OUT's GGUF file for ``ids`` (batch, seq): in llama.cpp when its runtime is installed
    (``lorasave.llama_cpp``), else through transformers' GGUF loader (which dequantizes to float32).

    Returns:
        ``(logits (batch, seq, vocab) float32, "llama.cpp" | "transformers")``.
    """
    from . import llama_cpp

    gguf_file = out / next(n for n in manifest.get("files", {}) if n.endswith(".gguf"))
    if llama_cpp.available():
        return _llama_cpp_logits(gguf_file, ids), "llama.cpp"
    from .hf_load import load_causal_lm

    logger.info("llama.cpp runtime not installed (install it with: %s): GGUF logits come from transformers' GGUF loader", llama_cpp.INSTALL_COMMAND)
    model = load_causal_lm(out, gguf_file=gguf_file.name, dtype=torch.float32).eval()
    return model(input_ids=ids).logits.float(), "transformers"
