"""ONNX export of a merged model: the decoder graph built directly, the merged weights streamed into it.

``plan_onnx`` plans the merge (``plan.merge_plan.build_plan``, float32 values) and an
:class:`~lorasave.formats.onnx.output.OnnxOutput` writer: the pass merges each tensor block by
block and the writer casts (or quantizes to ``MatMulNBits``) and writes each block into
``model.onnx.data`` at once, so memory stays small whatever the model size; ``model.onnx`` (the graph of
``formats.onnx.graph``) follows. The folder also gets ``config.json``, ``generation_config.json``,
the tokenizer, ``genai_config.json`` (onnxruntime-genai runs the same graph) and ``lorasave.json``,
through the staging folder and atomic rename every command uses.

Graph interface (optimum's layout): inputs ``input_ids``, ``attention_mask`` (left padding),
``position_ids``, ``past_key_values.N.key/value``; outputs ``logits``, ``present.N.key/value``.
Architectures: ``formats.onnx.spec.FAMILIES`` (llama, mistral, qwen2, qwen3, phi3, gemma3_text);
any other decoder goes through ``formats.onnx.legacy`` (``torch.onnx.export`` of the merged model,
float32/float16 only, memory about twice the float32 model).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorasave.errors import InvalidOptionError
from lorasave.formats.card_sources import card_sources
from lorasave.formats.onnx.genai import write_genai_config
from lorasave.formats.onnx.graph import LORA_RANK_DIM, OPSET, QuantSpec, input_names, output_names
from lorasave.formats.onnx.lora import parse_lora_inputs
from lorasave.formats.onnx.output import DATA_NAME, OnnxOutput
from lorasave.formats.onnx.run import ONNX_NAME, OnnxDecoder, OnnxVerificationError, import_onnx, onnx_generate, verify_onnx
from lorasave.formats.onnx.spec import FAMILIES, decoder_spec
from lorasave.merging.stream import Timings
from lorasave.pipeline.manifest import MANIFEST_NAME, result_dict, sha256_file, sha256_source, write_manifest
from lorasave.pipeline.output import align_generation_eos, carry_files, carry_plan, check_output_path, tokenizer_source, write_config
from lorasave.pipeline.run import PlannedOutput, single_output
from lorasave.plan.merge_plan import build_plan
from lorasave.sources import stamp as source_stamp
from lorasave.sources.adapter import Adapter, adapter_list, load_adapters
from lorasave.sources.architecture import inspect_architecture
from lorasave.sources.checkpoint import Checkpoint
from lorasave.sources.named_base import open_base
from lorasave.util.notes import log_notes

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

__all__ = ["OnnxDecoder", "OnnxResult", "OnnxVerificationError", "export_onnx", "input_names", "onnx_generate", "output_names", "plan_onnx", "verify_onnx"]
#: Largest |ONNX logit − reference logit| accepted by the verification, relative to max |logit|.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16", "fp16": "float16", "half": "float16"}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_BITS = {"int4": 4, "int8": 8}


@dataclass
class OnnxResult:
    """What ``export_onnx`` wrote.

    Attributes:
        output: the output folder.
        files: names of the files written, manifest included.
        verification: ``verify_onnx``'s numbers (against the unmerged PeftModel), None with ``verify=False``.
        seconds: wall time of the whole call.
        dtype: ``"float32"`` or ``"float16"`` (activations, cache, logits; weights unless quantized).
        quantize: ``"int4"`` / ``"int8"`` (MatMulNBits) or None.
        opset: the ONNX opset of the default domain.
        n_layers: decoder layers (one key and one value tensor each in the cache).
        num_kv_heads: key/value heads, dimension 1 of the cache tensors.
        head_dim: dimension 3 of the cache tensors.
        total_bytes: bytes of the ONNX files (graph and external data).
        timings: seconds per phase: read, merge (cast/quantize), write, hash, verify.
        block_size, symmetric: the MatMulNBits settings (None without ``quantize``).
        lora_inputs: the projections whose Linears take LoRA inputs (``formats.onnx.lora``), empty for none.
        lora_modules: the number of such Linears (two graph inputs each).
    """

    output: Path
    files: list[str]
    verification: dict[str, Any] | None
    seconds: float
    dtype: str
    quantize: str | None
    opset: int
    n_layers: int
    num_kv_heads: int
    head_dim: int
    total_bytes: int
    timings: dict[str, float] = field(default_factory=dict)
    block_size: int | None = None
    symmetric: bool | None = None
    lora_inputs: list[str] = field(default_factory=list)
    lora_modules: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``--json``)."""
        return result_dict(self)

    def summary(self) -> str:
        """One line for humans."""
        form = f"{self.quantize} MatMulNBits weights (block {self.block_size}), {self.dtype} activations" if self.quantize else self.dtype
        line = (
            f"exported an ONNX decoder ({self.n_layers} layers, KV cache {self.num_kv_heads} heads x {self.head_dim}, {form}) "
            f"to {self.output} ({self.total_bytes / 1e6:.1f} MB) in {self.seconds:.1f} s"
        )
        if self.lora_inputs:
            line += f"; LoRA inputs on {self.lora_modules} Linears ({', '.join(self.lora_inputs)})"
        v = self.verification
        if v:
            verdict = "not checked" if v["passed"] is None else ("passed" if v["passed"] else "FAILED")
            line += (
                f"; onnxruntime vs PeftModel: max |dlogit| {v['max_abs_diff']:.3g} = {v['relative_diff']:.2g} of max |logit|, "
                f"top-1 {v['top1_agreement']:.1%} ({verdict})"
            )
        return line


def parse_onnx_options(
    dtype: str | torch.dtype, quantize: str | None, opset: int, block_size: int = 32, symmetric: bool = True
) -> tuple[str, QuantSpec | None]:
    """Validate ``export_onnx``'s options.

    Returns:
        ``(dtype, quant)``: ``"float32"``/``"float16"`` and the MatMulNBits settings or None.

    Raises:
        InvalidOptionError: unknown dtype or quantization, a block size that is not a power of two
            of at least 16, opset below 20 (Gelu with approximate="tanh").
    """
    key = str(dtype).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise InvalidOptionError(f"ONNX dtype {dtype!r}: use float32 or float16 (onnxruntime has few bfloat16 kernels)")
    name = _DTYPES[key]
    q = None if quantize is None or str(quantize).lower() in ("", "none") else str(quantize).lower()
    if q is not None and q not in _BITS:
        raise InvalidOptionError(f"quantize {quantize!r}: use int4 or int8 (weight-only MatMulNBits)")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise InvalidOptionError(f"block size {block_size!r}: MatMulNBits takes a power of two, at least 16 (32 and 128 are usual)")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 20:
        raise InvalidOptionError(f"opset {opset!r}: the ONNX graph needs opset 20 or newer")
    return name, (QuantSpec(_BITS[q], block_size, bool(symmetric)) if q else None)


def _reference(ckpt_root: Path, ads: list[Adapter]) -> Any:
    """Base in float32 with the adapters unmerged under PEFT (all active): the verification's reference."""
    from peft import PeftModel

    from lorasave.formats.onnx.legacy import _quiet
    from lorasave.sources.hf_load import load_causal_lm

    with _quiet():
        model = load_causal_lm(ckpt_root, dtype=torch.float32, attn_implementation="eager").eval()
        if not ads:
            return model
        names = [f"a{i}" for i in range(len(ads))]
        peft = PeftModel.from_pretrained(model, ads[0].root, adapter_name=names[0])
        for n, ad in zip(names[1:], ads[1:], strict=True):
            peft.load_adapter(ad.root, adapter_name=n)
        if len(names) > 1:
            peft.base_model.set_adapter(names)
    return peft.eval()


def plan_onnx(
    base: PathLike | Checkpoint | None,
    adapters: PathLike | Sequence[PathLike] | None,
    output: PathLike,
    *,
    dtype: str | torch.dtype = "float32",
    quantize: str | None = None,
    block_size: int = 32,
    symmetric: bool = True,
    opset: int = OPSET,
    overwrite: bool = False,
    verify: bool = False,
    weights: Sequence[float] | None = None,
    tokenizer: PathLike | None = None,
    allow_pickle: bool = False,
    progress: bool = False,
    lora_inputs: PathLike | Sequence[PathLike] | None = None,
) -> PlannedOutput:
    """Plan ``export_onnx``: adapter(s) merged into a base, streamed into a directly built ONNX decoder.

    OUT gets ``model.onnx`` + ``model.onnx.data`` (graph and external weights), ``genai_config.json``,
    ``config.json`` (``dtype`` set), ``generation_config.json``, the tokenizer, license files and
    ``lorasave.json``; it appears atomically. Memory: one tensor's row blocks at a time.

    Args:
        base: base folder or a Hub id in the local HF cache.
        adapters: PEFT adapter folder(s), or None / [] to export the base.
        output: the folder to create.
        dtype: ``"float32"`` or ``"float16"``: activations, cache and logits, and the weights unless quantized.
        quantize: ``"int4"`` or ``"int8"``: every Linear weight (lm_head included, embeddings not:
            onnxruntime-genai's builder defaults) as ``MatMulNBits``, quantized from the merged
            value in ``dtype`` by onnxruntime's block quantizer; None for none.
        block_size: elements of each scale's block along the input axis (32, 128...).
        symmetric: no zero points (onnxruntime's ``is_symmetric``).
        opset: ONNX opset of the default domain (20 or newer).
        overwrite: replace an existing lorasave output at ``output``.
        verify: compare onnxruntime with the unmerged PeftModel in float32 (prefill, decode with
            the cache, left-padded batch) before the rename; float32 must agree within 1e-4 of max
            |logit|, float16 within 2e-2, quantized outputs are reported. Loads the float32 base.
        weights, tokenizer, allow_pickle: as ``lorasave.merge``.
        progress: a progress bar in bytes on stderr.
        lora_inputs: projections whose Linears take LoRA weights as graph inputs
            (``<module>.lora_A.weight`` (in, lora_r), ``<module>.lora_B.weight`` (lora_r, out), zero-rank
            defaults; Olive's names): names such as ``"q_proj"`` (commas allowed), ``"all-linear"``, or
            PEFT adapter folders whose modules to take; ``lorasave onnx-adapter`` writes the adapters
            (``formats.onnx.lora``). None: none.

    Raises:
        LorasaveError subclasses: InvalidOptionError, UnsupportedModelError (onnx/onnxruntime
        missing; a model type outside ``spec.FAMILIES`` reaches ``export_onnx``'s fallback instead),
        OnnxVerificationError, OutputExistsError, UnsafePathError, InsufficientDiskError, and the
        planning errors of ``lorasave.merge``.
    """
    t_start = time.perf_counter()
    dtype_name, quant = parse_onnx_options(dtype, quantize, opset, block_size, symmetric)
    onnx, ort = import_onnx(exporter=False)
    if opset > onnx.defs.onnx_opset_version():
        raise InvalidOptionError(f"opset {opset}: the installed onnx {onnx.__version__} knows opsets up to {onnx.defs.onnx_opset_version()}")
    ckpt = open_base(base, adapter_list(adapters))
    ads = load_adapters(adapter_list(adapters), allow_pickle=allow_pickle)
    tok_dir = tokenizer_source(tokenizer, [a.root for a in ads], ckpt.root)
    final = check_output_path(Path(output), [ckpt.root, *(a.root for a in ads), tok_dir], overwrite)
    plan = build_plan(
        ckpt, ads, inspect_architecture(ckpt.config), out_dtype=torch.float32, max_shard_size=1 << 62, weights=list(weights) if weights is not None else None
    )
    log_notes(logger, plan.notes)
    config = dict(ckpt.config)
    config.update({k: v for k, v in plan.config_updates.items() if "." not in k})
    spec = decoder_spec(config, plan.tensors)
    targets = parse_lora_inputs(lora_inputs, spec.family, spec.model_type, allow_pickle=allow_pickle)
    writer = OnnxOutput(spec, {n: t.shape for n, t in plan.tensors.items()}, dtype_name, quant, opset, lora=targets)
    carry = carry_plan(ckpt.root, tok_dir)

    def finish(folder: Path, job_timings: Timings) -> OnnxResult:
        timings = Timings().add(job_timings).add(writer.timings).as_dict()
        write_config(config, folder / "config.json", dtype=_TORCH_DTYPES[dtype_name])
        carry_files(ckpt.root, tok_dir, folder, carry)
        if tok_dir.resolve() != ckpt.root.resolve():
            align_generation_eos(folder, tok_dir)
        write_genai_config(folder, spec, config)
        verification = None
        if verify:
            t0 = time.perf_counter()
            verification = verify_onnx(folder / ONNX_NAME, _reference(ckpt.root, ads), tolerance=None if quant else TOLERANCE[dtype_name])
            timings["verify"] = round(time.perf_counter() - t0, 3)
            if verification["passed"] is False:
                raise OnnxVerificationError(
                    f"onnxruntime's logits differ from the PeftModel's by {verification['max_abs_diff']:.3g} "
                    f"({verification['relative_diff']:.3g} of max |logit|, tolerance {verification['tolerance']:.0e}); nothing was written. "
                    "This is an export bug worth reporting",
                    verification=verification,
                )
        sources = {
            "base": {
                "path": str(ckpt.root.resolve()),
                "hub_id": ckpt.hub_id,
                "files": {str(p.relative_to(ckpt.root)): sha256_source(p) for p in ckpt.source_files()},
            },
            "adapters": [{"path": str(a.root.resolve()), "files": {str(p.relative_to(a.root)): sha256_source(p) for p in a.source_files()}} for a in ads],
            "tokenizer": str(tok_dir.resolve()),
        }
        _write_card(folder, final.name, ckpt, sources, dtype_name, quant, opset, spec, verification, targets)
        files = dict(writer.files)
        for p in sorted(folder.iterdir()):
            if p.is_file() and p.name not in files and p.name != MANIFEST_NAME and not p.name.startswith("."):
                files[p.name] = sha256_file(p)
        settings = {
            "dtype": dtype_name,
            "quantize": f"int{quant.bits}" if quant else None,
            "block_size": quant.block_size if quant else None,
            "symmetric": quant.symmetric if quant else None,
            "accuracy_level": quant.accuracy_level if quant else None,
            "opset": opset,
            "verify": verify,
            "weights": list(weights) if weights is not None else None,
            "lora_inputs": list(targets) or None,
            "exporter": "lorasave graph builder (formats.onnx.graph)",
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        }
        summary = {
            "inputs": input_names(spec.n_layers),
            "outputs": output_names(spec.n_layers),
            "architecture": spec.model_type,
            "cache": {"n_layers": spec.n_layers, "num_kv_heads": spec.n_kv_heads, "head_dim": spec.head_dim, "value_dim": spec.head_dim},
            "lora_inputs": {"projections": list(targets), "modules": len(writer.graph.lora), "rank_dim": LORA_RANK_DIM} if targets else None,
            "n_merged": len(plan.merged),
            "notes": list(plan.notes),
            "timings": timings,
            "verification": verification,
        }
        write_manifest(folder, command="onnx", sources=sources, settings=settings, result=summary, files=files)
        result = OnnxResult(
            output=final,
            files=sorted([*files, MANIFEST_NAME]),
            verification=verification,
            seconds=round(time.perf_counter() - t_start, 3),
            dtype=dtype_name,
            quantize=settings["quantize"],
            opset=opset,
            n_layers=spec.n_layers,
            num_kv_heads=spec.n_kv_heads,
            head_dim=spec.head_dim,
            total_bytes=sum((folder / n).stat().st_size for n in (ONNX_NAME, DATA_NAME)),
            timings=timings,
            block_size=quant.block_size if quant else None,
            symmetric=quant.symmetric if quant else None,
            lora_inputs=list(targets),
            lora_modules=len(writer.graph.lora),
        )
        logger.debug("%s", result.summary())
        return result

    return PlannedOutput(
        command="onnx",
        final=final,
        overwrite=overwrite,
        stamps=source_stamp.record(ckpt, ads),
        plan=plan,
        adapters=ads,
        writers=[writer],
        needed_bytes=writer.needed_bytes,
        finish=finish,
        carried_bytes=carry.nbytes,
        merge_key=(tuple(weights) if weights is not None else None, "base", None),
        progress=progress,
    )


def _write_card(
    folder: Path,
    title: str,
    ckpt: Any,
    sources: dict[str, Any],
    dtype: str,
    quant: QuantSpec | None,
    opset: int,
    spec: Any,
    verification: Any,
    lora: Sequence[str] = (),
) -> None:
    """The output's ``README.md`` (``lorasave.pipeline.cards.write_card``), with the two ways to run it."""
    from lorasave.pipeline.cards import write_card

    snippet = (
        "import onnxruntime_genai as og  # pip install onnxruntime-genai\n\n"
        f'model = og.Model("{title}")\ntokenizer = og.Tokenizer(model)\n'
        "params = og.GeneratorParams(model)\nparams.set_search_options(max_length=64)\n"
        "generator = og.Generator(model, params)\n"
        + (
            'adapters = og.Adapters(model)  # `lorasave onnx-adapter` writes the files\nadapters.load("my.onnx_adapter", "mine")\n'
            'generator.set_active_adapter(adapters, "mine")\n'
            if lora
            else ""
        )
        + 'generator.append_tokens(tokenizer.encode("Once upon a time"))\n'
        "while not generator.is_done():\n    generator.generate_next_token()\nprint(tokenizer.decode(generator.get_sequence(0)))\n\n"
        "# or onnxruntime alone: from lorasave.formats.onnx.export import onnx_generate\n"
        "# inputs input_ids, attention_mask, position_ids, past_key_values.N.key/value; outputs logits, present.N.key/value"
    )
    checked = None
    if verification:
        checked = (
            f"onnxruntime against the unmerged PeftModel (float32) on a prefill, a decode step with the cache and a left-padded batch of two: "
            f"max |logit difference| {verification['max_abs_diff']:.3g} (max |logit| {verification['max_abs_logit']:.3g}), "
            f"top-1 agreement {verification['top1_agreement']:.1%}. Every file's sha256 is recorded in `lorasave.json`."
        )
    write_card(
        folder,
        kind="onnx",
        **card_sources(ckpt, sources.get("adapters") or []),
        settings={
            "format": f"ONNX (opset {opset}), decoder with KV cache in optimum's layout; onnxruntime-genai config",
            "dtype": dtype,
            "quantization": f"int{quant.bits} MatMulNBits, block {quant.block_size}, {'symmetric' if quant.symmetric else 'asymmetric'}" if quant else None,
            "cache": f"{spec.n_layers} layers x (batch, {spec.n_kv_heads} KV heads, seq, {spec.head_dim})",
            "LoRA inputs": f"{', '.join(lora)} of every layer (<module>.lora_A.weight, <module>.lora_B.weight; rank 0 by default)" if lora else None,
        },
        load_snippet=snippet,
        verification=checked,
        title=title,
    )


_plan_export = single_output(plan_onnx, "export_onnx", "Merge LoRA adapter(s) into a base and export an ONNX decoder with KV cache.", "OnnxResult")


def export_onnx(base: PathLike | None, adapters: PathLike | Sequence[PathLike] | None, output: PathLike, **options: Any) -> OnnxResult:
    """Merge LoRA adapter(s) into a base and export an ONNX decoder with KV cache (``plan_onnx``'s options).

    Architectures of ``formats.onnx.spec.FAMILIES`` are built directly and streamed (``plan_onnx``);
    any other decoder-only model goes through ``formats.onnx.legacy.export_onnx`` (``torch.onnx.export``
    of the float32 merge; ``quantize``, ``block_size`` and ``symmetric`` refused there).

    Raises:
        As ``plan_onnx``; for the fallback, as ``formats.onnx.legacy.export_onnx``.
    """
    ckpt = open_base(base, adapter_list(adapters))
    if ckpt.config.get("model_type") in FAMILIES:
        result: OnnxResult = _plan_export(ckpt, adapters, output, **options)
        return result
    from lorasave.formats.onnx import legacy

    if options.get("lora_inputs"):
        raise InvalidOptionError(f"{ckpt.config.get('model_type')}: LoRA inputs need the ONNX graph builder, which handles {', '.join(sorted(FAMILIES))}")
    options.pop("lora_inputs", None)
    if options.get("quantize") or "block_size" in options or "symmetric" in options:
        raise InvalidOptionError(
            f"{ckpt.config.get('model_type')}: MatMulNBits quantization needs the ONNX graph builder, which handles {', '.join(sorted(FAMILIES))}"
        )
    options.pop("progress", None)
    options.setdefault("opset", 18)
    out: OnnxResult = legacy.export_onnx(ckpt, adapters, output, **options)
    return out
