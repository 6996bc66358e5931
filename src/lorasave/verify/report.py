"""What ``lorasave verify`` found: counts per level, the one-line summary and the exit status.

Every level says what it checked: ``6 files: 6 match lorasave.json; 21 tensors: 7 bit-equal,
14 probed, 0 not checkable``. The numbers in the line are the report's fields, which ``--json``
prints as they are. A level that checked nothing says so (``nothing checked``) and the CLI exits
with :data:`errors.EXIT_NOTHING_CHECKED`; the word "verified" is printed only when something was
checked and nothing failed.
"""

from __future__ import annotations

import enum
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from lorasave.errors import LorasaveError
from lorasave.util.printable import escape

#: Failing names listed in the summary line (the rest are counted).
SHOWN_FAILURES = 5


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
        level: ``"files"``, ``"tensors"`` or ``"logits"``.
        files_total: files listed in ``lorasave.json``.
        files_checked: files whose size and sha256 matched.
        tensors_total: tensors of the output looked at (tensors level).
        tensors_exact: tensors equal bit for bit to what they must be (the base's, the source
            adapter's, or the reference quantizer's encoding of the merge).
        tensors_probed: tensors that passed the random-vector probe within their rounding bound.
        tensors_failed: tensors that did not.
        not_probed: tensors not checkable, with the reason (never counted as passed).
        failures: ``[(name, what is wrong)]``; empty when the output is correct.
        max_probe_error: largest ``|W'·x − y| / bound`` seen (≤ 1 passes).
        logits_max_diff / logits_scale / top1_agreement / logits_kl: the logits level's findings
            (KL divergence of the output's next-token distribution from PEFT's, mean over positions).
        logits_judged: whether the logits were judged against a bound (float outputs), or only
            reported (quantized outputs: their tensors level is the verdict).
        logits_limit: the bound on ``max |logit diff|`` used, when judged.
        logits_runtime: what ran the output at the logits level (``"llama.cpp"``, ``"transformers"``, ``"onnxruntime"``).
        skipped: why a level checked less than it could (or nothing).
    """

    output: str
    level: str
    files_total: int = 0
    files_checked: int = 0
    tensors_total: int = 0
    tensors_exact: int = 0
    tensors_probed: int = 0
    tensors_failed: int = 0
    not_probed: dict[str, str] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    max_probe_error: float = 0.0
    logits_max_diff: float | None = None
    logits_scale: float | None = None
    top1_agreement: float | None = None
    logits_kl: float | None = None
    logits_judged: bool | None = None
    logits_limit: float | None = None
    logits_runtime: str | None = None
    skipped: str | None = None

    # ------------------------------------------------------------------ recording

    def exact(self) -> None:
        """One tensor equal bit for bit to what it must be."""
        self.tensors_total += 1
        self.tensors_exact += 1

    def probed(self, worst: float, tensors: int = 1) -> None:
        """``tensors`` tensors that passed the probe (``worst``: their error as a fraction of the bound)."""
        self.tensors_total += tensors
        self.tensors_probed += tensors
        self.max_probe_error = max(self.max_probe_error, worst)

    def not_checkable(self, name: str, why: str) -> None:
        """One tensor that could not be checked."""
        if name not in self.not_probed:
            self.tensors_total += 1
        self.not_probed[name] = why

    def fail(self, name: str, why: str, *, tensors: int = 1) -> None:
        """One failure, of ``tensors`` tensors (0: a file, the logits; 2: a GGUF LoRA pair)."""
        self.tensors_total += tensors
        self.tensors_failed += tensors
        self.failures.append((name, why))

    # ------------------------------------------------------------------ verdict

    @property
    def ok(self) -> bool:
        """No failure."""
        return not self.failures

    @property
    def checked(self) -> bool:
        """Whether the level asked for compared anything (files: a file; tensors: a tensor; logits: the logits)."""
        if self.level == Level.FILES.value:
            return self.files_checked + len(self.failures) > 0
        if self.level == Level.TENSORS.value:
            return self.tensors_exact + self.tensors_probed + self.tensors_failed > 0 or (self.files_total > 0 and not self.ok)
        return self.top1_agreement is not None or not self.ok

    def counts(self) -> str:
        """``6 files: 6 match lorasave.json; 21 tensors: 7 bit-equal, 14 probed, 0 not checkable``."""
        differ = self.files_total - self.files_checked
        parts = [f"{self.files_total} files: {self.files_checked} match lorasave.json" + (f", {differ} differ" if differ else "")]
        if self.level == Level.TENSORS.value:
            tensors = f"{self.tensors_total} tensors: {self.tensors_exact} bit-equal, {self.tensors_probed} probed, {len(self.not_probed)} not checkable"
            parts.append(tensors + (f", {self.tensors_failed} fail" if self.tensors_failed else ""))
        if self.top1_agreement is not None:
            where = f" in {self.logits_runtime}" if self.logits_runtime else ""
            kl = f", KL {self.logits_kl:.3g}" if self.logits_kl is not None else ""
            how = "judged" if self.logits_judged else "reported, not judged (quantized output)"
            parts.append(
                f"logits{where} {how}: max |diff| {self.logits_max_diff:.3g} of max |logit| {self.logits_scale:.3g}"
                + (f" (limit {self.logits_limit:.3g})" if self.logits_judged and self.logits_limit is not None else "")
                + f", top-1 agreement {self.top1_agreement:.3f}{kl}"
            )
        if self.skipped:
            parts.append(self.skipped)
        return "; ".join(parts)

    def summary(self) -> str:
        """One line for humans: the verdict, the failing names (first five and the count), the counts.

        Names from files (tensors, manifest entries) are printed with control characters escaped.
        """
        return escape(self._verdict())

    def _verdict(self) -> str:
        if not self.ok:
            names = list(dict.fromkeys(n for n, _ in self.failures))
            shown = ", ".join(names[:SHOWN_FAILURES]) + (f" and {len(names) - SHOWN_FAILURES} more" if len(names) > SHOWN_FAILURES else "")
            name, why = self.failures[0]
            return f"FAILED {self.output}: {len(names)} failing ({shown}); first: {name}: {why}; {self.counts()}"
        if not self.checked:
            return f"nothing checked at the {self.level} level of {self.output}: {self.counts()}"
        if self.level == Level.LOGITS.value and self.logits_judged is False:  # compared and reported, no verdict
            return f"logits compared, not judged (quantized: its verdict is --level tensors) for {self.output}: {self.counts()}"
        return f"verified {self.output}: {self.counts()}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: every field, plus ``ok``, ``checked`` and the ``summary`` line."""
        d = asdict(self)
        d.update(ok=self.ok, checked=self.checked, summary=self.summary())
        return d
