"""``lorasave verify OUT``: check an output against its manifest and its sources.

- ``files``: every file's sha256 and size against ``lorasave.json``.
- ``tensors`` (default): every tensor of OUT against an independent recomputation from the
  sources named in the manifest. It deliberately does not reuse the merge path: a LoRA-merged
  weight ``W'`` is probed with random vectors ``x`` and ``W'·x`` is compared with
  ``W0·x + s·B(A·x)`` (the factors applied to the vector, never multiplied into a matrix),
  within a bound derived from the output dtype: ``|W'·x − y| ≤ 2·eps·(|W'|·|x|) + 1e-6·(|W0|·|x| + |s·B|·|A·x|)``
  (one rounding of each output element, plus float32 accumulation). Tensors no adapter changed
  must equal the base tensor cast to the output dtype, bit for bit.

Probed recipes: LoRA (rsLoRA, rank/alpha patterns, GPT-2 Conv1D, embeddings, conv, weighted
combinations) on plain bases. Others (DoRA, IA3, LoHa/LoKr, trainable tokens, modules_to_save,
MoE experts, quantized bases) are reported as not probed, never as passed.
"""

from __future__ import annotations

import enum
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointFormatError, LorasaveError, SourceNotFoundError

logger = logging.getLogger(__name__)

PROBES = 4  # random vectors per tensor


class Level(enum.Enum):
    """How deep ``verify`` checks."""

    FILES = "files"
    TENSORS = "tensors"


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
    """

    output: str
    level: str
    files_checked: int = 0
    tensors_exact: int = 0
    tensors_probed: int = 0
    not_probed: dict[str, str] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    max_probe_error: float = 0.0

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
            return f"FAILED {self.output}: {name}: {why} ({len(self.failures)} problem(s))"
        parts = [f"{self.files_checked} files match lorasave.json"]
        if self.level == Level.TENSORS.value:
            parts.append(f"{self.tensors_exact} tensors equal the base, {self.tensors_probed} merged tensors pass the probe")
            if self.not_probed:
                parts.append(f"{len(self.not_probed)} not probed")
        return f"verified {self.output}: " + "; ".join(parts)


def _manifest(out: Path) -> dict[str, Any]:
    path = out / "lorasave.json"
    if not path.is_file():
        raise SourceNotFoundError(f"{out} has no lorasave.json; verify checks outputs lorasave wrote", path=out)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(f"{path}: invalid JSON ({e}); the output is damaged, run the merge again", path=path) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise CheckpointFormatError(
            f"{path}: not a lorasave manifest (expected an object with a files map); the output is damaged, run the merge again", path=path
        )
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
    """
    from .options import parse_enum

    lvl = parse_enum(Level, level, "level")
    out = Path(output)
    manifest = _manifest(out)
    report = VerifyReport(str(out), lvl.value)
    _check_files(out, manifest, report)
    if lvl is Level.TENSORS and manifest.get("command") == "merge":
        _check_tensors(out, manifest, report, base, adapters, seed)
    return report


def _check_tensors(out: Path, manifest: dict[str, Any], report: VerifyReport, base: Any, adapters: Any, seed: int) -> None:
    from .adapter import load_adapter
    from .checkpoint import TensorReader, open_checkpoint
    from .safetensors_format import read_header

    src = manifest.get("sources", {})
    settings = manifest.get("settings", {})
    base_path = base or src.get("base", {}).get("path")
    ad_paths = adapters or [a.get("path") for a in src.get("adapters", [])]
    if not base_path or not ad_paths:
        raise SourceNotFoundError(f"{out}/lorasave.json names no base or adapter path; pass --base and --adapter", path=out)
    ckpt = open_checkpoint(base_path)
    ads = [load_adapter(p, allow_pickle=bool(settings.get("allow_pickle"))) for p in ad_paths]
    weights = settings.get("weights") or [1.0] * len(ads)
    if ckpt.quant_method is not None or settings.get("save_method") == "merged_4bit" or settings.get("merge_into") == "dequantized":
        report.not_probed["*"] = "quantized base or output: files level only"
        return
    lora: dict[str, list[tuple[Any, Any, float]]] = {}
    other: dict[str, str] = {}
    for i, ad in enumerate(ads):
        for name in ad.extra:
            other[name] = "replaced by a full tensor from the adapter (modules_to_save)"
        for module, part in ad.parts.items():
            if part.is_lora and set(part.keys) <= {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"}:
                lora.setdefault(f"{module}.weight", []).append((ad, part, part.scaling * weights[i]))
            else:
                other[f"{module}.weight"] = f"{ad.tuner.value} recipe not probed ({', '.join(sorted(part.keys))})"
                if "lora_B.bias" in part.keys:
                    other[f"{module}.bias"] = "lora_bias not probed"
    gen = torch.Generator().manual_seed(seed)
    with TensorReader() as reader:
        for shard in sorted(out.glob("*.safetensors")):
            for name, entry in read_header(shard).tensors.items():
                w1 = reader.read(entry)
                if name in other:
                    report.not_probed[name] = other[name]
                elif name in lora:
                    _probe(name, w1, ckpt, lora[name], reader, gen, report)
                elif name in ckpt.tensors:
                    w0 = reader.read(ckpt.tensors[name])  # type: ignore[arg-type]
                    if not torch.equal(w0.to(w1.dtype), w1):
                        report.failures.append((name, "differs from the base tensor, though no adapter changes it"))
                    else:
                        report.tensors_exact += 1
                else:
                    report.not_probed[name] = "not in the base (a tied tensor written separately)"


def _probe(name: str, w1: torch.Tensor, ckpt: Any, terms: list[tuple[Any, Any, float]], reader: Any, gen: torch.Generator, report: VerifyReport) -> None:
    from .architecture import ModuleKind, inspect_architecture

    w0 = reader.read(ckpt.tensors[name]).float()
    shape = w0.shape
    w0 = w0.reshape(shape[0], -1)  # (rows, cols); conv kernels flattened
    w1f = w1.float().reshape(shape[0], -1)
    x = torch.randn(w0.shape[1], PROBES, generator=gen)  # (cols, k)
    y = w0 @ x  # (rows, k)
    extra = torch.zeros_like(y)
    arch = inspect_architecture(ckpt.config)
    for ad, part, s in terms:
        a = ad.tensor(part.lora_A, reader).float()
        b = ad.tensor(part.lora_B, reader).float()
        a = a.reshape(a.shape[0], -1)  # (r, in)
        b = b.reshape(b.shape[0], -1)  # (out, r)
        transposed = "lora_embedding_A" in part.keys or arch.kind_of(part.module) is ModuleKind.CONV1D_GPT2
        if transposed:  # W stored (in, out) / (vocab, dim): W'x gets s * A.T (B.T x)
            term = a.T @ (b.T @ x)  # (rows, k)
            extra += (a.abs().T @ (b.abs().T @ x.abs())) * abs(s)
        else:
            term = b @ (a @ x)  # (rows, k)
            extra += (b.abs() @ (a.abs() @ x.abs())) * abs(s)
        y = y + s * term
    eps = torch.finfo(w1.dtype).eps if w1.dtype.is_floating_point else 0.0
    bound = 2 * eps * (w1f.abs() @ x.abs()) + 1e-6 * ((w0.abs() @ x.abs()) + extra) + 1e-30
    err = ((w1f @ x) - y).abs() / bound
    worst = float(err.max())
    report.max_probe_error = max(report.max_probe_error, worst)
    if not worst <= 1.0:
        report.failures.append((name, f"W'·x differs from W0·x + s·B(A·x) by {worst:.1f}× the rounding bound (wrong scaling, rank or corrupted bytes)"))
    else:
        report.tensors_probed += 1
