"""``lorasave inspect PATH``: what a checkpoint folder, safetensors file, PEFT adapter or GGUF file holds.

Reads headers only (no tensor data; GGUF through gguf-py's reader) and says what lorasave can
do with it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorasave.errors import CheckpointFormatError, SourceNotFoundError
from lorasave.util.dtypes import nbytes, st_dtype
from lorasave.util.jsonio import load_json, read_json
from lorasave.util.printable import escape


@dataclass
class Inspection:
    """What ``inspect`` found.

    Attributes:
        path: what was inspected.
        kind: ``"checkpoint"``, ``"adapter"``, ``"safetensors"``, ``"gguf"``, ``"onnx"`` or ``"onnx-adapter"``.
        architecture: model class or GGUF ``general.architecture``.
        parameters: number of parameters (elements of floating tensors; quantized weights counted unpacked).
        dtype_bytes: bytes of tensor data per dtype (safetensors / GGML type names).
        quantization: the quantization method, if any.
        files: file name -> size in bytes.
        lora: LoRA settings of an adapter (peft_type, r, lora_alpha, targets, variants).
        can: what lorasave can do with it.
        notes: anything else worth knowing.
    """

    path: str
    kind: str
    architecture: str | None = None
    parameters: int = 0
    dtype_bytes: dict[str, int] = field(default_factory=dict)
    quantization: str | None = None
    files: dict[str, int] = field(default_factory=dict)
    lora: dict[str, Any] = field(default_factory=dict)
    can: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    def summary(self) -> str:
        """A few readable lines."""
        lines = [f"{self.path}: {self.kind}" + (f", {self.architecture}" if self.architecture else "")]
        if self.parameters:
            lines.append(f"  parameters: {self.parameters:,}")
        if self.dtype_bytes:
            lines.append("  dtypes: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(self.dtype_bytes.items())))
        if self.quantization:
            lines.append(f"  quantization: {self.quantization}")
        if self.files:
            lines.append(f"  files: {len(self.files)} ({sum(self.files.values()) / 1e6:.1f} MB): " + ", ".join(sorted(self.files)))
        for k, v in self.lora.items():
            lines.append(f"  {k}: {v}")
        lines += [f"  note: {n}" for n in self.notes]
        if self.can:
            lines.append("  lorasave can: " + "; ".join(self.can))
        return "\n".join(escape(line) for line in lines)  # names and config values from files: one line each


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def inspect_path(path: str | os.PathLike[str]) -> Inspection:
    """Describe a checkpoint folder, a ``.safetensors`` file, a PEFT adapter folder, a ``.gguf`` file or a
    folder of ``.gguf`` files (a ``lorasave gguf`` output: the first described, the others noted).

    Raises:
        SourceNotFoundError: nothing there.
        CheckpointFormatError: a file that is none of these, or malformed.
    """
    p = Path(path)
    if not p.exists():
        raise SourceNotFoundError(f"{p} does not exist", path=p)
    if p.is_file() and p.suffix == ".gguf":
        return _gguf(p)
    if p.is_file() and p.suffix == ".safetensors":
        from lorasave.formats.safetensors.header import read_header

        h = read_header(p)
        ins = Inspection(str(p), "safetensors", files={p.name: p.stat().st_size})
        for e in h.tensors.values():
            ins.dtype_bytes[e.dtype.name] = ins.dtype_bytes.get(e.dtype.name, 0) + e.nbytes
            ins.parameters += _numel(e.shape)
        ins.notes.append(f"{len(h.tensors)} tensors, metadata {h.metadata}")
        return ins
    if p.is_dir() and (p / "adapter_config.json").is_file():
        return _with_manifest(p, _adapter(p))
    if p.is_dir() and (p / "model.onnx").is_file():
        return _with_manifest(p, _onnx(p))
    if p.is_file() and p.suffix == ".onnx_adapter":
        return _onnx_adapter(p)
    onnx_adapters = sorted(p.glob("*.onnx_adapter")) if p.is_dir() else []
    if onnx_adapters:  # a `lorasave onnx-adapter` output folder
        return _with_manifest(p, _onnx_adapter(onnx_adapters[0]))
    ggufs = sorted(p.glob("*.gguf")) if p.is_dir() and not (p / "config.json").is_file() else []
    if ggufs:  # a `lorasave gguf` / `gguf-adapter` output folder: one file, or one per --type
        ins = _gguf(ggufs[0])
        for other in ggufs[1:]:
            more = _gguf(other)
            ins.files.update(more.files)
            ins.notes.append(f"also {other.name}: {', '.join(f'{n} {k}' for k, n in sorted(more.dtype_bytes.items()))} bytes by GGML type")
        return _with_manifest(p, ins)
    if p.is_dir():
        return _with_manifest(p, _checkpoint(p))
    raise CheckpointFormatError(f"{p}: not a model folder, adapter folder, .safetensors or .gguf file", path=p)


def _checkpoint(p: Path) -> Inspection:
    from lorasave.formats.quant_bases import QUANTIZED_TYPES, label
    from lorasave.sources.checkpoint import open_checkpoint

    ck = open_checkpoint(p)
    ins = Inspection(str(p), "checkpoint", architecture=", ".join(ck.config.get("architectures") or []) or ck.config.get("model_type"))
    for f in ck.source_files():
        ins.files[f.name] = f.stat().st_size
    for t in ck.tensors.values():
        name = label(t) if isinstance(t, QUANTIZED_TYPES) else t.dtype.name
        ins.dtype_bytes[name] = ins.dtype_bytes.get(name, 0) + t.nbytes
        ins.parameters += _numel(tuple(t.shape))
    ins.quantization = ck.quant_method
    if ck.index_path is not None:
        ins.notes.append(f"{len(ck.weight_files)} shards with {ck.index_path.name}")
    kind = "QLoRA" if ck.quant_method == "bitsandbytes" else str(ck.quant_method).upper()
    ins.can = [
        "lorasave merge BASE ADAPTER -o OUT (merge an adapter into it)",
        "lorasave merge ... --save-method merged_4bit (a bitsandbytes 4-bit copy)" if not ck.quant_method else f"dequantize while merging ({kind} base)",
    ]
    return ins


def _adapter(p: Path) -> Inspection:
    from lorasave.sources.adapter import load_adapter

    ad = load_adapter(p, allow_pickle=False)
    cfg = ad.config
    ins = Inspection(str(p), "adapter", files={f.name: f.stat().st_size for f in ad.source_files()})
    for k in ad.keys():
        dt = st_dtype(ad.dtype(k))
        n = _numel(ad.shape(k))
        ins.dtype_bytes[dt.name] = ins.dtype_bytes.get(dt.name, 0) + nbytes(dt, ad.shape(k))
        ins.parameters += n
    variants = [v for v, on in (("rsLoRA", cfg.get("use_rslora")), ("DoRA", ad.uses_dora), ("lora_bias", cfg.get("lora_bias"))) if on]
    ins.lora = {
        "peft_type": ad.tuner.value,
        "r": cfg.get("r"),
        "lora_alpha": cfg.get("lora_alpha", cfg.get("alpha")),
        "target_modules": cfg.get("target_modules"),
        "target_parameters": cfg.get("target_parameters") or None,
        "modules_to_save": cfg.get("modules_to_save"),
        "rank_pattern": cfg.get("rank_pattern") or None,
        "alpha_pattern": cfg.get("alpha_pattern") or None,
        "variants": variants or None,
        "modules": len(ad.parts),
        "base_model_name_or_path": cfg.get("base_model_name_or_path"),
    }
    ins.lora = {k: v for k, v in ins.lora.items() if v not in (None, [], {})}
    ins.can = ["lorasave merge BASE ADAPTER -o OUT", "lorasave adapter ADAPTER -o OUT (re-save as safetensors, optional --dtype)"]
    return ins


def _gguf(p: Path) -> Inspection:
    from lorasave.formats.gguf.read import malformed, open_gguf

    ins = Inspection(str(p), "gguf", files={p.name: p.stat().st_size})
    r = open_gguf(p)
    try:  # gguf-py raises whatever its parsing meets (ValueError, KeyError, IndexError, numpy errors...)
        field_ = r.fields.get("general.architecture")
        if field_ is not None:
            ins.architecture = bytes(field_.parts[field_.data[0]]).decode("utf-8", "replace")
        for t in r.tensors:
            name = t.tensor_type.name
            ins.dtype_bytes[name] = ins.dtype_bytes.get(name, 0) + int(t.n_bytes)
            ins.parameters += int(t.n_elements)
    except Exception as e:
        raise malformed(p, e) from None
    ins.notes.append(f"{len(r.tensors)} tensors, {len(r.fields)} metadata keys")
    return ins


def _with_manifest(p: Path, ins: Inspection) -> Inspection:
    """List every file of a folder and, for a lorasave output, what its manifest says."""
    ins.files = {f.name: f.stat().st_size for f in sorted(p.iterdir()) if f.is_file() and not f.name.startswith(".")}
    manifest = p / "lorasave.json"
    if manifest.is_file():
        try:
            doc = load_json(manifest)
        except (OSError, ValueError):  # a damaged manifest: verify says what is wrong with it
            doc = {}
        if not isinstance(doc, dict):
            doc = {}
        ins.notes.append(f"a lorasave output ({doc.get('command', '?')}, lorasave {doc.get('lorasave_version', '?')}, {doc.get('created', '?')})")
        ins.can = [f"lorasave verify {p}", f"lorasave push {p} REPO_ID", *ins.can]
    return ins


def _onnx(p: Path) -> Inspection:
    try:
        import onnx
    except ImportError:
        raise CheckpointFormatError(f"{p}: reading ONNX needs the onnx package: pip install 'lorasave[onnx]'", path=p) from None
    try:
        model = onnx.load(str(p / "model.onnx"), load_external_data=False)
    except Exception as e:
        raise CheckpointFormatError(f"{p / 'model.onnx'}: not a readable ONNX model ({type(e).__name__}: {e})", path=p) from None
    arch = None
    if (p / "config.json").is_file():
        archs = read_json(p / "config.json").get("architectures")
        arch = (", ".join(a for a in archs if isinstance(a, str)) or None) if isinstance(archs, list) else None
    ins = Inspection(str(p), "onnx", architecture=arch)
    names = [i.name for i in model.graph.input]
    ins.notes.append(f"inputs: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''} ({len(names)}), outputs: {len(model.graph.output)}")
    lora = [n for n in names if n.endswith((".lora_A.weight", ".lora_B.weight"))]
    if lora:
        ins.notes.append(f"LoRA inputs on {len(lora) // 2} Linears ({lora[0]}, ...): `lorasave onnx-adapter` files apply at run time")
    ins.can = ["lorasave.formats.onnx.export.onnx_generate(folder, prompt)"]
    return ins


def _onnx_adapter(f: Path) -> Inspection:
    """An ``.onnx_adapter`` file (``lorasave onnx-adapter``): its parameters, read with onnxruntime."""
    try:
        from lorasave.verify.onnx_adapter import read_parameters

        params = read_parameters(f)
    except ImportError:
        raise CheckpointFormatError(f"{f}: reading an .onnx_adapter needs onnxruntime: pip install 'lorasave[onnx]'", path=f) from None
    except Exception as e:
        raise CheckpointFormatError(f"{f}: not a readable .onnx_adapter file ({type(e).__name__}: {e})", path=f) from None
    ins = Inspection(str(f), "onnx-adapter", files={f.name: f.stat().st_size})
    for v in params.values():
        ins.dtype_bytes[str(v.dtype)] = ins.dtype_bytes.get(str(v.dtype), 0) + v.nbytes
        ins.parameters += int(v.size)
    ins.notes.append(f"{len(params)} tensors ({len(params) // 2} LoRA modules), e.g. {next(iter(sorted(params)), '-')}")
    ins.can = ["og.Adapters(model).load(file, name); generator.set_active_adapter(adapters, name) (onnxruntime-genai)"]
    return ins
