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
GGUF outputs (``verify_gguf``: float tensors probed, quantized ones bit-equal to the reference
quantizer's encoding of the merge; GGUF LoRA adapters probed pair by pair). Adapter outputs
(``lorasave adapter``) must equal the source adapter's tensors cast to their dtype, bit for bit.
LoHa/LoKr, trainable tokens, lora_bias, MoE experts, re-quantized bitsandbytes outputs and ONNX
initializers are reported as not checkable, never as passed. ONNX LoRA adapters (``onnx-adapter``)
are probed pair by pair (``verify_onnx_adapter``).
``logits`` (``verify_judge``): OUT's logits against base + adapter(s) under PEFT (fp32) on a fixed text.

Every level reports its counts (``verify_report``); a file whose size or sha256 differs from
``lorasave.json`` stops the check there: a file that is not what lorasave wrote is not probed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from lorasave.errors import CheckpointFormatError, SourceNotFoundError
from lorasave.util.jsonio import load_json
from lorasave.util.paths import check_relative_entry
from lorasave.verify.judge import NEAR_TIE, check_logits, decisive_top1
from lorasave.verify.report import Level, VerificationError, VerifyReport

__all__ = ["NEAR_TIE", "Level", "VerificationError", "VerifyReport", "decisive_top1", "verify"]

logger = logging.getLogger(__name__)


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
    from lorasave.pipeline.manifest import sha256_file

    for name, info in sorted(manifest.get("files", {}).items()):
        report.files_total += 1
        p = out / name
        if not p.is_file():
            report.fail(name, "missing", tensors=0)
        elif p.stat().st_size != info.get("bytes"):
            report.fail(name, f"{p.stat().st_size} bytes, manifest says {info.get('bytes')}", tensors=0)
        elif sha256_file(p) != info.get("sha256"):
            report.fail(name, "sha256 differs from lorasave.json (the file was modified or corrupted)", tensors=0)
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
        level: ``"files"``, ``"tensors"`` or ``"logits"``.
        base, adapters: where the sources are now, when they moved since the merge.
        seed: seed of the random probe vectors.

    Returns:
        The report; ``report.ok`` tells whether everything matched, ``report.checked`` whether the
        level compared anything at all (the CLI exits 5 when it did not).

    Raises:
        SourceNotFoundError: no ``lorasave.json``, or the sources are gone (pass ``base`` / ``adapters``).
        CheckpointFormatError: an unreadable manifest or output file (a malformed GGUF file included).
        PatternError, PatternTimeoutError (logits level): an adapter regex PEFT would choke or hang on.
        UnsafePathError: ``lorasave.json`` lists a file that is absolute or contains ``..``.
        LlamaCppNotInstalledError: ``logits`` of a GGUF LoRA adapter without the llama.cpp runtime.
    """
    from lorasave.util.options import parse_enum

    lvl = parse_enum(Level, level, "level")
    out = Path(output)
    manifest = _manifest(out)
    report = VerifyReport(str(out), lvl.value)
    _check_files(out, manifest, report)
    if report.failures:
        if lvl is not Level.FILES:
            report.skipped = f"{lvl.value} level not run: a file is not what lorasave wrote"
        return report
    command = manifest.get("command")
    if lvl is Level.TENSORS and command == "adapter":
        _check_adapter(out, manifest, report, adapters)
    elif lvl is Level.TENSORS and command == "onnx-adapter":
        from lorasave.verify.onnx_adapter import check_onnx_adapter

        _, ads, _ = _sources(out, manifest, base, adapters)
        check_onnx_adapter(out, manifest, report, ads, seed)
    elif lvl is Level.TENSORS and command == "onnx":
        report.skipped = "ONNX initializers are not compared with the merge yet (use --level logits)"
    elif lvl is Level.TENSORS and command in ("merge", "gguf", "gguf-adapter"):
        _check_tensors(out, manifest, report, base, adapters, seed)
    elif lvl is Level.TENSORS:
        report.skipped = f"no tensors level for a {command!r} output"
    elif lvl is Level.LOGITS:
        check_logits(out, manifest, report, base, adapters)
    return report


def _sources(out: Path, manifest: dict[str, Any], base: Any, adapters: Any) -> tuple[Any, list[Any], list[float]]:
    """The base checkpoint, the adapters and their weights named in the manifest (or given): ``verify_sources.sources``."""
    from lorasave.verify.sources import sources

    return sources(out, manifest, base, adapters)


class _Checker:
    """Checks written tensors (float32 views plus their error model) against :mod:`verify_probes` expectations."""

    def __init__(self, ckpt: Any, ads: list[Any], weights: list[float], reader: Any, report: VerifyReport, seed: int) -> None:
        from lorasave.plan.merge_plan import adapter_renames
        from lorasave.sources.architecture import ModuleKind, inspect_architecture
        from lorasave.verify.probes import expectations

        self.ckpt, self.reader, self.report, self.weights = ckpt, reader, report, weights
        arch = inspect_architecture(ckpt.config)
        shapes = {n: tuple(e.shape) for n, e in ckpt.tensors.items()}
        renames = adapter_renames(ckpt.config, ads, shapes, arch)  # adapter module names -> checkpoint names
        self.exp = {renames.get(n, n): e for n, e in expectations(ads, weights).items()}
        self.gen = torch.Generator().manual_seed(seed)
        self.transposed = lambda part: "lora_embedding_A" in part.keys or arch.kind_of(part.module) is ModuleKind.CONV1D_GPT2
        self.conv1d = lambda name: arch.kind_of(name.rsplit(".", 1)[0]) is ModuleKind.CONV1D_GPT2
        self.expert_prefixes = _expert_prefixes(ads, renames)

    def _expert(self, name: str) -> bool:
        return any(name.startswith(p) for p in self.expert_prefixes)

    def check(self, name: str, w1: torch.Tensor, exact_dtype: torch.dtype | None, err: torch.Tensor | float, what: str = "") -> None:
        """One tensor. ``exact_dtype``: the dtype copies must equal bit for bit after a cast (None: within ``err``)."""
        from lorasave.verify.probes import base_tensor, ia3_error, probe

        rep = self.report
        e = self.exp.get(name)
        if e is not None and e.kind == "skip":
            rep.not_checkable(name, e.reason)
            return
        if e is None or e.kind == "replace":
            if e is not None:
                assert e.replace is not None
                ad, key = e.replace
                w0, why = ad.tensor(key, self.reader), "differs from the adapter's full tensor (modules_to_save)"
            elif name in self.ckpt.tensors:
                w0, why = base_tensor(self.ckpt, name, self.reader), "differs from the base tensor, though no adapter changes it"
            else:
                rep.not_checkable(name, "not in the base (a tied tensor written separately)")
                return
            if exact_dtype is not None:
                good = w0.shape == w1.shape and torch.equal(w0.to(exact_dtype), w1)
            else:
                good = w0.shape == w1.shape and bool(((w1.float() - w0.float()).abs() <= _elem(err, w0) + 1e-30).all())
            if good:
                rep.exact()
            elif e is None and self._expert(name):
                rep.not_checkable(name, "MoE experts changed by a target_parameters LoRA not probed")
            else:
                rep.fail(name, why + what)
            return
        if name not in self.ckpt.tensors:
            rep.not_checkable(name, "adapted tensor not in the base")
            return
        w0 = e.replace[0].tensor(e.replace[1], self.reader) if e.replace else base_tensor(self.ckpt, name, self.reader)
        if w0.shape != w1.shape:
            rep.fail(name, f"shape {tuple(w1.shape)}, expected {tuple(w0.shape)}{what}")
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
        if not worst <= 1.0:
            rep.max_probe_error = max(rep.max_probe_error, worst)
            rep.fail(name, f"{e.kind}: W' differs from {recipe} by {worst:.1f}× the rounding bound (wrong scaling, rank, layout or corrupted bytes){what}")
        else:
            rep.probed(worst)


def _expert_prefixes(ads: list[Any], renames: dict[str, str]) -> tuple[str, ...]:
    """``"<module>."`` of every module whose parameters a ``target_parameters`` LoRA changes (its checkpoint
    tensors, fused or per expert, start with it)."""
    prefixes = []
    for ad in ads:
        params = ad.config.get("target_parameters") or []
        owners = {str(p).rpartition(".")[0] for p in params if isinstance(p, str)}
        for module in ad.parts:
            m = module
            while m.endswith(".base_layer"):
                m = m.removesuffix(".base_layer")
            if any(o and (m == o or m.endswith("." + o)) for o in owners):
                prefixes.append(renames.get(m, m) + ".")
    return tuple(dict.fromkeys(prefixes))


def _elem(err: torch.Tensor | float, w0: torch.Tensor) -> torch.Tensor | float:
    from lorasave.verify.probes import TINY

    return err if isinstance(err, torch.Tensor) else 2 * err * w0.float().abs() + TINY


def _check_tensors(out: Path, manifest: dict[str, Any], report: VerifyReport, base: Any, adapters: Any, seed: int) -> None:
    """Merged safetensors, merged GGUF and GGUF LoRA adapter outputs against their sources."""
    from lorasave.formats.safetensors.header import read_header
    from lorasave.sources.checkpoint import TensorReader

    command = manifest.get("command")
    settings = manifest.get("settings", {})
    ckpt, ads, weights = _sources(out, manifest, base, adapters)
    if command == "gguf-adapter":
        from lorasave.verify.gguf import check_gguf_adapter

        check_gguf_adapter(out, manifest, report, ckpt, ads, seed)
        return
    keep_layout = settings.get("base_layout") is not None  # a quantized base's own layout (fp8_block on FP8, mxfp4)
    if (settings.get("save_method") not in (None, "merged_16bit") and not keep_layout) or settings.get("merge_into") == "dequantized":
        report.skipped = "re-quantized output or merge into a quantization round trip: its tensors are not checkable (files level only)"
        return
    with TensorReader() as reader:
        from lorasave.verify.probes import Expect
        from lorasave.verify.sources import live_unprobed

        checker = _Checker(ckpt, ads, weights, reader, report, seed)
        checker.exp.update({n: Expect("skip", reason=why) for n, why in live_unprobed(manifest, adapters).items()})
        if command == "gguf":
            from lorasave.verify.gguf import check_gguf

            check_gguf(out, manifest, report, checker)
            return
        raw = _raw_entries(ckpt) if keep_layout else {}
        for shard in sorted(out.glob("*.safetensors")):
            for name, entry in read_header(shard).tensors.items():
                if keep_layout and _quantized_piece(ckpt, name):
                    _check_kept(name, entry, raw.get(name), reader, report)
                    continue
                w1 = reader.read(entry)
                eps = torch.finfo(w1.dtype).eps if w1.dtype.is_floating_point else 0.0
                checker.check(name, w1, w1.dtype, float(eps))


def _raw_entries(ckpt: Any) -> dict[str, Any]:
    """The base's safetensors entries by name, before quantized weights were folded (codes, scales)."""
    from lorasave.formats.safetensors.header import read_header

    entries: dict[str, Any] = {}
    for f in ckpt.weight_files:
        entries.update(read_header(f).tensors)
    return entries


def _quantized_piece(ckpt: Any, name: str) -> bool:
    """Whether an output tensor of a kept-layout output is quantized data (FP8 values, scales, MXFP4 blocks)."""
    from lorasave.formats.quant_bases import QUANTIZED_TYPES

    return isinstance(ckpt.tensors.get(name), QUANTIZED_TYPES) or name not in ckpt.tensors


def _check_kept(name: str, entry: Any, src: Any, reader: Any, report: VerifyReport) -> None:
    """A quantized tensor of a kept-layout output: bit-equal to the base's own bytes, or re-quantized (not checkable)."""
    if src is not None and src.dtype == entry.dtype and src.shape == entry.shape and torch.equal(_bytes(reader.read(src)), _bytes(reader.read(entry))):
        report.exact()
    else:
        report.not_checkable(name, "re-quantized from the merge in the base's layout")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _check_adapter(out: Path, manifest: dict[str, Any], report: VerifyReport, adapters: Any) -> None:
    """An adapter output (``lorasave adapter``): every tensor equal to the source adapter's, cast to its dtype."""
    from lorasave.sources.adapter import load_adapter
    from lorasave.sources.checkpoint import TensorReader

    recorded = [a.get("path") for a in (manifest.get("sources", {}).get("adapters") or []) if isinstance(a, dict)]
    paths = list(adapters or recorded)
    if len(paths) != 1 or not paths[0]:
        report.skipped = "no source adapter recorded in lorasave.json to compare the tensors with (pass --adapter)"
        return
    allow_pickle = bool(manifest.get("settings", {}).get("allow_pickle"))
    src, got = load_adapter(paths[0], allow_pickle=allow_pickle), load_adapter(out, allow_pickle=False)
    src_keys = set(src.keys())
    with TensorReader() as reader:
        for key in got.keys():
            if key not in src_keys:
                report.fail(key, "not in the source adapter")
                continue
            w1, w0 = got.tensor(key, reader), src.tensor(key, reader)
            if w0.shape == w1.shape and torch.equal(w0.to(w1.dtype), w1):
                report.exact()
            else:
                report.fail(key, f"differs from the source adapter's tensor cast to {w1.dtype} ({paths[0]})")
    for key in sorted(src_keys - set(got.keys())):
        report.fail(key, "in the source adapter but missing from the output")
