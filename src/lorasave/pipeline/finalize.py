"""Finalize a staged output: the checks every format shares before the atomic rename.

``verify_staged`` runs ``lorasave verify`` (tensors level) on the staging folder, from its
``lorasave.json`` alone, exactly as a user would on OUT afterwards; a failure stops the output
before the rename, so nothing appears under the final name.
"""

from __future__ import annotations

from pathlib import Path

from lorasave.verify.report import VerificationError, VerifyReport


def verify_staged(folder: Path, final: Path, what: str = "the output") -> VerifyReport:
    """``lorasave.verify.run.verify(folder)``; returns the report when it passed.

    Args:
        folder: the staging folder (its ``lorasave.json`` written).
        final: OUT, named in the error.
        what: how the error names the output (``"the GGUF"``).

    Raises:
        VerificationError: the output does not match its sources ("nothing was written").
    """
    from lorasave.verify.run import verify

    report = verify(folder)
    if not report.ok:
        raise VerificationError(f"{what} failed verification, nothing was written: {report.summary()}", path=final, failures=report.failures)
    return report
