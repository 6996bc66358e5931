"""The quality report people look at: ``lorasave compare`` and ``lorasave gguf --report``.

The figures are :mod:`lorasave.verify.quality`'s. This module finds the files and their sources
(an OUT folder's ``lorasave.json``), draws the chart (file size against KL divergence, one labelled
point per type: matplotlib, the optional ``lorasave[report]`` extra; without it the chart is skipped
with a log line) and puts the table and the chart into a GGUF output's model card, on the staged
folder, before ``lorasave.json`` is written, so that its sha256 list covers both.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorasave.errors import CheckpointFormatError, InvalidOptionError, SourceNotFoundError
from lorasave.verify.quality import N_CTX, THREADS, QualityReport, Sources, iter_gguf, measure

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: The chart's file name in a GGUF output.
CHART_NAME = "quality.png"
#: The model card section the report goes into (before this heading when the card has it).
_BEFORE = "## How to run it"


def read_text(path: PathLike | None) -> str | None:
    """The text of ``--text FILE`` (UTF-8), or None for the built-in one.

    Raises:
        SourceNotFoundError: no such file.
        InvalidOptionError: not UTF-8 text.
    """
    from lorasave.util.textfile import read_utf8

    return None if path is None else read_utf8(path)


# --------------------------------------------------------------------------- chart and card


def write_chart(report: QualityReport, path: Path, title: str) -> bool:
    """Draw file size (MB) against KL divergence from the first reference, one labelled point per file; PNG at ``path``.

    Deterministic bytes: matplotlib's Agg canvas through its object API (no pyplot state), no
    ``Software`` entry in the PNG metadata (PNG has no date unless asked). A log scale for the KL
    axis, symmetric-log when a file equals the reference (KL 0). The PeftModel reference, when
    present, is a dotted line at its KL from the f32 merge (what the export and llama.cpp's graph change), unless it is
    far below every file's.

    Returns:
        False when matplotlib is not installed (logged, with the install command); True when written.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.info("matplotlib is not installed: the quality chart is skipped (pip install lorasave[report])")
        return False
    ref = report.references[0]
    points = [(r.bytes / 1e6, r.against[ref.key].kl_divergence, r.label) for r in report.rows if not r.reference and r.bytes is not None]
    fig = Figure(figsize=(7.0, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter([p[0] for p in points], [p[1] for p in points], color="tab:blue", zorder=3)
    for x, y, label in points:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 5), fontsize=9)
    positive = [p[1] for p in points if p[1] > 0]
    peft = next((r.against.get(ref.key) for r in report.rows if r.reference and r.label == "PeftModel"), None)
    if peft is not None and positive and peft.kl_divergence >= min(positive) / 100:  # the floor the export itself sets
        ax.axhline(peft.kl_divergence, color="gray", linestyle=":", zorder=2, label="the unmerged PeftModel")
        ax.legend(loc="upper right", fontsize=8)
    if positive and all(p[1] > 0 for p in points):
        ax.set_yscale("log")
    elif positive:
        ax.set_yscale("symlog", linthresh=min(positive) / 2)
    ax.margins(x=0.12, y=0.15)
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel(f"KL divergence from the {ref.short} (nats)")
    ax.set_title(f"{title}: size against KL divergence ({report.n_scored} positions)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    return True


def card_section(report: QualityReport, chart: str | None) -> str:
    """The ``## Quality`` section of a model card: what was measured, the table, the chart, the notes."""
    lines = ["## Quality", "", report.about(), "", report.table(), ""]
    if chart:
        lines += [f"![file size against KL divergence]({chart})", ""]
    lines += [*(f"- {n}" for n in report.notes), *([""] if report.notes else [])]
    return "\n".join(lines)


def add_to_card(card: Path, report: QualityReport, chart: str | None) -> None:
    """Put :func:`card_section` into the card at ``card``: before its ``## How to run it`` section, else at the end."""
    text = card.read_text(encoding="utf-8")
    section = card_section(report, chart)
    at = text.find("\n" + _BEFORE)
    text = text[: at + 1] + section + "\n" + text[at + 1 :] if at >= 0 else text.rstrip("\n") + "\n\n" + section
    card.write_text(text, encoding="utf-8")


@dataclass
class StagedReport:
    """What :func:`report_staged` added to an output: the report and the new files' names (the chart)."""

    report: QualityReport
    files: list[str] = field(default_factory=list)


def report_staged(
    folder: Path, files: dict[str, str], ckpt: Any, adapters: list[Any], tok_dir: Path, *, title: str, text: str | None = None, text_source: str = "built-in"
) -> StagedReport:
    """``lorasave gguf --report``: measure the staged GGUF files, write the chart, put the table into ``README.md``.

    Args:
        folder: the staging folder (its ``README.md`` is written already; ``lorasave.json`` not yet).
        files: GGUF file name -> its type, in order.
        ckpt, adapters, tok_dir: the sources (the references: the float32 merge, the PeftModel).
        title: the output's name, for the chart.
        text: the text (None: the built-in one); text_source: where it came from.

    Raises:
        Whatever :func:`quality.measure` raises.
    """
    report = measure(
        [folder / f for f in files],
        labels=list(files.values()),
        sources=Sources(ckpt, list(adapters), tok_dir),
        text=text,
        text_source=text_source,
        workdir=folder.parent,
    )
    chart = CHART_NAME if write_chart(report, folder / CHART_NAME, title) else None
    add_to_card(folder / "README.md", report, chart)
    return StagedReport(report, [chart] if chart else [])


# --------------------------------------------------------------------------- lorasave compare


def _output(folder: Path) -> tuple[list[Path], list[str], dict[str, Any] | None]:
    """The GGUF files of a folder, their types, and its manifest (None without ``lorasave.json``)."""
    from lorasave.util.jsonio import load_json

    path = folder / "lorasave.json"
    if not path.is_file():
        found = list(iter_gguf(folder))
        if not found:
            raise SourceNotFoundError(f"{folder} has no .gguf file", path=folder)
        return found, [""] * len(found), None
    manifest = load_json(path, hint="the output is damaged")
    if not isinstance(manifest, dict) or manifest.get("command") != "gguf":
        what = manifest.get("command") if isinstance(manifest, dict) else None
        raise InvalidOptionError(f"{folder} was written by lorasave {what}, not lorasave gguf: give its .gguf files instead")
    result = manifest.get("result") or {}
    per_file = result.get("gguf_files") or {}
    if not per_file:
        name = next((n for n in manifest.get("files", {}) if n.endswith(".gguf")), None)
        if name is None:
            raise CheckpointFormatError(f"{path} lists no .gguf file", path=path)
        per_file = {name: {"type": str(manifest.get("settings", {}).get("type", ""))}}
    return [folder / n for n in per_file], [str(e.get("type", "")) for e in per_file.values()], manifest


def _sources(folder: Path, manifest: dict[str, Any], notes: list[str]) -> Sources | None:
    """The sources a manifest names, or None (with a note) when they are gone."""
    from lorasave.pipeline.output import tokenizer_source
    from lorasave.verify.sources import sources

    try:
        ckpt, ads, weights = sources(folder, manifest, None, None)
    except SourceNotFoundError as e:
        notes.append(f"the sources recorded in {folder.name}/lorasave.json cannot be opened ({e})")
        return None
    tok = (manifest.get("sources") or {}).get("tokenizer")
    tok_dir = Path(tok) if isinstance(tok, str) and Path(tok).is_dir() else tokenizer_source(None, [a.root for a in ads], ckpt.root)
    return Sources(ckpt, ads, tok_dir, peft=all(w == 1.0 for w in weights))


def compare(
    paths: Sequence[PathLike],
    *,
    text_file: PathLike | None = None,
    chart: PathLike | None = None,
    threads: int = THREADS,
    n_ctx: int = N_CTX,
) -> QualityReport:
    """``lorasave compare``: GGUF files and ``lorasave gguf`` output folders, measured on a text.

    An output folder's ``lorasave.json`` names its base and adapters: the references are then the
    float32 merge and the unmerged PeftModel (``quality.measure``), and its files are labelled with
    their types. Without one (plain files, or a folder whose sources are gone) the highest-precision
    file given is the reference, and the report says so. Folders must come from the same sources.

    Args:
        paths: ``.gguf`` files and/or folders.
        text_file: the text (default: the built-in one).
        chart: also write the chart there (PNG; skipped without matplotlib).
        threads: llama.cpp threads; n_ctx: tokens per chunk.

    Raises:
        SourceNotFoundError: a path or the text file does not exist, a folder has no .gguf file.
        CheckpointFormatError: a file is not GGUF.
        InvalidOptionError: a folder not written by ``lorasave gguf``, folders of different sources, a text that is not UTF-8.
        LlamaCppNotInstalledError: the llama.cpp runtime is not installed.
    """
    from lorasave.runtimes.llama_cpp import lib as llama_cpp
    from lorasave.verify.quality import check_gguf

    text = read_text(text_file)
    files: list[Path] = []
    labels: list[str] = []
    notes: list[str] = []
    manifests: list[tuple[Path, dict[str, Any]]] = []
    for p in map(Path, paths):
        if p.is_dir():
            found, types, manifest = _output(p)
            if manifest is not None:
                manifests.append((p, manifest))
        else:
            found, types = [check_gguf(p)], [""]
        for f, t in zip(found, types, strict=True):
            if f not in files:
                files.append(check_gguf(f))
                labels.append(t)
    if not files:
        raise InvalidOptionError("no GGUF file to compare")
    llama_cpp.require()
    src: Sources | None = None
    if manifests:
        recorded = {_recorded_sources(m) for _, m in manifests}
        if len(recorded) > 1:
            raise InvalidOptionError("the folders were made from different sources; compare them one at a time")
        src = _sources(*manifests[0], notes)
    from lorasave.verify.quality import gguf_facts

    labels = [t or gguf_facts(f)[0] for f, t in zip(files, labels, strict=True)]
    workdir = manifests[0][0].parent if manifests and os.access(manifests[0][0].parent, os.W_OK) else None
    report = measure(
        files,
        labels=labels,
        sources=src,
        text=text,
        text_source="built-in" if text_file is None else str(text_file),
        threads=threads,
        n_ctx=n_ctx,
        workdir=workdir,
        notes=notes,
    )
    if chart is not None:
        write_chart(report, Path(chart), manifests[0][0].name if manifests else files[0].stem)
    return report


def _recorded_sources(manifest: dict[str, Any]) -> tuple[Any, ...]:
    src = manifest.get("sources") or {}
    base = (src.get("base") or {}).get("path")
    return (base, tuple(str((a or {}).get("path")) for a in src.get("adapters") or []))
