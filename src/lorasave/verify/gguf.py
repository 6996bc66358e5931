"""``verify``'s tensors level for GGUF outputs: merged models and LoRA adapters.

Files are opened with the strict reader ``inspect`` uses (:mod:`gguf_read`); anything gguf-py
raises on their contents is one :class:`CheckpointFormatError`.

Merged models (``lorasave gguf``):

- float tensors (F32/F16/BF16) are dequantized, renamed, un-permuted and probed within one
  rounding of their type (``verify._Checker``); those an architecture's ``ValueTransform`` wrote (Qwen3.5's
  V-head reorder, ``-exp(A_log)``) are compared bit for bit with the transform of the reference merge;
- quantized tensors must be bit for bit the reference quantizer's encoding of the merge, at the
  precision lorasave handed to the quantizer (``result.quantized_from`` in ``lorasave.json``:
  float32 for every type written now; the 16-bit intermediate of the k-quants for outputs of
  lorasave versions that made them through ``llama_model_quantize``):
  the merge is recomputed here from the sources as PEFT defines it (``W0 + (B @ A) · s`` in
  float32), Gemma's norm ``+1`` added, Q/K rows permuted as llama.cpp's converter does, rounded
  to that precision, and encoded by gguf-py's ``gguf.quants.quantize`` where it
  supports the type, else by llama.cpp's own ``ggml_quantize_chunk`` (:mod:`ggml_quant`; without
  the runtime those tensors are reported not checkable). Tensors whose merge is not a plain LoRA
  sum (DoRA, IA3, weighted combinations) are probed within the type's error bound instead.

GGUF LoRA adapters (``lorasave gguf-adapter``): each ``lora_a``/``lora_b`` pair is read back,
B's Q/K rows are un-permuted, and ``alpha/r · B_gguf @ (A_gguf @ x)`` is compared with the source
adapter's ``s · B @ (A @ x)`` for random ``x``, within the types' rounding bounds (this undoes the
folded scale: ``alpha/r · fold = s``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorasave.verify.report import VerifyReport


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``, restated: within each head, rotate-half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def name_map(ckpt: Any) -> tuple[dict[str, str], Any]:
    """GGUF tensor name -> base tensor name, by inverting ``gguf.get_tensor_name_map``; and the arch rules."""
    import gguf

    from lorasave.formats.gguf.arch import Hparams, gguf_arch_for

    rules = gguf_arch_for(ckpt.config)
    names = gguf.get_tensor_name_map(rules.arch, Hparams.of(ckpt.config).n_layer)
    inverse: dict[str, str] = {}
    for hf in ckpt.tensors:
        text = rules.text_name(hf)  # a multimodal checkpoint's language model (GgufArch.text_of)
        if text is None or text in rules.drop:
            continue
        for out, _ in _outputs(rules, text):  # a ValueTransform's tensors (renamed, split), else the tensor itself
            g = names.get_name(out, try_suffixes=(".weight", ".bias"))
            if g is not None:
                inverse[g] = hf
    return inverse, rules


def _outputs(rules: Any, text: str) -> list[tuple[str, Any]]:
    """``(HF name gguf-py maps, ValueTransform function or None)`` of each GGUF tensor written from text-model tensor ``text``."""
    rule = next((r for r in rules.transforms if r.matches(text)), None)
    if rule is None:
        return [(text, None)]
    prefix = text[: len(text) - len(rule.suffix)]
    return [(prefix + name, fn) for name, fn in rule.into]


def _transform(rules: Any, names: Any, hf: str, gname: str) -> Any:
    """The ``ValueTransform`` function (``fn(hp, values)``) that wrote GGUF tensor ``gname`` from checkpoint tensor ``hf``, or None."""
    text = rules.text_name(hf)
    for out, fn in [] if text is None else _outputs(rules, text):
        if fn is not None and names.get_name(out, try_suffixes=(".weight", ".bias")) == gname:
            return fn
    return None


def _heads(ckpt: Any, rules: Any, hf: str) -> int | None:
    """Heads of the Q/K permutation applied to ``hf``, or None."""
    from lorasave.formats.gguf.arch import Hparams

    if not rules.permute_qk:
        return None
    n_head, n_kv = Hparams.of(ckpt.config).heads
    if hf.endswith(("q_proj.weight", "q_proj.bias")):
        return n_head
    if hf.endswith(("k_proj.weight", "k_proj.bias")):
        return n_kv
    return None


def _dequantized(path: Path, t: Any) -> torch.Tensor:
    """A GGUF tensor as float32, rows first (a writable copy)."""
    import gguf

    from lorasave.formats.gguf.read import guarded

    def go() -> torch.Tensor:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        return torch.from_numpy(np.array(data, dtype=np.float32)).reshape(shape)

    return guarded(path, go)


def _reference_merge(checker: Any, name: str) -> torch.Tensor | None:
    """The merge of tensor ``name`` as PEFT defines it, float32, or None when it is not a plain LoRA sum."""
    from lorasave.verify.probes import base_tensor

    e = checker.exp.get(name)
    reader = checker.reader
    if e is None:
        return base_tensor(checker.ckpt, name, reader).float() if name in checker.ckpt.tensors else None
    if e.kind == "replace":
        assert e.replace is not None
        return e.replace[0].tensor(e.replace[1], reader).float()
    if e.kind != "lora" or any(w != 1.0 for w in checker.weights) or name not in checker.ckpt.tensors:
        return None
    w = e.replace[0].tensor(e.replace[1], reader).float() if e.replace else base_tensor(checker.ckpt, name, reader).float()
    for ad, part, s in e.terms:
        a = ad.tensor(part.lora_A, reader).float()
        b = ad.tensor(part.lora_B, reader).float()
        a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        d = torch.mm(a.T, b.T) if checker.transposed(part) else torch.mm(b, a)
        w = (w.reshape(d.shape) + d.mul_(s)).reshape(w.shape)
    return w


def _reference_bytes(x: torch.Tensor, qtype: Any, gname: str, quantized_from: str, importance: np.ndarray | None = None) -> np.ndarray | str:
    """The reference encoding of ``x`` (float32, file layout) as ``qtype``, or why it cannot be made;
    with ``importance`` (float32 ``(n_mat, ne0)``, the output's ``--imatrix``) by ``ggml_quantize_chunk`` with it."""
    import gguf

    from lorasave.formats.gguf.quant import WRITABLE, converter_type
    from lorasave.runtimes.llama_cpp import ggml as ggml_quant

    Q = gguf.GGMLQuantizationType
    via = {"f16": Q.F16, "bf16": Q.BF16}.get(quantized_from)
    if via is not None and converter_type(gname, tuple(x.shape), via) is via:  # the 16-bit intermediate
        x = x.to(torch.float16 if via is Q.F16 else torch.bfloat16).float()
    rows = x.reshape(-1, x.shape[-1]).numpy() if x.dim() else x.reshape(1, 1).numpy()
    if importance is not None and qtype not in (Q.F32, Q.F16, Q.BF16):
        if not ggml_quant.available():
            from lorasave.runtimes.llama_cpp.lib import INSTALL_COMMAND

            return f"{qtype.name} bytes made with an importance matrix are checked with llama.cpp's own quantizer: install the runtime with {INSTALL_COMMAND}"
        experts = np.split(rows, importance.shape[0])  # rows of expert k use importance row k
        return np.concatenate([ggml_quant.quantize(np.ascontiguousarray(r), qtype, importance[k]).reshape(-1) for k, r in enumerate(experts)])
    if qtype in WRITABLE:
        return np.asarray(gguf.quants.quantize(rows, qtype)).view(np.uint8).reshape(-1)
    if not ggml_quant.available():
        from lorasave.runtimes.llama_cpp.lib import INSTALL_COMMAND

        return f"{qtype.name} bytes are checked with llama.cpp's own quantizer: install the runtime with {INSTALL_COMMAND}"
    return ggml_quant.quantize(rows, qtype).reshape(-1)


def _output_imatrix(out: Path, manifest: dict[str, Any], report: VerifyReport) -> Any:
    """The importance matrix the output was quantized with (its copy in OUT, ``sources.imatrix.file``), or None."""
    src = manifest.get("sources", {}).get("imatrix")
    if not isinstance(src, dict) or src.get("file") not in manifest.get("files", {}):  # listed: its name and sha256 are checked
        return None
    from lorasave.errors import LorasaveError
    from lorasave.formats.gguf.imatrix import load_imatrix

    try:
        return load_imatrix(out / src["file"])
    except LorasaveError as e:
        report.fail(src["file"], f"the importance matrix the output was quantized with cannot be read: {e}", tensors=0)
        return None


def _importance(imatrix: Any, name: str, x: torch.Tensor) -> np.ndarray | None:
    """The importance of tensor ``name`` as the export used it (``gguf_mix.importances``), or None."""
    values = None if imatrix is None else imatrix.importance(name)
    if values is None:
        return None
    n_mat = int(x.shape[-3]) if x.dim() >= 3 else 1
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    return values.reshape(n_mat, -1) if values.size == x.shape[-1] * n_mat else None


def check_gguf(out: Path, manifest: dict[str, Any], report: VerifyReport, checker: Any) -> None:
    """Every tensor of OUT's GGUF file(s): float ones probed, quantized ones bit-equal to the reference (module docstring)."""
    import gguf

    from lorasave.formats.gguf.arch import Hparams
    from lorasave.formats.gguf.read import open_gguf
    from lorasave.verify.probes import TINY, block_error, ggml_eps, norm_shift, q8_0_error, unpermute_qk

    ckpt = checker.ckpt
    inverse, rules = name_map(ckpt)
    hp = Hparams.of(ckpt.config)
    names = gguf.get_tensor_name_map(rules.arch, hp.n_layer)
    result = manifest.get("result", {})
    per_file = result.get("gguf_files") if isinstance(result.get("gguf_files"), dict) else {}
    for fname in manifest.get("files", {}):
        path = out / fname
        if not fname.endswith(".gguf") or not path.is_file():
            continue
        facts = per_file.get(fname) if isinstance(per_file.get(fname), dict) else result  # one file per type (--type a,b)
        quantized_from = str(facts.get("quantized_from") or facts.get("intermediate") or "f32")
        reader = open_gguf(path)
        imatrix = _output_imatrix(out, manifest, report)
        for t in reader.tensors:
            hf = inverse.get(t.name)
            if hf is None:
                report.not_checkable(t.name, "GGUF tensor with no base tensor name")
                continue
            what = f" (GGUF {t.name}, {t.tensor_type.name})"
            expected = checker.exp.get(hf)
            if expected is not None and expected.kind == "skip":  # e.g. changed by a live PeftModel's adapter that was not saved
                report.not_checkable(hf, expected.reason or "not probed")
                continue
            heads = _heads(ckpt, rules, hf)
            shift = norm_shift(ckpt.config, hf)
            eps = ggml_eps(t.tensor_type)
            fn = _transform(rules, names, hf, t.name)  # not undone: the bytes of the reference's transform are compared
            ref = _reference_merge(checker, hf) if eps is None or fn is not None else None
            if ref is not None:
                if fn is not None:
                    ref = fn(hp, ref)  # on the merge, before the norm shift and Q/K permute (the export's order)
                rows = int(t.shape.tolist()[-1])  # ggml order: the last is the row count
                x = ref[:rows] if ref.dim() >= 1 and rows < ref.shape[0] else ref
                if shift:
                    x = x + shift  # in float32, as the export
                if heads is not None:
                    x = permute_rows(x, heads)
                want = _reference_bytes(x.contiguous(), t.tensor_type, t.name, quantized_from, _importance(imatrix, t.name, x))
                if isinstance(want, str):
                    report.not_checkable(hf, want)
                    continue
                got = np.asarray(t.data).view(np.uint8).reshape(-1)
                if got.shape == want.shape and np.array_equal(got, want):
                    report.exact()
                else:
                    block = gguf.GGML_QUANT_SIZES[t.tensor_type][1]
                    n = got.size // block
                    bad = int((got.reshape(n, block) != want.reshape(n, block)).any(1).sum()) if got.shape == want.shape else n
                    report.fail(hf, f"{bad} of {n} blocks differ from the reference quantizer's encoding of the merge at {quantized_from}{what}")
                continue
            if fn is not None:
                report.not_checkable(hf, f"llama.cpp's converter transforms its values and its merge is not a plain LoRA sum{what}")
                continue
            w = _dequantized(path, t)
            if heads is not None:
                w = unpermute_qk(w, heads)
            if shift:
                w = (w.double() - shift).float()  # exact: both are float32 values near each other
            base_rows = int(ckpt.tensors[hf].shape[0]) if getattr(ckpt.tensors[hf], "shape", None) else 0
            if w.dim() >= 1 and w.shape[0] < base_rows:  # Gemma 3's token_embd cut to the tokenizer: the rest is the base's
                from lorasave.verify.probes import base_tensor

                w = torch.cat([w, base_tensor(ckpt, hf, checker.reader)[w.shape[0] :].float()])
            if eps is None and t.tensor_type.name == "Q8_0":
                err: torch.Tensor | float = q8_0_error(w)
            elif eps is None and (blk := block_error(w, t.tensor_type.name)) is not None:
                err = blk
            elif eps is None:
                report.not_checkable(hf, f"GGML type {t.tensor_type.name} of a merge that is not a plain LoRA sum")
                continue
            else:
                err = eps
            if shift and not isinstance(err, torch.Tensor):
                err = 2 * err * (w.abs() + abs(shift)) + TINY  # the export rounded w + shift
            checker.check(hf, w, None, err, what)


def _elementwise_error(w: torch.Tensor, qtype: Any) -> torch.Tensor | None:
    """Per-element error bound of a dequantized adapter tensor of ``qtype``, or None."""
    from lorasave.verify.probes import TINY, ggml_eps, q8_0_error

    eps = ggml_eps(qtype)
    if eps is not None:
        return eps * w.abs() + TINY
    return q8_0_error(w) if qtype.name == "Q8_0" else None


def check_gguf_adapter(out: Path, manifest: dict[str, Any], report: VerifyReport, ckpt: Any, ads: list[Any], seed: int) -> None:
    """Probe every ``lora_a``/``lora_b`` pair of OUT's GGUF adapter against the source adapter (module docstring)."""
    from lorasave.sources.checkpoint import TensorReader

    if len(ads) != 1:
        from lorasave.verify.sources import live_adapter_unsaved

        report.skipped = (
            "the adapter lived in a PeftModel and was not saved: pass --adapter DIR (model.save_pretrained(DIR)) to probe the GGUF adapter"
            if live_adapter_unsaved(manifest, ads)
            else "a GGUF LoRA adapter is checked against exactly one source adapter"
        )
        return
    with TensorReader() as reader:
        seen = _check_pairs(out, manifest, report, ckpt, ads[0], reader, torch.Generator().manual_seed(seed))
    for module in sorted(set(ads[0].lora) - seen):
        report.fail(module, "LoRA module of the source adapter missing from the GGUF adapter", tensors=0)


def _check_pairs(out: Path, manifest: dict[str, Any], report: VerifyReport, ckpt: Any, ad: Any, ad_reader: Any, gen: torch.Generator) -> set[str]:
    """The pairs of :func:`check_gguf_adapter`; returns the source modules found."""
    from lorasave.formats.gguf.read import guarded, open_gguf
    from lorasave.verify.probes import PROBES, TINY, unpermute_qk

    inverse, rules = name_map(ckpt)
    seen: set[str] = set()
    for fname in manifest.get("files", {}):
        path = out / fname
        if not fname.endswith(".gguf") or not path.is_file():
            continue
        reader = open_gguf(path)
        alpha_field = reader.fields.get("adapter.lora.alpha")
        if alpha_field is None:
            report.fail(fname, "no adapter.lora.alpha: not a GGUF LoRA adapter", tensors=0)
            continue
        alpha = guarded(path, lambda f=alpha_field: float(f.parts[f.data[0]][0]))
        by_name = {t.name: t for t in reader.tensors}
        for tname, ta in by_name.items():
            if not tname.endswith(".lora_a"):
                if not tname.endswith(".lora_b"):
                    report.not_checkable(tname, "not a lora_a/lora_b tensor")
                continue
            gname = tname[: -len(".lora_a")]
            tb = by_name.get(gname + ".lora_b")
            hf = inverse.get(gname)
            part = ad.parts.get(hf[: -len(".weight")]) if hf and hf.endswith(".weight") else None
            if tb is None or part is None or not part.is_lora:
                report.fail(gname, "a lora_a without its lora_b, or for no LoRA module of the source adapter", tensors=2 if tb is not None else 1)
                continue
            seen.add(part.module)
            a_g, b_g = _dequantized(path, ta), _dequantized(path, tb)
            embedding = "lora_embedding_A" in part.keys
            if embedding:
                a_g = a_g.T  # (vocab, r) -> (r, vocab)
            heads = _heads(ckpt, rules, hf or "")
            if heads is not None:
                b_g = unpermute_qk(b_g, heads)
            a = ad.tensor(part.lora_A, ad_reader).float()
            b = ad.tensor(part.lora_B, ad_reader).float()
            a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
            err_a, err_b = _elementwise_error(a_g, ta.tensor_type), _elementwise_error(b_g, tb.tensor_type)
            if err_a is None or err_b is None:
                report.not_checkable(gname, f"GGUF adapter types {ta.tensor_type.name}/{tb.tensor_type.name} not probed")
                continue
            if a_g.shape != a.shape or b_g.shape != b.shape:
                report.fail(gname, f"lora_a/lora_b shapes {tuple(a_g.shape)}/{tuple(b_g.shape)}, source {tuple(a.shape)}/{tuple(b.shape)}", tensors=2)
                continue
            c = alpha / b_g.shape[1]
            s = float(part.scaling)
            x = torch.randn(a.shape[1], PROBES, generator=gen)
            ax = x.abs()
            got = c * (b_g @ (a_g @ x))
            want = s * (b @ (a @ x))
            err_b = err_b + 2.0**-24 * b_g.abs()  # the fold's float32 product
            bound = abs(c) * (err_b @ (a_g.abs() @ ax) + (b_g.abs() + err_b) @ (err_a @ ax))
            bound = bound + 1e-5 * (abs(c) * (b_g.abs() @ (a_g.abs() @ ax)) + abs(s) * (b.abs() @ (a.abs() @ ax))) + TINY
            worst = float(((got - want).abs() / bound).max())
            if worst <= 1.0:
                report.probed(worst, tensors=2)
            else:
                report.fail(
                    hf or gname,
                    f"alpha/r·B_gguf·A_gguf differs from the source's s·B·A by {worst:.1f}× the rounding bound "
                    f"(GGUF {gname}.lora_a/.lora_b, {ta.tensor_type.name}; wrong scale, permutation or corrupted bytes)",
                    tensors=2,
                )
    return seen
