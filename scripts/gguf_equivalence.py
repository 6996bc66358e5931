"""Check that ``lorasave gguf`` writes what llama.cpp's own converter writes (issue 5, point 7).

Run::

    python scripts/gguf_equivalence.py [--workdir DIR] [--cases llama,qwen2,...] [--types f32,f16,bf16,q8_0]
                                       [--smollm2 DIR] [--no-bf16-path] [--converter-dir DIR]

Not part of CI: the converter needs its own virtual environment (1-5 GB with torch).

The converter is llama.cpp's own, of the runtime's version (v0.5.0): ``convert_hf_to_gguf.py``,
``conversion/`` and ``gguf-py/`` from the git bundle ``llama/gitRelease.bundle`` of the npm package
``node-llama-cpp@3.22.1`` (sha512-pinned), in a venv with its own
``requirements/requirements-convert_hf_to_gguf.txt`` (torch 2.11.0, transformers 4.57.6, numpy
2.2.x, sentencepiece, protobuf) and its own gguf-py: ``lorasave install-llama-cpp --converter``
(:mod:`lorasave.runtimes.llama_cpp.converter`; this script installs it when missing, once).

The cases are data: every ``model_type`` of ``lorasave.formats.gguf.arch.ARCHITECTURES`` (so an
architecture added there is picked up), in ``scripts/gguf_equivalence_cases.py``: each built tiny by ``tiny_model`` from transformers'
default config of that type with ``TINY``'s sizes (for the keys that type's config has, its
``text_config`` / ``vision_config`` included) and the per-type changes of ``OVERRIDES``, plus the
SentencePiece variants of ``EXTRA_CASES``.

For each case (a tiny model of the architecture with a LoRA trained a few steps, the tokenizer of
SmolLM2 when ``--smollm2`` points at examples/real_model.py's ``smollm2-hf``, else a tiny byte-level
BPE) it runs:

  M    = ``lorasave merge BASE ADAPTER -o M --dtype float32``
  ref  = converter venv: ``convert_hf_to_gguf.py M --outtype T`` for T in f16, bf16, q8_0
  ours = ``lorasave gguf BASE ADAPTER --type T`` (straight from base + adapter, no M)

and compares the two files: metadata keys, value types and values, tensor names, GGML types and
shapes, and the tensor data bytes, counted per type.

Allowed deviations (the documented list; each is printed anyway, never counted as a difference):

* :data:`STAMP_KEYS` (``general.name``, ``general.tags``, ``general.quantized_by``, ``general.url``,
  ``general.source.url``): names and provenance stamps, not model facts. Both tools derive
  ``general.name`` from a folder name (the converter title-cases M's, "Merged Float32"; lorasave
  uses ``--name``), and the converter copies ``general.tags`` and the other ``general.*`` provenance
  from the model card of the checkpoint it reads: the card ``lorasave merge`` wrote into M, which a
  direct export from base + adapter does not have.
* :data:`LORASAVE_ONLY_KEYS` (``tokenizer.ggml.add_bos_token``, ``tokenizer.ggml.add_eos_token``),
  only when the converter writes no value at all (a different value is a difference): lorasave
  writes what the transformers tokenizer does when the tokenizer files do not say
  (``gguf_vocab._add_flags``); without the keys llama.cpp adds BOS for SentencePiece and GPT-2
  vocabularies, which may disagree with the tokenizer.
* :data:`CUT_TOKEN_KEYS` (``tokenizer.ggml.tokens``, ``tokenizer.ggml.token_type``), only when the
  converter's token list is longer than its own ``token_embd`` has rows and lorasave's list is the
  converter's cut to those rows. Gemma 3 without ``tokenizer.model`` (``Gemma3Model.modify_tensors``)
  cuts ``token_embd`` to ``len(vocab) + len(added_tokens)`` of tokenizer.json but still pads the
  token list to the config's ``vocab_size``; llama.cpp refuses that file (``check_tensor_dims``:
  token_embd has the wrong shape). lorasave writes the same ``token_embd`` and a token list of as
  many entries (``gguf_vocab.embedding_rows``), a file llama.cpp loads.
* The order of the tensors (:data:`ORDER_NOTE`), when both files hold the same names (types, shapes
  and bytes are compared by name). The converter's order is the merged checkpoint's: after the
  generated tensors (``generate_extra_tensors``) it reads the safetensors parts in sorted file-name
  order, each part's tensors sorted by name as strings (gguf-py's ``SafetensorsLocal``, "same as default
  safetensors behavior"), so ``model.layers.10`` comes before ``model.layers.2`` and the order moves
  with the sharding of the checkpoint it reads (and with what ``modify_tensors`` buffers, such as
  stacked experts). lorasave exports straight from base + adapter, without that checkpoint, and writes
  in layer order. llama.cpp's loader keys every tensor by name (``llama_model_loader::weights_map``, a
  map ordered by layer number, then name; ``get_weight`` / ``require_weight`` look names up in it), so
  the order changes nothing it reads.

When the converter does not know the tokenizer's pre-tokenizer hash (any tiny trained BPE) it
raises ``NotImplementedError``; the script runs the converter through a shim that then answers
``tokenizer.ggml.pre`` with the value lorasave wrote (reported in the ``pre shim`` column), so everything
else can still be compared.

With the bf16 merge path (default on) it also builds the tiny Llama with a bf16 base, converts
``lorasave merge --dtype bfloat16`` output (what users do) and compares it with lorasave's direct
GGUF: the converter upcasts the bf16 checkpoint to f32 before encoding, so its file encodes the
bf16-rounded merge, while lorasave encodes the f32 merge W0 + scale * B @ A directly. For bf16
output both are one round-to-nearest-even of the same f32 sum: identical. For f16 and q8_0 the
converter's values went through bf16 first (two roundings), lorasave's did not: the tensors an
adapter changed differ, the rest (embeddings, norms: bf16 values exact in f32) stay identical.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf_equivalence_cases import CONVERTER_ARGS, EXTRA_CASES, build_case, default_cases

from lorasave.errors import LlamaCppConverterError
from lorasave.runtimes.llama_cpp.converter import GUARD_SETUP, INSTALL_COMMAND, RUN_CONVERTER, Converter, find_converter, install_converter, is_installed

TYPES = ("f32", "f16", "bf16", "q8_0")
#: Keys allowed to differ: names and provenance stamps, not model facts. Both tools derive
#: ``general.name`` from a folder name (the converter title-cases M's folder name, "Merged Float32";
#: lorasave uses ``--name``/OUT's name); the converter copies ``general.tags`` (and other
#: ``general.*`` provenance) from the model card of the checkpoint it reads, here the card that
#: ``lorasave merge`` wrote into M, which a direct export from base + adapter does not have.
STAMP_KEYS = frozenset({"general.name", "general.tags", "general.quantized_by", "general.url", "general.source.url"})
#: Keys lorasave may write where the converter writes nothing (never a different value): the
#: ``add_bos`` / ``add_eos`` flags, which lorasave derives from what the transformers tokenizer does
#: when its files do not say (``gguf_vocab._add_flags``); without them llama.cpp adds BOS for
#: SentencePiece and GPT-2 vocabularies, which may disagree with the tokenizer.
LORASAVE_ONLY_KEYS = frozenset({"tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"})
#: Token-list keys allowed to be the converter's list cut to the rows of the converter's own
#: ``token_embd`` when its list is longer than that (Gemma 3 with a tokenizer.json smaller than the
#: embedding: the converter's file does not load in llama.cpp; see the module docstring).
CUT_TOKEN_KEYS = frozenset({"tokenizer.ggml.tokens", "tokenizer.ggml.token_type"})
#: Why the order of the tensors is not compared (printed, never counted as a difference).
ORDER_NOTE = (
    "the converter writes the merged checkpoint's tensors shard by shard, each shard's sorted by HF name as strings "
    "(gguf-py SafetensorsLocal; ModelBase.index_tensors / prepare_tensors), so its order depends on how that checkpoint "
    "was sharded; lorasave writes them in layer order; llama.cpp looks every tensor up by name (llama_model_loader::weights_map)"
)
#: Keys that are GGUF file structure, not metadata, as gguf-py's reader exposes them.
STRUCTURE_KEYS = frozenset({"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"})

# Runs the converter (remote code refused, as lorasave runs it); if its pre-tokenizer hash table has
# no entry for the tokenizer, answer with $LORASAVE_FALLBACK_PRE instead of raising (said on stderr).
SHIM = (
    GUARD_SETUP
    + """
from conversion import base
original = base.TextModel.get_vocab_base_pre
def patched(self, tokenizer):
    try:
        return original(self, tokenizer)
    except NotImplementedError:
        print("LORASAVE-SHIM: pre-tokenizer hash unknown, using", os.environ["LORASAVE_FALLBACK_PRE"], file=sys.stderr)
        return os.environ["LORASAVE_FALLBACK_PRE"]
base.TextModel.get_vocab_base_pre = patched
"""
    + RUN_CONVERTER
)


# --------------------------------------------------------------------------- the converter


def convert(conv: Converter, model: Path, out: Path, outtype: str, fallback_pre: str, args: tuple[str, ...] = ()) -> tuple[float, bool]:
    """Run the converter through :data:`SHIM` (with more options ``args``); return (wall seconds, whether the pre-tokenizer was patched).

    Raises:
        LlamaCppConverterError: the converter failed.
    """
    start = time.perf_counter()
    log = conv.convert(model, out, outtype, env={"LORASAVE_FALLBACK_PRE": fallback_pre}, prelude=SHIM, args=args)
    return time.perf_counter() - start, "LORASAVE-SHIM" in log


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc


def ensure_converter(folder: Path | None = None) -> Converter:
    """llama.cpp's converter of the runtime's version, installed into ``folder`` (default: lorasave's) when missing."""
    if not is_installed(folder):
        print(f"installing llama.cpp's converter ({INSTALL_COMMAND}; once, several minutes) ...", flush=True)
        print(install_converter(folder).summary(), flush=True)
    return find_converter(folder)


# --------------------------------------------------------------------------- reading + comparing


def field_value(f: Any) -> Any:
    """A GGUF metadata field as plain Python (strings decoded, arrays as lists)."""
    if not f.types:
        return None
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return [field_part(f, i) for i in f.data]
    return field_part(f, f.data[0])


def field_part(f: Any, index: int) -> Any:
    part = f.parts[index]
    if f.types[-1] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    return part.tolist()[0] if len(part) == 1 else part.tolist()


def short(value: Any) -> str:
    text = repr(value)
    if isinstance(value, list) and len(value) > 4:
        text = f"[{len(value)} items: {repr(value[:3])[1:-1]}, ...]"
    return text if len(text) <= 90 else text[:87] + "..."


@dataclass
class Comparison:
    """How one lorasave GGUF compares with the converter's."""

    meta_diffs: list[str] = field(default_factory=list)  # unexpected metadata differences
    stamp_diffs: list[str] = field(default_factory=list)  # differences in STAMP_KEYS
    extra_keys: list[str] = field(default_factory=list)  # LORASAVE_ONLY_KEYS present only in lorasave
    cut_keys: list[str] = field(default_factory=list)  # CUT_TOKEN_KEYS: the converter's list cut to its token_embd rows
    order: str | None = None  # same tensor names in another order (allowed, see ORDER_NOTE)
    layout_diffs: list[str] = field(default_factory=list)  # tensor names / types / shapes
    identical: dict[str, list[int]] = field(default_factory=dict)  # GGML type -> [identical, total]
    data_diffs: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not self.meta_diffs and not self.layout_diffs and not self.data_diffs


def compare_files(ours: Path, ref: Path) -> Comparison:
    """Compare metadata, tensor layout and data bytes of two GGUF files."""
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(ref)
    out = Comparison()
    fa = {k: f for k, f in a.fields.items() if k not in STRUCTURE_KEYS}
    fb = {k: f for k, f in b.fields.items() if k not in STRUCTURE_KEYS}
    ref_rows = next((int(t.shape[1]) for t in b.tensors if t.name == "token_embd.weight" and len(t.shape) == 2), None)  # ggml (n_embd, n_vocab)
    for key in sorted(fa.keys() | fb.keys()):
        target = out.stamp_diffs if key in STAMP_KEYS else out.meta_diffs
        if key not in fa:
            target.append(f"{key}: only in converter = {short(field_value(fb[key]))}")
        elif key not in fb:
            target = out.extra_keys if key in LORASAVE_ONLY_KEYS else target
            target.append(f"{key}: only in lorasave = {short(field_value(fa[key]))}")
        else:
            ta, tb = [t.name for t in fa[key].types], [t.name for t in fb[key].types]
            va, vb = field_value(fa[key]), field_value(fb[key])
            if ta != tb:
                target.append(f"{key}: type lorasave {ta} vs converter {tb}")
            elif va != vb and key in CUT_TOKEN_KEYS and ref_rows is not None and len(vb) > ref_rows == len(va) and va == vb[:ref_rows]:
                out.cut_keys.append(f"{key}: lorasave {len(va)} entries = the converter's {len(vb)} cut to its token_embd rows")
            elif va != vb:
                target.append(f"{key}: lorasave {short(va)} vs converter {short(vb)}")
    ta = {t.name: t for t in a.tensors}
    tb = {t.name: t for t in b.tensors}
    names_a, names_b = [t.name for t in a.tensors], [t.name for t in b.tensors]
    if names_a != names_b:
        only_a, only_b = sorted(ta.keys() - tb.keys()), sorted(tb.keys() - ta.keys())
        if only_a or only_b or len(names_a) != len(names_b):
            out.layout_diffs.append(f"tensor names: only lorasave {only_a[:5]}, only converter {only_b[:5]}")
        else:
            i = next(i for i, (x, y) in enumerate(zip(names_a, names_b, strict=True)) if x != y)
            out.order = f"tensor order differs from position {i} on: lorasave {names_a[i]}, converter {names_b[i]}"
    for name in [n for n in ta if n in tb]:
        x, y = ta[name], tb[name]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            out.layout_diffs.append(f"{name}: lorasave {x.tensor_type.name} {list(x.shape)} vs converter {y.tensor_type.name} {list(y.shape)}")
            continue
        same = np.asarray(x.data).tobytes() == np.asarray(y.data).tobytes()
        counts = out.identical.setdefault(x.tensor_type.name, [0, 0])
        counts[0] += same
        counts[1] += 1
        if not same:
            out.data_diffs.append(name)
    return out


# --------------------------------------------------------------------------- cases


def lorasave_cmd() -> list[str]:
    script = Path(sys.executable).parent / "lorasave"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lorasave"]


@dataclass
class CaseResult:
    name: str
    rows: list[tuple[str, Comparison, bool, float, float]] = field(default_factory=list)  # type, cmp, patched, t_ours, t_ref
    error: str | None = None


def gguf_pre(path: Path) -> str:
    f = gguf.GGUFReader(path).fields.get("tokenizer.ggml.pre")
    return str(field_value(f)) if f is not None else "default"


def run_case(name: str, workdir: Path, conv: Converter, types: list[str], tokenizer_dir: Path | None, merge_dtype: str = "float32") -> CaseResult:
    """Merge, convert and export one case for every type; compare each pair."""
    case_root = workdir / f"{name}{'-smol' if tokenizer_dir else ''}{'' if merge_dtype == 'float32' else '-bf16base'}"
    result = CaseResult(f"{name}{'' if merge_dtype == 'float32' else ' bf16 base+merge'}")
    try:
        base, lora = build_case(name, case_root / "model", tokenizer_dir, merge_dtype)
    except Exception as exc:  # a case that cannot be built is reported, the others still run
        result.error = f"building the tiny model failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return result
    merged = case_root / f"merged-{merge_dtype}"
    run([*lorasave_cmd(), "merge", str(base), str(lora), "-o", str(merged), "--dtype", merge_dtype, "--overwrite", "--quiet"])
    for t in types:
        ours_dir = case_root / f"lorasave-{t}"
        start = time.perf_counter()
        proc = subprocess.run(
            [*lorasave_cmd(), "gguf", str(base), str(lora), "-o", str(ours_dir), "--type", t, "--name", "merged", "--overwrite", "--quiet"],
            capture_output=True,
            text=True,
            check=False,
        )
        t_ours = time.perf_counter() - start
        if proc.returncode != 0:
            result.error = (proc.stdout + proc.stderr).strip().splitlines()[-1]
            return result
        ours = next(ours_dir.glob("*.gguf"))
        ref = case_root / f"converter-{merge_dtype}-{t}.gguf"
        try:
            t_ref, patched = convert(conv, merged, ref, t, gguf_pre(ours), CONVERTER_ARGS.get(name.removesuffix("-spm"), ()))
        except LlamaCppConverterError as exc:
            result.error = str(exc)
            return result
        result.rows.append((t, compare_files(ours, ref), patched, t_ours, t_ref))
    return result


# --------------------------------------------------------------------------- report


def report(results: list[CaseResult]) -> bool:
    print()
    print(f"{'case':<26}{'type':<6}{'metadata':<12}{'layout':<9}{'tensor data identical':<40}{'pre shim':<10}{'s ours/conv'}")
    all_equal = True
    for r in results:
        if r.error:  # a case that did not run proves nothing: it fails the comparison
            print(f"{r.name:<26}{'-':<6}FAILED to run: {r.error}")
            all_equal = False
            continue
        for t, cmp, patched, t_ours, t_ref in r.rows:
            meta = "equal" if not cmp.meta_diffs else f"{len(cmp.meta_diffs)} diff"
            layout = "equal" if not cmp.layout_diffs else f"{len(cmp.layout_diffs)} diff"
            data = ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in sorted(cmp.identical.items()))
            print(f"{r.name:<26}{t:<6}{meta:<12}{layout:<9}{data:<40}{'used' if patched else '-':<10}{t_ours:.1f}/{t_ref:.1f}")
            if "bf16 base" not in r.name:
                all_equal &= cmp.equal
    print()
    for r in results:
        for t, cmp, _, _, _ in r.rows:
            for line in cmp.meta_diffs + cmp.layout_diffs:
                print(f"  {r.name} {t}: {line}")
            if cmp.data_diffs:
                print(
                    f"  {r.name} {t}: data differs in {len(cmp.data_diffs)} tensors: {', '.join(cmp.data_diffs[:6])}{' ...' if len(cmp.data_diffs) > 6 else ''}"
                )
    extra = sorted({line for r in results for _, c, _, _, _ in r.rows for line in c.extra_keys})
    print(f"keys only lorasave writes, allowed ({', '.join(sorted(LORASAVE_ONLY_KEYS))}):")
    for line in extra:
        print(f"  {line}")
    order = sorted({f"{r.name}: {c.order}" for r in results for _, c, _, _, _ in r.rows if c.order})
    print(f"tensor order, allowed ({ORDER_NOTE}):")
    for line in order:
        print(f"  {line}")
    cut = sorted({f"{r.name}: {line}" for r in results for _, c, _, _, _ in r.rows for line in c.cut_keys})
    print(f"token lists cut to the converter's own token_embd rows, allowed ({', '.join(sorted(CUT_TOKEN_KEYS))}):")
    for line in cut:
        print(f"  {line}")
    stamps = sorted({line for r in results for _, c, _, _, _ in r.rows for line in c.stamp_diffs})
    print(f"stamp keys allowed to differ ({', '.join(sorted(STAMP_KEYS))}):")
    for line in stamps:
        print(f"  {line}")
    return all_equal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lorasave-gguf-equivalence"))
    parser.add_argument("--converter-dir", type=Path, default=None, help="the converter's folder (default: lorasave's, installed when missing)")
    parser.add_argument("--cases", default=None, help="comma-separated cases (default: every model_type of ARCHITECTURES, and " + ", ".join(EXTRA_CASES) + ")")
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument(
        "--smollm2", type=Path, default=Path("/tmp/lorasave-real/smollm2-hf"), help="tokenizer for a second run of llama/qwen2 (skipped when missing)"
    )
    parser.add_argument("--no-bf16-path", action="store_true", help="skip the bf16-merge comparison")
    args = parser.parse_args()
    types = [t for t in args.types.split(",") if t]
    conv = ensure_converter(args.converter_dir.expanduser() if args.converter_dir else None)
    print(f"converter: {conv.source / 'convert_hf_to_gguf.py'} (llama.cpp v0.5.0 from node-llama-cpp@3.22.1; {conv.versions()})")
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: list[CaseResult] = []
    for name in [c for c in args.cases.split(",") if c] if args.cases else default_cases():
        print(f"case {name} ...", flush=True)
        results.append(run_case(name, args.workdir, conv, types, None))
    if (args.smollm2 / "tokenizer.json").is_file():
        for name in ("llama", "qwen2"):
            print(f"case {name} with the SmolLM2 tokenizer ...", flush=True)
            r = run_case(name, args.workdir, conv, types, args.smollm2)
            r.name += " +smollm2 tok"
            results.append(r)
    if not args.no_bf16_path:
        print("case llama with a bf16 base, bf16 merge path ...", flush=True)
        results.append(run_case("llama", args.workdir, conv, types, None, merge_dtype="bfloat16"))
    ok = report(results)
    print(f"\nall float32-merge cases equivalent (metadata except stamps, layout, data bytes): {ok}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
