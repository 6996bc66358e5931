"""Merge LoRA adapter(s) into a base and write one GGUF file, streaming tensor by tensor.

What llama.cpp's ``convert_hf_to_gguf.py`` does to a merged checkpoint, done on the merge's
float32 values directly (no 16-bit intermediate checkpoint):

* tensor names through gguf-py's ``TensorNameMap`` (``gguf/tensor_mapping.py``);
* Llama-family Q/K rows permuted from HF rotate-half order to interleaved RoPE pairs
  (``conversion/llama.py`` ``LlamaModel.permute``), ``n_head_kv`` for ``k_proj``;
* per-tensor GGML types as ``ModelBase.prepare_tensors`` (``conversion/base.py``) picks them:
  1-D tensors, ``*_norm.weight`` and anything not ending in ``.weight`` (biases) are F32, the rest
  follow the requested type, and Q8_0 falls back to F16 when a row is not a multiple of 32;
* the ``general.*`` / ``{arch}.*`` keys of ``TextModel.set_gguf_parameters`` (``gguf_arch.py``);
* a byte-level BPE tokenizer as ``TextModel._set_vocab_gpt2`` writes it (``tokenizer.ggml.model
  = "gpt2"``, tokens, token types, merges and special ids through ``gguf.SpecialVocab``).

The header, metadata and tensor infos are written first (every type and size is known from the
plan), then each tensor's data: peak memory is about one merged float32 tensor plus its encoding.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from .adapter import Adapter, load_adapters
from .architecture import inspect_architecture
from .checkpoint import Checkpoint, TensorReader, open_checkpoint
from .errors import InvalidOptionError, UnsupportedModelError
from .gguf_arch import GgufArch, gguf_arch_for, head_counts
from .manifest import MANIFEST_NAME, sha256_file, sha256_source, write_manifest
from .merge_math import ExecContext, Timings, stream_tensor
from .output import StagedOutput, check_free_space, check_output_path, tokenizer_source
from .plan import MergePlan, OutputTensor, build_plan

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
Q = gguf.GGMLQuantizationType

#: ``type`` -> (GGML type of quantizable tensors, ``general.file_type``) as in convert_hf_to_gguf ``--outtype``.
GGUF_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


@dataclass
class GgufResult:
    """What ``export_gguf`` wrote.

    Attributes:
        output: the output folder.
        gguf_file: the ``.gguf`` file inside it.
        files: names of the files written, manifest included.
        n_tensors: tensors in the GGUF file.
        n_merged: tensors an adapter changed.
        type: the requested type (``"q8_0"``...).
        tensor_types: GGML type name -> number of tensors of that type.
        total_bytes: size of the GGUF file in bytes.
        seconds: wall time of the call.
        notes: fallbacks taken and facts worth knowing.
        verification: the ``verify`` result, when ``verify=True`` was asked.
    """

    output: Path
    gguf_file: Path
    files: list[str]
    n_tensors: int
    n_merged: int
    type: str
    tensor_types: dict[str, int]
    total_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    verification: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``--json``)."""
        d = asdict(self)
        d["output"], d["gguf_file"] = str(self.output), str(self.gguf_file)
        return d

    def summary(self) -> str:
        """One line for humans."""
        types = ", ".join(f"{n} {k}" for k, n in sorted(self.tensor_types.items()))
        verified = "; verified" if self.verification and self.verification.get("ok") else ""
        size = f"{self.total_bytes / 1e6:.1f} MB"
        return f"wrote {self.gguf_file} ({self.n_tensors} tensors: {types}; {size}, {self.n_merged} merged) in {self.seconds:.1f} s{verified}"


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of the GGUF file.

    Attributes:
        src: the planned (HF-named) output tensor.
        name: GGUF name (``blk.0.attn_q.weight``).
        qtype: GGML type written.
        nbytes: bytes of its data (without alignment padding).
        permute_heads: ``(n_head, n_head_kv)`` for a Q/K permute, or None.
    """

    src: OutputTensor
    name: str
    qtype: gguf.GGMLQuantizationType
    nbytes: int
    permute_heads: tuple[int, int] | None


def permute_qk(w: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """llama.cpp ``LlamaModel.permute`` (``conversion/llama.py``): rotate-half rows -> interleaved pairs.

    Args:
        w: ``(n_head * head_dim, in)`` weight or ``(n_head * head_dim,)`` bias.
        n_head: attention heads; replaced by ``n_head_kv`` when given and different (``k_proj``).

    Returns:
        Same shape; within each head, row ``j`` of the first half and row ``j`` of the second half
        become rows ``2j`` and ``2j + 1``.
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def ggml_type(gguf_name: str, shape: tuple[int, ...], type: str) -> gguf.GGMLQuantizationType:
    """The GGML type of one tensor, as ``ModelBase.prepare_tensors`` (``conversion/base.py``) picks it.

    Args:
        gguf_name: the tensor's GGUF name.
        shape: its numpy/torch shape (rows first); ``shape[-1]`` is the ggml row length ``ne0``.
        type: requested output type, a key of :data:`GGUF_TYPES`.

    Returns:
        F32 for 1-D tensors, ``*_norm.weight`` and non-``.weight`` tensors (biases); otherwise the
        requested type, with Q8_0 falling back to F16 when ``ne0`` is not a multiple of 32 (the
        converter catches ``gguf.QuantError`` and does the same).
    """
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return Q.F32
    qtype = GGUF_TYPES[type][0]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block != 0:
        return Q.F16
    return qtype


def tensor_nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    """Bytes of a tensor of ``shape`` (rows first) encoded as ``qtype``."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    return n // block * type_size


def encode(w: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Encode a float32 array as ``qtype`` (F32/F16 as floats, BF16/Q8_0 as bytes via ``gguf.quants``)."""
    if qtype is Q.F32:
        return np.ascontiguousarray(w, dtype=np.float32)
    if qtype is Q.F16:
        return np.ascontiguousarray(w.astype(np.float16))
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)


def merged_float32(t: OutputTensor, ctx: ExecContext) -> torch.Tensor:
    """The merged value of one planned tensor, whole, as float32 of shape ``t.shape``.

    Uses ``merge_math.stream_tensor`` (the plan is built with ``out_dtype=float32``), so values
    are bit-identical to a float32 ``merge`` of the same sources.

    Raises:
        UnsupportedModelError: the tensor is not floating point.
        NonFiniteResultError: a merged value is NaN or Inf.
    """
    if t.dtype.torch_dtype is not torch.float32:
        raise UnsupportedModelError(f"tensor {t.name} has dtype {t.dtype.name}; GGUF export handles floating tensors only")
    buf = bytearray()
    for chunk in stream_tensor(t, ctx):
        buf += chunk
    if not t.shape:
        return torch.frombuffer(buf, dtype=torch.float32).reshape(())
    return torch.frombuffer(buf, dtype=torch.float32).reshape(t.shape)


def gguf_tensors(plan: MergePlan, config: dict[str, Any], rules: GgufArch, type: str) -> list[GgufTensor]:
    """Name, type and size of every GGUF tensor, in plan order.

    Raises:
        UnsupportedModelError: a tensor has no GGUF name (``ValueError("Can not map tensor")`` in
            llama.cpp), e.g. a vision tower or an unknown extra module.
    """
    n_blocks = int(config.get("num_hidden_layers") or (config.get("text_config") or {}).get("num_hidden_layers"))
    names = gguf.get_tensor_name_map(rules.arch, n_blocks)
    n_head, n_kv = head_counts(config)
    out = []
    for t in plan.tensors.values():
        name = names.get_name(t.name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UnsupportedModelError(f"cannot map tensor {t.name!r} to a GGUF {rules.name} tensor name")
        heads = None
        if rules.permute_qk and t.name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = (n_head, n_head)
        elif rules.permute_qk and t.name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = (n_head, n_kv)
        qtype = ggml_type(name, t.shape, type)
        out.append(GgufTensor(t, name, qtype, tensor_nbytes(t.shape, qtype), heads))
    return out


def _looks_special(token: str) -> bool:
    """``TextModel.does_token_look_special`` (``conversion/base.py``)."""
    seems = token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
    seems = seems or (token.startswith("<|") and token.endswith("|>"))
    seems = seems or (token.startswith("<｜") and token.endswith("｜>"))
    return seems or (token.startswith("<unused") and token.endswith(">"))


def add_bpe_tokenizer(writer: gguf.GGUFWriter, tok_dir: Path, vocab_size: int, rules: GgufArch, notes: list[str]) -> None:
    """Write a byte-level BPE tokenizer as ``TextModel._set_vocab_gpt2`` does.

    Tokens ``0..vocab_size``: ids the tokenizer lacks become ``[PAD{i}]`` (UNUSED); added tokens are
    CONTROL when special or special-looking, else USER_DEFINED; the rest NORMAL. Merges, special
    token ids, ``add_*_token`` flags and the chat template come from ``gguf.SpecialVocab``.
    ``tokenizer.ggml.pre`` is ``"gpt-2"`` for a plain ByteLevel pre-tokenizer, else the
    architecture's usual name (llama.cpp instead hashes the token ids of a fixed text).

    Raises:
        UnsupportedModelError: no ``tokenizer.json``, or not a byte-level BPE tokenizer
            (SentencePiece export is not implemented).
    """
    from transformers import AutoTokenizer

    path = tok_dir / "tokenizer.json"
    if not path.is_file():
        raise UnsupportedModelError(f"GGUF export needs a byte-level BPE tokenizer.json; {tok_dir} has none (SentencePiece is not supported yet)")
    spec = json.loads(path.read_text(encoding="utf-8"))
    pre = spec.get("pre_tokenizer") or {}
    if (spec.get("model") or {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(pre):
        raise UnsupportedModelError(f"{path} is not a byte-level BPE tokenizer; GGUF export of other tokenizers is not supported yet")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        pre_name = "gpt-2"
    else:
        pre_name = rules.bpe_pre
        notes.append(f"tokenizer.ggml.pre set to {pre_name!r} (the {rules.name} default), not derived from the tokenizer")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise UnsupportedModelError(f"the tokenizer has ids up to {max(vocab.values())} but the model's vocabulary has {vocab_size} rows")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif reverse[i] in added:
            special = i in decoder and decoder[i].special
            tokens.append(reverse[i] if special or _looks_special(reverse[i]) else reverse[i].replace("▁", " "))
            types.append(gguf.TokenType.CONTROL if special or _looks_special(reverse[i]) else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_name)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(tok_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)


def add_model_params(writer: gguf.GGUFWriter, config: dict[str, Any], rules: GgufArch, name: str, type: str) -> None:
    """``general.*`` and ``{arch}.*`` keys (``ModelBase.prepare_metadata`` + ``set_gguf_parameters``)."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    for key, value, kind in rules.params(config):
        full = f"{rules.name}.{key}"
        if kind == "f32":
            writer.add_float32(full, float(value))
        else:
            writer.add_uint32(full, int(value))
    writer.add_file_type(GGUF_TYPES[type][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _vocab_size(ckpt: Checkpoint, plan: MergePlan, tensors: list[GgufTensor]) -> int:
    """Rows of the token embedding (the config's ``vocab_size``, updated when an adapter resized it)."""
    for g in tensors:
        if g.name == "token_embd.weight":
            return int(g.src.shape[0])
    v = plan.config_updates.get("vocab_size", ckpt.config.get("vocab_size"))
    return int(v)  # type: ignore[arg-type]


def export_gguf(
    base: PathLike,
    adapters: PathLike | Sequence[PathLike],
    output_dir: PathLike,
    *,
    type: str = "f16",
    overwrite: bool = False,
    name: str | None = None,
    tokenizer: PathLike | None = None,
    allow_pickle: bool = False,
    verify: bool = False,
) -> GgufResult:
    """Merge adapter(s) into ``base`` and write ``OUTPUT_DIR/<name>-<type>.gguf`` plus ``lorasave.json``.

    Each tensor's merged float32 value W0 + Σ scaling·(B @ A) is computed once, renamed, permuted
    (Llama Q/K), encoded and written before the next one is read. The folder appears atomically.

    Args:
        base: base folder (``config.json`` + safetensors) or a Hub id in the local HF cache.
        adapters: one PEFT adapter folder or several (their deltas add up).
        output_dir: the folder to create.
        type: ``"f32"``, ``"f16"``, ``"bf16"`` or ``"q8_0"`` (llama.cpp ``--outtype``); norms,
            biases and 1-D tensors are always F32.
        overwrite: replace an existing ``output_dir`` written by lorasave.
        name: ``general.name`` and file stem; default: the output folder's name.
        tokenizer: folder with ``tokenizer.json``; default: the first adapter's, else the base's.
        allow_pickle: accept ``adapter_model.bin``.

    Returns:
        GgufResult.

    Raises:
        InvalidOptionError: unknown ``type``.
        UnsupportedModelError: a ``model_type``, tensor, RoPE scaling or tokenizer the export does
            not handle (see ``gguf_arch.ARCHITECTURES``).
        LorasaveError subclasses from loading the sources, planning and the output path checks
        (AdapterMismatchError, OutputExistsError, UnsafePathError, InsufficientDiskError,
        NonFiniteResultError, ...).
    """
    t_start = time.perf_counter()
    if type not in GGUF_TYPES:
        raise InvalidOptionError(f"GGUF type {type!r} is not supported; choose one of {', '.join(GGUF_TYPES)}")
    ckpt = open_checkpoint(base)
    rules = gguf_arch_for(ckpt.config)
    ads: list[Adapter] = load_adapters(adapters, allow_pickle=allow_pickle)
    tok_dir = tokenizer_source(tokenizer, [a.root for a in ads], ckpt.root)
    final = check_output_path(Path(output_dir), [ckpt.root, *(a.root for a in ads), tok_dir], overwrite)
    stem = name or final.name
    arch = inspect_architecture(ckpt.config)
    plan = build_plan(ckpt, ads, arch, out_dtype=torch.float32, max_shard_size=1 << 62)
    config = json.loads(json.dumps(ckpt.config))
    for key, value in plan.config_updates.items():
        if "." not in key:
            config[key] = value
    tensors = gguf_tensors(plan, config, rules, type)
    check_free_space(final, sum(g.nbytes for g in tensors) + (16 << 20))
    notes = list(plan.notes)
    fallback = [g.name for g in tensors if g.qtype is Q.F16 and type == "q8_0"]
    if fallback:
        notes.append(f"{len(fallback)} tensors kept as F16: rows not a multiple of 32 for Q8_0 (first: {fallback[0]})")

    filename = f"{stem}-{type}.gguf"
    timings = Timings()
    with StagedOutput(final) as stage:
        writer = gguf.GGUFWriter(None, rules.name)
        add_model_params(writer, config, rules, stem, type)
        add_bpe_tokenizer(writer, tok_dir, _vocab_size(ckpt, plan, tensors), rules, notes)
        for g in tensors:
            writer.add_tensor_info(g.name, g.src.shape, np.dtype(np.float32), g.nbytes, raw_dtype=g.qtype)
        writer.write_header_to_file(stage.path / filename)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with TensorReader() as reader:
            ctx = ExecContext(reader, ads, timings, plan.converter)
            for g in tensors:
                w = merged_float32(g.src, ctx)
                if g.permute_heads is not None:
                    w = permute_qk(w, *g.permute_heads)
                t0 = time.perf_counter()
                data = encode(w.numpy(), g.qtype)
                timings.merge += time.perf_counter() - t0
                t0 = time.perf_counter()
                writer.write_tensor_data(data)
                timings.write += time.perf_counter() - t0
        writer.close()
        files = {filename: sha256_file(stage.path / filename)}
        counts: dict[str, int] = {}
        for g in tensors:
            counts[g.qtype.name] = counts.get(g.qtype.name, 0) + 1
        sources = {
            "base": {
                "path": str(ckpt.root.resolve()),
                "hub_id": ckpt.hub_id,
                "files": {str(p.relative_to(ckpt.root)): sha256_source(p) for p in ckpt.source_files()},
            },
            "adapters": [{"path": str(a.root.resolve()), "files": {str(p.relative_to(a.root)): sha256_source(p) for p in a.source_files()}} for a in ads],
            "tokenizer": str(tok_dir.resolve()),
        }
        result = {
            "n_tensors": len(tensors),
            "n_merged": len(plan.merged),
            "merged": plan.merged,
            "architecture": rules.name,
            "tensor_types": counts,
            "timings": timings.as_dict(),
            "notes": notes,
        }
        settings = {"type": type, "name": stem, "allow_pickle": allow_pickle}
        write_manifest(stage.path, command="gguf", sources=sources, settings=settings, result=result, files=files)
        if verify:
            from .verify import VerificationError
            from .verify import verify as verify_output

            report = verify_output(stage.path)
            if not report.ok:
                raise VerificationError(f"the GGUF failed verification, nothing was written: {report.summary()}", path=final, failures=report.failures)
            result["verification"] = {"level": "tensors", "ok": True, "summary": report.summary(), "max_probe_error": report.max_probe_error}
            write_manifest(stage.path, command="gguf", sources=sources, settings=settings, result=result, files=files)
        total = (stage.path / filename).stat().st_size
        stage.commit()
    res = GgufResult(
        output=final,
        gguf_file=final / filename,
        files=sorted([filename, MANIFEST_NAME]),
        n_tensors=len(tensors),
        n_merged=len(plan.merged),
        type=type,
        tensor_types=counts,
        total_bytes=total,
        seconds=round(time.perf_counter() - t_start, 3),
        notes=notes,
        verification=result.get("verification"),
    )
    logger.debug("%s", res.summary())
    return res
