"""The llama.cpp runtime binding (lorasave.runtimes.llama_cpp.lib) and its installer, against transformers/PEFT.

Model: a tiny Llama (``_models.build_llama``, hidden 256 so that K-quant blocks of 256 fit a row,
GQA 4/2 heads, untied) with a byte-level BPE tokenizer and a trained LoRA, exported merged to an
F32 GGUF by ``lorasave.formats.gguf.export.export_gguf``. References come from transformers + PEFT, the
K-quant tensor types from gguf-py reading llama.cpp's output, and the installer's failures from
hand-made tarballs (``--from-tgz``: no network).
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import io
import re
import tarfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from _llama import need_llama_cpp
from _models import VOCAB, build_byte_bpe_tokenizer, build_llama, make_adapter, save_model, train_lora
from lorasave.errors import InvalidOptionError, LlamaCppError, LlamaCppInstallError, LlamaCppNotInstalledError, UnsafePathError
from lorasave.formats.gguf.export import export_gguf, permute_qk
from lorasave.runtimes.llama_cpp import install as llama_cpp_install
from lorasave.runtimes.llama_cpp import lib as llama_cpp
from lorasave.runtimes.llama_cpp import llama_h

TEXT = "LoRA adapts a frozen model by adding a low-rank update to some of its weight matrices. Merging folds that update into the weights. " * 4
SAMPLE = "Merging a low-rank update folds it into the frozen weights, adapter by adapter."
HIDDEN = 256
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tokenizer() -> PreTrainedTokenizerFast:
    return build_byte_bpe_tokenizer(TEXT, VOCAB)


def _write_lora_gguf(path: Path, peft_model: PeftModel, alpha: float) -> None:
    """A GGUF LoRA adapter as llama.cpp loads it (``src/llama-adapter.cpp``), written with gguf-py:
    ``<tensor>.lora_a`` = PEFT's A ``(r, in)``, ``.lora_b`` = B ``(out, r)``. Only v_proj / o_proj,
    which the Llama export does not permute."""
    names = {"v_proj": "attn_v", "o_proj": "attn_output"}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    state = peft_model.state_dict()
    for key, value in state.items():
        if ".lora_A." not in key:
            continue
        layer = int(key.split(".layers.")[1].split(".")[0])
        module = key.split(".lora_A.")[0].rsplit(".", 1)[1]
        a = value.float().numpy()
        b = state[key.replace(".lora_A.", ".lora_B.")].float().numpy()
        writer.add_tensor(f"blk.{layer}.{names[module]}.weight.lora_a", np.ascontiguousarray(a))
        writer.add_tensor(f"blk.{layer}.{names[module]}.weight.lora_b", np.ascontiguousarray(b))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Base + trained LoRA, their F32 GGUF, reference logits, and a second LoRA as a GGUF adapter."""
    root = tmp_path_factory.mktemp("llama_cpp")
    tok = _tokenizer()
    base = save_model(build_llama(seed=0, hidden=HIDDEN), root / "base")
    tok.save_pretrained(base)
    lora = make_adapter(base, root / "lora", LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0), seed=1)
    ids = tok(TEXT).input_ids[:64]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, lora).eval()
    with torch.no_grad():
        ref = peft_model(input_ids=torch.tensor([ids])).logits[0].numpy()
        merged = peft_model.merge_and_unload()
    # a second LoRA (v/o only, alpha != r) on top of the merged model, as PEFT runs it
    lora2_model = train_lora(merged, LoraConfig(r=4, lora_alpha=12, target_modules=["v_proj", "o_proj"], lora_dropout=0.0), seed=2)
    with torch.no_grad():
        ref2 = lora2_model(input_ids=torch.tensor([ids])).logits[0].numpy()
    lora2_gguf = root / "lora2.gguf"
    _write_lora_gguf(lora2_gguf, lora2_model, alpha=12.0)
    res = export_gguf(base, lora, root / "f32", type="f32")
    return {"root": root, "tok": tok, "ids": ids, "ref": ref, "ref2": ref2, "f32": res.gguf_file, "lora2": lora2_gguf}


def _top1(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())


# ---------------------------------------------------------------------------------- structs

# Sizes and offsets printed by gcc 12 (x86_64) for llama.cpp v0.5.0's include/llama.h:
#   gcc -I include -I ggml/include sizes.c  (printf sizeof / offsetof)
#   llama_model_params sizeof=80: tensor_split=40 progress_callback=48 kv_overrides=64 vocab_only=72 load_mtp=77
#   llama_context_params sizeof=160: n_threads=28 ctx_type=36 rope_freq_base=56 defrag_thold=84 cb_eval=88 type_k=104
#       abort_callback=112 embeddings=128 kv_unified=133 samplers=136 n_samplers=144 ctx_other=152
#   llama_batch sizeof=56: token=8 logits=48
#   llama_model_quantize_params sizeof=64: ftype=4 output_tensor_type=8 allow_requantize=16 dry_run=21 imatrix=24
#       prune_layers=48 max_buf_size=56
C_LAYOUT: dict[str, tuple[int, dict[str, int]]] = {
    "llama_model_params": (80, {"tensor_split": 40, "progress_callback": 48, "kv_overrides": 64, "vocab_only": 72, "load_mtp": 77}),
    "llama_context_params": (
        160,
        {
            "n_threads": 28,
            "ctx_type": 36,
            "rope_freq_base": 56,
            "defrag_thold": 84,
            "cb_eval": 88,
            "type_k": 104,
            "abort_callback": 112,
            "embeddings": 128,
            "kv_unified": 133,
            "samplers": 136,
            "n_samplers": 144,
            "ctx_other": 152,
        },
    ),
    "llama_batch": (56, {"token": 8, "logits": 48}),
    "llama_model_quantize_params": (
        64,
        {"ftype": 4, "output_tensor_type": 8, "allow_requantize": 16, "dry_run": 21, "imatrix": 24, "prune_layers": 48, "max_buf_size": 56},
    ),
}


@pytest.mark.parametrize("name", sorted(C_LAYOUT))
def test_struct_layout_matches_c(name: str) -> None:
    struct = getattr(llama_h, name)
    size, offsets = C_LAYOUT[name]
    assert ctypes.sizeof(struct) == size
    for field, offset in offsets.items():
        assert getattr(struct, field).offset == offset, field


def test_quant_types_are_llama_h_values() -> None:
    """The table's enum values are gguf-py's copy of llama_ftype (an independent transcription)."""
    known = {m.name: m.value for m in gguf.LlamaFileType}  # gguf 0.19 predates Q1_0 / Q2_0 / NVFP4
    checked = [name for name, ftype in llama_cpp.QUANT_TYPES.items() if ftype.name in known]
    for name in checked:
        assert llama_cpp.QUANT_TYPES[name].value == known[llama_cpp.QUANT_TYPES[name].name], name
    assert len(checked) >= len(llama_cpp.QUANT_TYPES) - 3
    assert llama_cpp.QUANT_TYPES["q4_k_m"] == llama_cpp.LlamaFtype.MOSTLY_Q4_K_M


# ---------------------------------------------------------------------------------- runtime


def test_logits_f32_match_transformers(tiny: dict[str, Any]) -> None:
    need_llama_cpp()
    ref, ids = tiny["ref"], tiny["ids"]
    with llama_cpp.LlamaCppModel(tiny["f32"], n_ctx=128) as m:
        assert m.n_vocab == VOCAB
        got = m.logits(ids)
        again = m.logits(ids[:10])  # a second call starts from an empty memory
    assert got.shape == (len(ids), VOCAB) and got.dtype == np.float32
    scale = float(np.abs(ref).max())
    diff = float(np.abs(got - ref).max())
    print(f"llama.cpp f32 vs PEFT: max diff {diff:.3g} = {diff / scale:.3g} of max |logit|, top-1 {_top1(got, ref):.0%}")
    assert diff <= 1e-3 * scale
    assert _top1(got, ref) == 1.0
    np.testing.assert_allclose(again, got[:10], rtol=0, atol=1e-5 * scale)
    # llama.cpp's defaults (F16 KV cache, flash attention) are close but not as exact
    with llama_cpp.LlamaCppModel(tiny["f32"], n_ctx=128, precise=False) as m:
        loose = m.logits(ids)
    print(f"llama.cpp defaults: {float(np.abs(loose - ref).max()) / scale:.3g} of max |logit|")
    assert _top1(loose, ref) >= 0.95


def test_lora_adapter_matches_peft(tiny: dict[str, Any]) -> None:
    """llama_adapter_lora_init + llama_set_adapters_lora: scale·alpha/r·B·A on v/o, as PEFT computes."""
    need_llama_cpp()
    ref2, ids = tiny["ref2"], tiny["ids"]
    with llama_cpp.LlamaCppModel(tiny["f32"], loras=[(tiny["lora2"], 1.0)], n_ctx=128) as m:
        got = m.logits(ids)
    with llama_cpp.LlamaCppModel(tiny["f32"], loras=[(tiny["lora2"], 0.0)], n_ctx=128) as m:
        off = m.logits(ids)
    scale = float(np.abs(ref2).max())
    assert float(np.abs(got - ref2).max()) <= 1e-3 * scale
    assert float(np.abs(off - tiny["ref"]).max()) <= 1e-3 * scale  # scale 0: the base alone
    assert float(np.abs(ref2 - tiny["ref"]).max()) > 1e-2 * scale  # the adapter does change the logits


def test_tokenize_matches_hf(tiny: dict[str, Any]) -> None:
    need_llama_cpp()
    tok = tiny["tok"]
    with llama_cpp.LlamaCppModel(tiny["f32"]) as m:
        assert m.tokenize(SAMPLE) == tok(SAMPLE).input_ids
        assert m.tokenize(SAMPLE, add_special=False) == tok(SAMPLE, add_special_tokens=False).input_ids
        with_eos = SAMPLE + "<|endoftext|>"
        assert m.tokenize(with_eos, parse_special=True) == tok(with_eos).input_ids
        assert m.tokenize(with_eos)[-1] != tok.eos_token_id  # as text, not the special token
        assert m.tokenize(TEXT * 3) == tok(TEXT * 3).input_ids  # longer than the first guess of the buffer


_HF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's Q/K row permutation (interleaved pairs -> rotate-half)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantized_logits(path: Path, ids: list[int]) -> np.ndarray:
    """transformers' logits with the GGUF's weights as gguf-py dequantizes them (an independent
    reading of what llama.cpp wrote): what the quantized file means, without llama.cpp's compute."""
    reader = gguf.GGUFReader(path)
    deq = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in t.shape[::-1]]).copy()) for t in reader.tensors}
    state = {"model.embed_tokens.weight": deq["token_embd.weight"], "lm_head.weight": deq["output.weight"], "model.norm.weight": deq["output_norm.weight"]}
    for name, w in deq.items():
        if name.startswith("blk."):
            _, layer, kind, _ = name.split(".")
            w = _unpermute(w, 4) if kind == "attn_q" else _unpermute(w, 2) if kind == "attn_k" else w
            state[f"model.layers.{layer}.{_HF_NAMES[kind]}.weight"] = w
    model = build_llama(seed=0, hidden=HIDDEN)
    model.load_state_dict(state)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def test_unpermute_inverts_the_export() -> None:
    w = torch.randn(128, 8)
    assert torch.equal(_unpermute(permute_qk(w, 4, 2), 2), w) and not torch.equal(permute_qk(w, 4, 2), w)


@pytest.mark.parametrize(("type", "main", "ftype"), [("q4_k_m", "Q4_K", "MOSTLY_Q4_K_M"), ("q6_k", "Q6_K", "MOSTLY_Q6_K")])
def test_quantize_k_types(tiny: dict[str, Any], tmp_path: Path, type: str, main: str, ftype: str) -> None:
    """llama_model_quantize writes the K-quant types, and llama.cpp runs the result as the model that
    gguf-py's dequantization of the same file describes (llama.cpp also quantizes activations to
    8 bits for K-quant dot products, hence the tolerance)."""
    need_llama_cpp()
    out = tmp_path / f"m-{type}.gguf"
    llama_cpp.quantize(tiny["f32"], out, type)
    assert out.is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType[ftype]
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType[main]
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    if type == "q4_k_m":  # llama.cpp promotes output.weight (and some attn_v / ffn_down) to Q6_K
        assert types["output.weight"] == gguf.GGMLQuantizationType.Q6_K
    with llama_cpp.LlamaCppModel(out, n_ctx=128) as m:
        got = m.logits(tiny["ids"])
    assert np.isfinite(got).all()
    ref, deq = tiny["ref"], _dequantized_logits(out, tiny["ids"])
    scale = float(np.abs(ref).max())
    print(
        f"llama.cpp {type}: top-1 agreement with the f32 model {_top1(got, ref):.0%} (max diff {float(np.abs(got - ref).max()) / scale:.3g}"
        f" of max |logit|); with the dequantized weights in transformers {_top1(got, deq):.0%} ({float(np.abs(got - deq).max()) / scale:.3g})"
    )
    assert float(np.abs(got - deq).max()) <= 0.1 * scale
    assert _top1(got, deq) >= 0.75


def test_quantize_refusals(tiny: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match="q4_k_m"):
        llama_cpp.quantize(tiny["f32"], tmp_path / "x.gguf", "q4_k_mm")
    need_llama_cpp()
    with pytest.raises(LlamaCppError, match="does not exist"):
        llama_cpp.quantize(tmp_path / "missing.gguf", tmp_path / "x.gguf", "q6_k")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    with pytest.raises(LlamaCppError, match="could not quantize"):
        llama_cpp.quantize(junk, tmp_path / "x.gguf", "q6_k")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.gguf"]


# ---------------------------------------------------------------------------------- failures


def test_missing_runtime(tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORASAVE_LLAMA_CPP_DIR", str(tmp_path))
    assert not llama_cpp.available()
    for call in (llama_cpp.require, lambda: llama_cpp.LlamaCppModel(tiny["f32"]), lambda: llama_cpp.quantize(tiny["f32"], tmp_path / "x.gguf", "q6_k")):
        with pytest.raises(LlamaCppNotInstalledError, match=re.escape("lorasave install-llama-cpp")) as err:
            call()
        assert isinstance(err.value, FileNotFoundError) and str(tmp_path) in str(err.value)


def test_bad_model_paths(tiny: dict[str, Any], tmp_path: Path) -> None:
    need_llama_cpp()
    with pytest.raises(LlamaCppError, match="does not exist"):
        llama_cpp.LlamaCppModel(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file" * 100)
    with pytest.raises(LlamaCppError, match="could not load"):
        llama_cpp.LlamaCppModel(junk)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny["f32"].read_bytes()[: tiny["f32"].stat().st_size // 2])
    with pytest.raises(LlamaCppError, match="could not load"):
        llama_cpp.LlamaCppModel(truncated)
    with pytest.raises(LlamaCppError, match="LoRA adapter"):
        llama_cpp.LlamaCppModel(tiny["f32"], loras=[(junk, 1.0)])
    with llama_cpp.LlamaCppModel(tiny["f32"], n_ctx=16) as m:
        with pytest.raises(InvalidOptionError, match="n_ctx"):
            m.logits(tiny["ids"])  # 64 tokens > 16
        with pytest.raises(InvalidOptionError, match="outside the vocabulary"):
            m.logits([1, VOCAB])
    with pytest.raises(LlamaCppError, match="closed"):
        m.logits([1, 2])


# ---------------------------------------------------------------------------------- installer


def _tgz(path: Path, members: dict[str, bytes], *, symlink: tuple[str, str] | None = None) -> str:
    """Write a .tgz with these regular files (and maybe one symlink); return its sha512 SRI string."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink[0])
            info.type, info.linkname = tarfile.SYMTYPE, symlink[1]
            tar.addfile(info)
    path.write_bytes(buf.getvalue())
    return "sha512-" + base64.b64encode(hashlib.sha512(buf.getvalue()).digest()).decode()


def _fake_bins(extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
    files = {f"package/bins/linux-x64/{n}": b"\x7fELF fake" for n in llama_cpp_install.REQUIRED_FILES}
    files["package/package.json"] = b"{}"
    return {**files, **(extra or {})}


def test_installer_refuses_wrong_hash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tgz = tmp_path / "linux-x64-3.22.1.tgz"
    _tgz(tgz, _fake_bins())
    target = tmp_path / "rt"
    rc = llama_cpp_install.main(["--from-tgz", str(tgz), "--dir", str(target)])
    err = capsys.readouterr().err
    assert rc != 0 and err.startswith("error: ") and err.count("\n") == 1 and "integrity" in err
    assert not target.exists() and [p.name for p in tmp_path.iterdir()] == [tgz.name]  # no staging left behind


@pytest.mark.parametrize(
    "evil",
    [
        {"members": {"package/bins/linux-x64/../../../escaped.so": b"x"}},
        {"members": {"/tmp/abs-escaped.so": b"x"}},
        {"symlink": ("package/bins/linux-x64/libx.so", "/etc/passwd")},
    ],
    ids=["dotdot", "absolute", "symlink"],
)
def test_installer_refuses_unsafe_members(tmp_path: Path, evil: dict[str, Any]) -> None:
    tgz = tmp_path / "evil.tgz"
    integrity = _tgz(tgz, _fake_bins(evil.get("members")), symlink=evil.get("symlink"))
    target = tmp_path / "rt"
    with pytest.raises(UnsafePathError):
        llama_cpp_install.install(target, from_tgz=tgz, integrity=integrity)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tgz"]
    assert not (tmp_path.parent / "escaped.so").exists()


def test_installer_extracts_only_bins_and_is_idempotent(tmp_path: Path) -> None:
    tgz = tmp_path / "ok.tgz"
    integrity = _tgz(tgz, _fake_bins({"package/bins/linux-x64/libggml-cpu-x64.so": b"cpu"}))
    target = tmp_path / "rt"
    first = llama_cpp_install.install(target, from_tgz=tgz, integrity=integrity)
    assert first.installed and llama_cpp_install.is_installed(target) is False  # marker pins the real package's integrity
    assert sorted(p.name for p in target.iterdir()) == sorted([*llama_cpp_install.REQUIRED_FILES, "libggml-cpu-x64.so", llama_cpp_install.MARKER])
    assert not [p for p in tmp_path.iterdir() if "lorasave" in p.name]
    if llama_cpp_install.is_installed(llama_cpp.runtime_dir()):  # the real install: a second run is a no-op
        again = llama_cpp_install.install(llama_cpp.runtime_dir())
        assert not again.installed and again.seconds < 1.0


def test_installer_refuses_other_platforms(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(llama_cpp_install.platform, "machine", lambda: "aarch64")
    with pytest.raises(LlamaCppInstallError, match="Linux x86_64"):
        llama_cpp_install.install(tmp_path / "rt")


def test_installer_never_empties_a_foreign_folder(tmp_path: Path) -> None:
    """A non-empty target without lorasave's marker (e.g. --dir ~) is refused and left as it was;
    an empty folder or an earlier lorasave install is replaced."""
    from lorasave.errors import OutputExistsError

    tgz = tmp_path / "ok.tgz"
    integrity = _tgz(tgz, _fake_bins())
    mine = tmp_path / "home"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match=r"not a llama\.cpp runtime lorasave installed"):
        llama_cpp_install.install(mine, from_tgz=tgz, integrity=integrity, force=True)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if "lorasave" in p.name]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert llama_cpp_install.install(empty, from_tgz=tgz, integrity=integrity).installed
    assert llama_cpp_install.install(empty, from_tgz=tgz, integrity=integrity, force=True).installed  # ours: replaced
