"""How much each GGUF file of a model loses: size, bits per weight, perplexity, KL divergence and
top-1 agreement on a text, every file run in llama.cpp (``lorasave compare``, ``lorasave gguf --report``).

Definitions (``n`` scored positions, ``p_ref`` / ``p`` the reference's and the file's next-token
distributions, softmax of the logits in float64):

- **size**: the file's size in bytes.
- **bits per weight**: ``8 * Σ bytes of the tensors / Σ elements of the tensors`` over every tensor
  of the file (norms and biases included), the "BPW" llama.cpp's model loader prints
  (``llama-model-loader.cpp``: ``n_bytes*8.0/n_elements``). Metadata (the vocabulary) is not counted.
- **perplexity**: ``exp(mean NLL)``, ``NLL_i = -log p(t_{i+1} | t_0..t_i)``.
- **KL divergence**: ``mean_i Σ_v p_ref(v) (log p_ref(v) - log p(v))`` in nats, the "Mean KLD" of
  ``llama-perplexity --kl-divergence`` (``tools/perplexity/perplexity.cpp``), computed here exactly over
  the whole vocabulary (llama.cpp stores the reference's log-probabilities as uint16 and skips
  ``log p_ref < -16``).
- **top-1 agreement**: the share of positions where the file's argmax equals the reference's.

Positions: the text is tokenized once, by llama.cpp with the reference GGUF's tokenizer (BOS as the
GGUF says), and the same ids are fed to every model (transformers included). It is cut into chunks
of ``n_ctx`` tokens, each run from an empty context; every position of a chunk but its last is scored
(llama-perplexity scores only each chunk's second half: with the short default text, one chunk, the
figures are for contexts of 1 to ``n_ctx`` tokens).

References:

- **the float32 merge**: an f32 GGUF of the same merge (lorasave's streaming merge of the base and
  adapters in float32, the very values every quantized file is encoded from), run in llama.cpp like
  the files. Chosen over a torch forward of the merge so that the reference differs from each file by
  the weights' encoding alone: same runtime, graph, kernels and tokenizer; a file compared with itself
  gives 0 and 100% exactly, and the figures are what ``llama-perplexity --kl-divergence`` reports
  from that f32 file's logits. An ``f32`` file among the outputs is used as it is, else one is written
  into a temporary folder (4 bytes per weight) and removed.
- **the unmerged PeftModel** (when the adapters are at hand and unweighted): the base in transformers
  (float32, ``trust_remote_code=False``) with the adapters under PEFT: this also measures what the
  export and llama.cpp's graph change, not the quantization only.
- Without sources (plain GGUF files, or an output whose sources are gone): the highest-precision
  file given (most bits per weight), and the report says so.

Reproducible run to run on one machine: llama.cpp with an F32 KV cache, no flash attention and a
fixed thread count (:data:`THREADS`); float64 statistics.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorasave.errors import CheckpointFormatError, InvalidOptionError, SourceNotFoundError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: llama.cpp threads of every report run (fixed, so a figure never depends on the core count).
THREADS = 4
#: Tokens per chunk (the context each position sees at most).
N_CTX = 512
#: Most tokens of a text that are used (the references' logits are kept in memory: tokens x vocab x 4 bytes each).
MAX_TOKENS = 4096
#: Rows of logits turned into float64 probabilities at a time.
_ROWS = 64

#: The built-in text: plain English written for lorasave (no source to credit), ~450 tokens.
DEFAULT_TEXT = """\
The town of Millbrook sits where two small rivers meet before they run together to the sea. In the
spring the water rises, and the old stone bridge near the mill hears it day and night. Most people
in the town have lived there all their lives. They know which fields flood first, which roads turn
to mud, and which neighbours will lend a pump when the cellar fills.

Every morning the baker opens his shop a little before six. He lights the oven, sets out the flour,
and listens to the radio while the first loaves rise. By seven there is a short line at the door:
farmers on their way to the market, children with coins for a sweet roll, and the teacher, who always
buys two loaves and never explains why. The baker likes the quiet hour before the line. He says it is
the only time of day when he can think clearly.

On the hill above the town there is a small library with a green door. It was built a hundred years
ago with money from a ship owner who had learned to read late in life. The library has no more than
a few thousand books, but it also keeps the town's records: maps of the old farms, letters from
soldiers, and the weather written down by hand for every day since the library opened. Students come
from the city to read the weather books. They want to know how the seasons have changed, and the
pages give them an answer that no machine can invent: the careful notes of people who looked at the
sky each morning and wrote down what they saw.

In the autumn the town holds a fair. There are games for the children, a contest for the largest
pumpkin, and music in the square until late at night. Visitors often ask why such a small place
keeps such a large fair. The answer is simple. After the harvest, people want to thank each other
for a year of help, and a fair is the easiest way to do it. When the last song ends, they fold the
tables, sweep the square, and walk home under the cold, clear stars.
"""


@dataclass
class Agreement:
    """One file against one reference.

    Attributes:
        kl_divergence: mean KL(P_ref || P_file) over the scored positions, in nats.
        top1: share of positions (0..1) where both argmaxes are the same token.
    """

    kl_divergence: float
    top1: float


@dataclass
class QualityRow:
    """One model of the report.

    Attributes:
        label: the type (``"q4_k_m"``...) or, for a reference that is not one of the files, what it is.
        file: the GGUF file's name (None for the PeftModel).
        bytes: the file's size in bytes.
        bits_per_weight: ``8 * tensor bytes / tensor elements`` (module docstring).
        perplexity: ``exp(mean NLL)`` on the text.
        against: reference key (``"merge"``, ``"peft"``, ``"file"``) -> agreement with it.
        reference: the row is a reference, not one of the files compared.
    """

    label: str
    file: str | None
    bytes: int | None
    bits_per_weight: float | None
    perplexity: float
    against: dict[str, Agreement] = field(default_factory=dict)
    reference: bool = False


@dataclass
class Reference:
    """A reference the files are measured against: ``key`` (``"merge"``, ``"peft"``, ``"file"``), a short name for
    table headers and a sentence for the report."""

    key: str
    short: str
    description: str


@dataclass
class QualityReport:
    """What :func:`measure` found.

    Attributes:
        rows: the references first, then one row per file, in the order given.
        references: what each ``QualityRow.against`` key is.
        text: ``"built-in"`` or the text file's path.
        n_tokens: tokens of the text used; n_scored: positions scored.
        n_ctx: tokens per chunk; threads: llama.cpp threads.
        notes: facts worth knowing (the reference used when there is no float32 merge, a truncated text...).
        seconds: wall time.
    """

    rows: list[QualityRow]
    references: list[Reference]
    text: str
    n_tokens: int
    n_scored: int
    n_ctx: int
    threads: int
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``--json``, ``lorasave.json``)."""
        return asdict(self)

    def figures(self) -> dict[str, Any]:
        """:meth:`to_dict` without the wall time: what must be equal run to run."""
        d = self.to_dict()
        d.pop("seconds")
        return d

    def table(self) -> str:
        """The report as a Markdown table (one row per model; sizes in MB = 10^6 bytes)."""
        head = ["type", "file", "size (MB)", "bits/weight", "perplexity"]
        for r in self.references:
            head += [f"KL vs {r.short}", f"top-1 vs {r.short}"]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|"]
        for row in self.rows:
            cells = [
                f"**{row.label}**" if not row.reference else row.label,
                f"`{row.file}`" if row.file else "-",
                _mb(row.bytes) if row.bytes is not None else "-",
                f"{row.bits_per_weight:.2f}" if row.bits_per_weight is not None else "-",
                f"{row.perplexity:.3f}",
            ]
            for r in self.references:
                a = row.against.get(r.key)
                cells += [_kl(a.kl_divergence), f"{100 * a.top1:.1f}%"] if a is not None else ["-", "-"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def about(self) -> str:
        """One paragraph saying what the table measures and against what."""
        refs = "; ".join(f"**{r.short}**: {r.description}" for r in self.references)
        text = "the built-in text" if self.text == "built-in" else f"`{Path(self.text).name}`"
        return (
            f"Every file run in llama.cpp on {text} ({self.n_tokens} tokens, {self.n_scored} positions scored, chunks of "
            f"{self.n_ctx}, {self.threads} threads, F32 KV cache). KL: mean KL(P_ref || P_file) of the next-token distributions "
            f"in nats (llama-perplexity --kl-divergence); top-1: same most likely next token. References: {refs}."
        )

    def summary(self) -> str:
        """The table, the paragraph and the notes, for the terminal."""
        return "\n".join([self.table(), "", self.about(), *(f"note: {n}" for n in self.notes)])


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}" if n >= 1e8 else f"{n / 1e6:.2f}"


def _kl(x: float) -> str:
    return f"{x:.6f}" if x == 0 or x >= 1e-4 else f"{x:.2e}"


# --------------------------------------------------------------------------- files


def check_gguf(path: PathLike) -> Path:
    """``path`` as a Path, checked to be an existing GGUF file (its magic), else one clear error.

    Raises:
        SourceNotFoundError: no such file.
        CheckpointFormatError: not a GGUF file.
    """
    p = Path(path)
    if not p.exists():
        raise SourceNotFoundError(f"{p} does not exist", path=p)
    if not p.is_file():
        raise CheckpointFormatError(f"{p} is not a file; give GGUF files or a folder written by lorasave gguf", path=p)
    with open(p, "rb") as f:
        if f.read(4) != b"GGUF":
            raise CheckpointFormatError(f"{p} is not a GGUF file (it does not start with the GGUF magic)", path=p)
    return p


def gguf_facts(path: PathLike) -> tuple[str, float]:
    """``(file type name, bits per weight)`` of a GGUF file.

    The type is ``general.file_type`` as llama-quantize names it (``"q4_k_m"``, ``"f32"``...), else
    ``"?"``; bits per weight as the module docstring defines them.

    Raises:
        CheckpointFormatError: not a well-formed GGUF file.
    """
    from lorasave.formats.gguf.read import guarded, open_gguf
    from lorasave.runtimes.llama_cpp.lib import LlamaFtype

    reader = open_gguf(path)

    def facts() -> tuple[str, float]:
        n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
        n_elements = sum(int(t.n_elements) for t in reader.tensors)
        ft = reader.fields.get("general.file_type")
        name = "?"
        if ft is not None:
            try:
                name = LlamaFtype(int(ft.contents())).name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()
            except ValueError:
                name = f"file type {int(ft.contents())}"
        return name, 8 * n_bytes / max(n_elements, 1)

    return guarded(path, facts)


# --------------------------------------------------------------------------- logits and statistics


def chunks_of(ids: Sequence[int], n_ctx: int) -> list[list[int]]:
    """``ids`` cut into chunks of ``n_ctx`` tokens; a last chunk of one token (nothing to score) is dropped."""
    out = [list(ids[i : i + n_ctx]) for i in range(0, len(ids), n_ctx)]
    return [c for c in out if len(c) > 1]


def llama_cpp_logits(path: Path, chunks: list[list[int]], *, n_ctx: int, threads: int) -> np.ndarray:
    """llama.cpp's logits of every scored position: float32 ``(Σ (len(chunk) - 1), n_vocab)``, chunk after chunk.

    Raises:
        LlamaCppNotInstalledError, LlamaCppError: from the runtime.
    """
    from lorasave.runtimes.llama_cpp.lib import LlamaCppModel

    with LlamaCppModel(path, n_ctx=n_ctx, n_threads=threads) as model:
        return np.concatenate([model.logits(c)[:-1] for c in chunks])


def peft_logits(base_root: Path, adapter_roots: Sequence[Path], chunks: list[list[int]]) -> np.ndarray:
    """The unmerged PeftModel's logits (transformers + peft, float32), same layout as :func:`llama_cpp_logits`.

    Several adapters are active together (their deltas add up, as lorasave merges them).

    Raises:
        UnsupportedModelError: the base needs its own code (``trust_remote_code`` is never set).
        PatternError: an adapter's target pattern does not finish under the budget.
    """
    import torch

    from lorasave.formats.bnb import preload_bnb

    preload_bnb()  # before transformers/PEFT import it: no Hub kernel is fetched (formats.bnb.preload_bnb)
    from peft import PeftModel

    from lorasave.plan.patterns import check_peft_patterns
    from lorasave.sources.hf_load import load_causal_lm
    from lorasave.util.jsonio import read_json
    from lorasave.verify.judge import _quiet_transformers

    with torch.no_grad(), _quiet_transformers():
        model = load_causal_lm(base_root, dtype=torch.float32)
        names = [n for n, _ in model.named_modules()]
        for root in adapter_roots:  # PEFT would hang on a catastrophic regex: tried first under a budget
            check_peft_patterns(read_json(Path(root) / "adapter_config.json"), names, source=Path(root) / "adapter_config.json")
        tags = [f"a{i}" for i in range(len(adapter_roots))]
        peft = PeftModel.from_pretrained(model, str(adapter_roots[0]), adapter_name=tags[0])
        for tag, root in zip(tags[1:], adapter_roots[1:], strict=True):
            peft.load_adapter(str(root), adapter_name=tag)
        if len(tags) > 1:
            peft.base_model.set_adapter(tags)
        peft.eval()
        rows = [peft(input_ids=torch.tensor([c])).logits[0, :-1].float().numpy() for c in chunks]
    return np.concatenate(rows)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def score(logits: np.ndarray, targets: np.ndarray, refs: dict[str, np.ndarray]) -> tuple[float, dict[str, Agreement]]:
    """Perplexity of ``logits`` on ``targets`` and its agreement with each reference (module docstring).

    Args:
        logits: float32 ``(n, n_vocab)``; row ``i`` predicts ``targets[i]``.
        targets: int ``(n,)``.
        refs: key -> reference logits of the same shape.

    Returns:
        ``(perplexity, {key: Agreement})``, statistics in float64.
    """
    nll = 0.0
    kl = dict.fromkeys(refs, 0.0)
    same = dict.fromkeys(refs, 0)
    n = len(targets)
    for i in range(0, n, _ROWS):
        lp = _log_softmax(logits[i : i + _ROWS])
        nll -= float(lp[np.arange(len(lp)), targets[i : i + _ROWS]].sum())
        top = lp.argmax(axis=-1)
        for key, ref in refs.items():
            rlp = _log_softmax(ref[i : i + _ROWS])
            kl[key] += float((np.exp(rlp) * (rlp - lp)).sum())
            same[key] += int((rlp.argmax(axis=-1) == top).sum())
    return math.exp(nll / n), {k: Agreement(kl[k] / n, same[k] / n) for k in refs}


# --------------------------------------------------------------------------- the report


@dataclass
class Sources:
    """What the float32 merge and the PeftModel are made of (``ckpt``: a ``Checkpoint``; ``adapters``: ``Adapter`` objects)."""

    ckpt: Any
    adapters: list[Any]
    tok_dir: Path
    peft: bool = True


def write_merge_f32(src: Sources, folder: Path) -> Path:
    """Write the float32 merge of ``src`` as ``folder/reference-f32.gguf`` (``folder`` is created); no card, no manifest.

    The same ``GgufModel`` and streaming merge as ``lorasave gguf --type f32``.

    Raises:
        LorasaveError subclasses from planning and merging; write errors.
    """
    from lorasave.formats.gguf.model import GgufModel
    from lorasave.formats.gguf.quant import GgufType
    from lorasave.pipeline.execute import PassJob, execute_pass, raise_first

    model = GgufModel.build(src.ckpt, src.adapters, src.tok_dir, "reference")
    out, _ = model.writer(GgufType.F32, "reference-f32.gguf")
    folder.mkdir(parents=True, exist_ok=False)
    job = PassJob(model.plan, src.adapters, [(out, folder)])
    execute_pass([job])
    raise_first(job)
    return folder / out.filename


def measure(
    files: Sequence[PathLike],
    *,
    labels: Sequence[str] | None = None,
    sources: Sources | None = None,
    text: str | None = None,
    text_source: str = "built-in",
    threads: int = THREADS,
    n_ctx: int = N_CTX,
    workdir: PathLike | None = None,
    notes: Sequence[str] = (),
) -> QualityReport:
    """Run every GGUF file of one model in llama.cpp on ``text`` and measure it against the references.

    Args:
        files: GGUF files of one model (same vocabulary).
        labels: a type name per file (default: its ``general.file_type``).
        sources: the base, adapters and tokenizer the files were made from: the references are then
            the float32 merge (an ``f32`` file among ``files``, else one written into a temporary
            folder under ``workdir``) and the unmerged PeftModel (when there are adapters and
            ``sources.peft``). None: the highest-precision file given is the reference.
        text: the text (default :data:`DEFAULT_TEXT`); at most :data:`MAX_TOKENS` tokens are used.
        text_source: where the text came from, for the report.
        threads: llama.cpp threads; n_ctx: tokens per chunk.
        workdir: where the temporary f32 GGUF goes (default: the system's temporary folder).
        notes: notes to start the report's with.

    Raises:
        SourceNotFoundError, CheckpointFormatError: a file is missing or not GGUF.
        InvalidOptionError: no file, a text of fewer than 2 tokens, or files whose vocabularies differ.
        LlamaCppNotInstalledError, LlamaCppError: from the runtime.
    """
    t0 = time.perf_counter()
    paths = [check_gguf(f) for f in files]
    if not paths:
        raise InvalidOptionError("no GGUF file to compare")
    facts = [gguf_facts(p) for p in paths]
    names = list(labels) if labels is not None else [f[0] for f in facts]
    out_notes = list(notes)
    tmp: Path | None = None
    try:
        if sources is not None:
            ref_path = next((p for p, n in zip(paths, names, strict=True) if n == "f32"), None)
            if ref_path is None:
                tmp = Path(tempfile.mkdtemp(prefix=".lorasave-report-", dir=workdir))
                ref_path = write_merge_f32(sources, tmp / "merge")
            refs = [Reference("merge", "f32 merge", "the float32 merge of the base and adapters (an f32 GGUF of it, run in llama.cpp)")]
        else:
            ref_path = paths[max(range(len(paths)), key=lambda i: facts[i][1])]
            refs = [Reference("file", ref_path.name, f"`{ref_path.name}`, the highest-precision file given")]
            out_notes.append(f"no sources to merge: the files are compared against {ref_path.name}, the highest-precision file given, not a float32 merge")
        return _run(paths, names, facts, ref_path, refs, sources, text, text_source, threads, n_ctx, out_notes, t0)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _tokens(ref_path: Path, text: str, n_ctx: int, threads: int, notes: list[str]) -> list[int]:
    from lorasave.runtimes.llama_cpp.lib import LlamaCppModel

    with LlamaCppModel(ref_path, n_ctx=8, n_threads=threads) as m:
        ids = m.tokenize(text)
    if len(ids) > MAX_TOKENS:
        notes.append(f"the text has {len(ids)} tokens: its first {MAX_TOKENS} are used")
        ids = ids[:MAX_TOKENS]
    if len(chunks_of(ids, n_ctx)) == 0:
        raise InvalidOptionError(f"the text has {len(ids)} token(s); the report needs at least 2")
    return ids


def _run(
    paths: list[Path],
    names: list[str],
    facts: list[tuple[str, float]],
    ref_path: Path,
    refs: list[Reference],
    sources: Sources | None,
    text: str | None,
    text_source: str,
    threads: int,
    n_ctx: int,
    notes: list[str],
    t0: float,
) -> QualityReport:
    ids = _tokens(ref_path, DEFAULT_TEXT if text is None else text, n_ctx, threads, notes)
    chunks = chunks_of(ids, n_ctx)
    targets = np.concatenate([np.asarray(c[1:], dtype=np.int64) for c in chunks])
    key = refs[0].key
    ref_logits = {key: llama_cpp_logits(ref_path, chunks, n_ctx=n_ctx, threads=threads)}
    rows: list[QualityRow] = []
    if sources is not None and sources.adapters and sources.peft:
        logits = peft_logits(sources.ckpt.root, [a.root for a in sources.adapters], chunks)
        if logits.shape != ref_logits[key].shape:
            notes.append(f"the PeftModel's vocabulary ({logits.shape[1]}) differs from the GGUF's ({ref_logits[key].shape[1]}): it is not compared")
        else:
            refs.append(Reference("peft", "PEFT", "the unmerged PeftModel (transformers + peft, float32: the base and adapters as trained)"))
            ref_logits["peft"] = logits
            ppl, against = score(logits, targets, {key: ref_logits[key]})
            rows.append(QualityRow("PeftModel", None, None, None, ppl, {**against, "peft": Agreement(0.0, 1.0)}, reference=True))
    if key == "merge" and ref_path not in paths:
        ppl, against = score(ref_logits[key], targets, ref_logits)
        rows.insert(0, QualityRow("f32 merge", None, None, gguf_facts(ref_path)[1], ppl, against, reference=True))
    for path, name, (_, bpw) in zip(paths, names, facts, strict=True):
        logits = ref_logits[key] if path == ref_path else llama_cpp_logits(path, chunks, n_ctx=n_ctx, threads=threads)
        if logits.shape != ref_logits[key].shape:
            n_ref = ref_logits[key].shape[1]
            raise InvalidOptionError(
                f"{path.name} has {logits.shape[1]} tokens in its vocabulary, the reference {ref_path.name} {n_ref}: compare files of one model"
            )
        ppl, against = score(logits, targets, ref_logits)
        rows.append(QualityRow(name, path.name, path.stat().st_size, bpw, ppl, against))
        del logits
    for n in notes:
        logger.info("%s", n)
    return QualityReport(rows, refs, text_source, len(ids), len(targets), n_ctx, threads, notes, round(time.perf_counter() - t0, 3))


def iter_gguf(folder: Path) -> Iterator[Path]:
    """The ``.gguf`` files directly in ``folder``, by name."""
    return iter(sorted(p for p in folder.iterdir() if p.suffix == ".gguf" and p.is_file()))
