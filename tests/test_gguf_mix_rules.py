"""llama-quant.cpp's per-tensor mix for the model shapes the byte-for-byte tests cannot afford:
a 70B Llama (80 layers, GQA 8: the ``LLM_TYPE_70B`` attn_v rule), Mixtral-like 8- and 4-expert
models (3-D expert tensors, ``mxfp4_moe``, the 8-expert attn_v/attn_k/attn_output rules, the IQ2
branch's ``n_expert >= 4``) and Falcon (its output, ffn_down and attn_output rules, fused attn_qkv).

The reference is llama.cpp's own ``llama_model_quantize`` with ``dry_run`` (``llama-quantize
--dry-run``): it loads the model and chooses every tensor's type, logging it, without quantizing, so
the GGUF files here carry zero weights. Every llama-quantize type is checked, with and without an
importance matrix (``has_imatrix`` changes the mix), against ``formats.gguf.mix.kquant_types``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from _llama import need_llama_cpp
from lorasave.formats.gguf import mix as gguf_mix
from lorasave.formats.gguf.quant import GgufType, QuantOptions
from lorasave.runtimes.llama_cpp import lib as llama_cpp

#: llama-quantize's types (converter types and the unencodable q2_0 aside).
TYPES = [t for t in GgufType if not t.converter]
_LINE = re.compile(r"\]\s+(\S+)\s+- \[[^\]]*\], type = +(\S+), size = [^(]*(?:\((\S+)\))?\s*$")


def _z(*shape: int) -> np.ndarray:
    return np.zeros(shape, dtype=np.float16)


def _llama(path: Path, n_layer: int, n_head: int, n_kv: int, n_expert: int = 0, hidden: int = 256, inter: int = 512) -> None:
    """A GGUF llama of zeros: what ``llama_model_quantize`` needs to load it and choose types."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(n_layer)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // n_head)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    if n_expert:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(2)
    kv = n_kv * hidden // n_head
    w.add_tensor("token_embd.weight", _z(256, hidden))
    w.add_tensor("output.weight", _z(256, hidden))
    w.add_tensor("output_norm.weight", np.zeros(hidden, np.float32))
    for i in range(n_layer):
        p = f"blk.{i}."
        for n in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"{p}{n}.weight", np.zeros(hidden, np.float32))
        for n, rows in (("attn_q", hidden), ("attn_k", kv), ("attn_v", kv), ("attn_output", hidden)):
            w.add_tensor(f"{p}{n}.weight", _z(rows, hidden))
        if n_expert:
            w.add_tensor(f"{p}ffn_gate_inp.weight", np.zeros((n_expert, hidden), np.float32))
            w.add_tensor(f"{p}ffn_gate_exps.weight", _z(n_expert, inter, hidden))
            w.add_tensor(f"{p}ffn_up_exps.weight", _z(n_expert, inter, hidden))
            w.add_tensor(f"{p}ffn_down_exps.weight", _z(n_expert, hidden, inter))
        else:
            w.add_tensor(f"{p}ffn_gate.weight", _z(inter, hidden))
            w.add_tensor(f"{p}ffn_up.weight", _z(inter, hidden))
            w.add_tensor(f"{p}ffn_down.weight", _z(hidden, inter))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _falcon(path: Path, n_layer: int = 8, hidden: int = 256, n_head: int = 8, n_kv: int = 2) -> None:
    """A GGUF Falcon of zeros (fused attn_qkv, no gate, layer norms with biases)."""
    w = gguf.GGUFWriter(path, "falcon")
    w.add_block_count(n_layer)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(4 * hidden)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    head = hidden // n_head
    w.add_tensor("token_embd.weight", _z(256, hidden))
    w.add_tensor("output.weight", _z(256, hidden))
    w.add_tensor("output_norm.weight", np.zeros(hidden, np.float32))
    w.add_tensor("output_norm.bias", np.zeros(hidden, np.float32))
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(f"{p}attn_norm.weight", np.zeros(hidden, np.float32))
        w.add_tensor(f"{p}attn_norm.bias", np.zeros(hidden, np.float32))
        w.add_tensor(f"{p}attn_qkv.weight", _z(hidden + 2 * n_kv * head, hidden))
        w.add_tensor(f"{p}attn_output.weight", _z(hidden, hidden))
        w.add_tensor(f"{p}ffn_up.weight", _z(4 * hidden, hidden))
        w.add_tensor(f"{p}ffn_down.weight", _z(hidden, 4 * hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


#: name -> (builder, the facts llama.cpp reads: arch, n_layer, n_head, n_head_kv, n_expert)
MODELS: dict[str, tuple[Any, gguf_mix.ModelFacts]] = {
    "llama-70b": (lambda p: _llama(p, 80, 8, 1), gguf_mix.ModelFacts("llama", 80, 8, 1)),
    "moe-8x": (lambda p: _llama(p, 4, 8, 2, n_expert=8), gguf_mix.ModelFacts("llama", 4, 8, 2, 8)),
    "moe-4x": (lambda p: _llama(p, 8, 4, 4, n_expert=4), gguf_mix.ModelFacts("llama", 8, 4, 4, 4)),
    "falcon": (_falcon, gguf_mix.ModelFacts("falcon", 8, 8, 2)),
}


class _Importance:
    """Any importance matrix: the mix only asks whether there is one."""

    def importance(self, name: str) -> np.ndarray | None:
        return None


@pytest.fixture(scope="module")
def log_lines() -> Iterator[list[str]]:
    """llama.cpp's log (lib.py sends it to this logger at debug level)."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger(llama_cpp.__name__)
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def _dry_run(src: Path, type: GgufType, imatrix: bool, lines: list[str], tensors: list[tuple[str, tuple[int, ...]]]) -> dict[str, str]:
    """``llama_model_quantize(dry_run=True)``: the GGML type llama.cpp picks for every tensor, from its log."""
    lib = llama_cpp._lib()
    params = lib.llama_model_quantize_default_params()
    params.ftype = llama_cpp.QUANT_TYPES[type.value]
    params.dry_run = True
    params.nthread = 1
    keep: list[Any] = []
    if imatrix:  # any values: in a dry run only their presence matters (has_imatrix)
        entries = (llama_cpp.llama_model_imatrix_data * (len(tensors) + 1))()
        for i, (name, shape) in enumerate(tensors):
            values = np.ones(int(np.prod(shape[:-2], dtype=np.int64)) * shape[-1] if len(shape) > 1 else 1, dtype=np.float32)
            keep += [name.encode(), values]
            entries[i] = llama_cpp.llama_model_imatrix_data(keep[-2], values.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), values.size)
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.c_void_p)
    lines.clear()
    rc = lib.llama_model_quantize(os.fsencode(src), os.fsencode(src.with_suffix(".out")), ctypes.byref(params))
    assert rc == 0, "\n".join(lines[-5:])
    out = {}
    for line in lines:
        if m := _LINE.search(line):
            out[m.group(1)] = (m.group(3) or m.group(2)).upper()
    return out


@pytest.mark.parametrize("model", list(MODELS))
def test_mix_matches_llama_quantize_dry_run(model: str, tmp_path_factory: pytest.TempPathFactory, log_lines: list[str]) -> None:
    """Every llama-quantize type, with and without an importance matrix: each tensor's type equals
    llama.cpp's choice for the same file (70B, 8/4 experts, Falcon)."""
    need_llama_cpp()
    build, facts = MODELS[model]
    path = tmp_path_factory.mktemp(model) / f"{model}.gguf"
    build(path)
    tensors = [(t.name, tuple(int(x) for x in reversed(t.shape.tolist()))) for t in gguf.GGUFReader(path).tensors]
    checked = 0
    for type in TYPES:
        for imatrix in (False, True):
            theirs = _dry_run(path, type, imatrix, log_lines, tensors)
            options = QuantOptions(imatrix=_Importance()) if imatrix else None
            ours = gguf_mix.kquant_types(tensors, type, facts, options)
            assert len(theirs) == len(tensors), (model, type.value)
            wrong = {n: (q.name, theirs[n]) for (n, _), q in zip(tensors, ours, strict=True) if q.name != theirs[n]}
            assert not wrong, (model, type.value, imatrix, dict(list(wrong.items())[:5]))
            checked += 1
    assert checked == 2 * len(TYPES)


def test_the_rules_are_exercised(tmp_path: Path) -> None:
    """Control: the shapes above do hit the special rules (else the comparison would prove little)."""
    names = [("blk.0.attn_v.weight", (32, 256)), ("blk.79.attn_v.weight", (32, 256)), ("output.weight", (256, 256))]
    seventy = gguf_mix.kquant_types(names, GgufType.Q3_K_M, MODELS["llama-70b"][1])
    assert [t.name for t in seventy] == ["Q5_K", "Q5_K", "Q6_K"]  # Q4_K attn_v promoted to Q5_K by the 70B rule
    moe = gguf_mix.kquant_types([("blk.0.attn_k.weight", (64, 256)), ("blk.0.ffn_up_exps.weight", (8, 512, 256))], GgufType.MXFP4_MOE, MODELS["moe-8x"][1])
    assert [t.name for t in moe] == ["Q8_0", "MXFP4"]
    falcon = gguf_mix.kquant_types([("output.weight", (256, 256)), ("blk.0.attn_output.weight", (256, 256))], GgufType.Q3_K_L, MODELS["falcon"][1])
    assert [t.name for t in falcon] == ["Q8_0", "Q4_K"]
