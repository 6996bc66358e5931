"""Importance matrices (issue 13 point 3): llama-imatrix's file layouts and ``lorasave imatrix``.

* The GGUF layout written by ``write_imatrix`` is byte for byte what ggml's own ``gguf_*`` writer
  (the pinned runtime's libggml-base, called as ``tools/imatrix/imatrix.cpp`` ``save_imatrix`` calls
  it) writes for the same values; ``load_imatrix`` gives ``tools/quantize/quantize.cpp``'s
  normalisation (computed here with numpy from the raw values), for the GGUF and the legacy
  ``.dat`` layouts (the latter built here with ``struct``).
* Hostile files are one ``ImatrixError`` line, fast.
* ``lorasave imatrix`` on a tiny Llama + LoRA against sums computed by hand in torch from the
  safetensors files (RMSNorm, RoPE, attention, SwiGLU written out here; layer 1 from PeftModel's
  hidden states): no hook and no lorasave merge in the reference.
* The same sums from llama.cpp's own evaluation of the f32 GGUF of the merge, collected through its
  evaluation callback exactly as ``IMatrixCollector::collect_imatrix`` collects them.
* ``llama_model_quantize`` takes the file's importances for iq2_xxs (which refuses to run without
  one), and another importance matrix gives other bytes.
"""

from __future__ import annotations

import ctypes
import json
import struct
import sys
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tokenizers import processors
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import _models as M
from lorasave.cli.main import main
from lorasave.errors import ImatrixError, SourceNotFoundError
from lorasave.formats.gguf.imatrix import load_imatrix, write_imatrix

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _llama import need_llama_cpp

TEXT = "Merging folds a low-rank update into the weights, and a GGUF file carries them to llama.cpp. " * 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BOS = 1


def _raw(n_mat: int, ncols: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n_mat, ncols), dtype=np.float32) * 100


def _sample() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A dense weight, a 3-expert weight with an expert never routed to (count 0), and a 1-column one."""
    sums = {"blk.0.attn_q.weight": _raw(1, 64, 0), "blk.1.ffn_down_exps.weight": _raw(3, 40, 1), "output.weight": _raw(1, 1, 2)}
    counts = {"blk.0.attn_q.weight": np.array([96]), "blk.1.ffn_down_exps.weight": np.array([7, 0, 89]), "output.weight": np.array([3])}
    return sums, counts


# ------------------------------------------------------------------------------------ the format


def test_round_trip_and_quantize_cpp_normalisation(tmp_path: Path) -> None:
    sums, counts = _sample()
    path = write_imatrix(tmp_path / "m.gguf", sums, counts, datasets=["calib.txt", "more.txt"], chunk_count=3, chunk_size=32)
    r = gguf.GGUFReader(path)
    assert [f for f in r.fields if not f.startswith("GGUF.")] == ["general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    assert r.fields["general.type"].contents() == "imatrix"
    shapes = {t.name: (t.tensor_type.name, t.shape.tolist()) for t in r.tensors}
    assert shapes["blk.1.ffn_down_exps.weight.in_sum2"] == ("F32", [40, 3])
    assert shapes["blk.1.ffn_down_exps.weight.counts"] == ("F32", [1, 3])
    assert shapes["blk.0.attn_q.weight.in_sum2"] == ("F32", [64])  # ggml drops trailing 1s

    imx = load_imatrix(path)
    assert imx.names == sorted(sums) and imx.datasets == ["calib.txt", "more.txt"] and (imx.chunk_count, imx.chunk_size) == (3, 32)
    assert not imx.legacy and imx.importance("blk.9.nothing.weight") is None
    got = imx.importances()
    for name, s in sums.items():
        c = counts[name].astype(np.float32)
        want = np.where(c[:, None] > 0, s / np.maximum(c, 1)[:, None], np.float32(1)).astype(np.float32).reshape(-1)
        assert got[name].dtype == np.float32 and got[name].shape == (s.size,)
        np.testing.assert_array_equal(got[name], want)
    assert (got["blk.1.ffn_down_exps.weight"][40:80] == 1).all()  # the expert with count 0


def test_folder_is_accepted_and_missing_file_is_not(tmp_path: Path) -> None:
    sums, counts = _sample()
    write_imatrix(tmp_path / "imatrix.gguf", sums, counts, datasets=["x"], chunk_count=1, chunk_size=16)
    assert load_imatrix(tmp_path).names == sorted(sums)
    with pytest.raises(SourceNotFoundError):
        load_imatrix(tmp_path / "nope.gguf")
    with pytest.raises(SourceNotFoundError):
        load_imatrix(tmp_path / "nope")


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _ggml_write(path: Path, sums: dict[str, np.ndarray], counts: dict[str, np.ndarray], datasets: list[str], chunk_count: int, chunk_size: int) -> None:
    """``save_imatrix``'s calls (tools/imatrix/imatrix.cpp), through the runtime's libggml-base."""
    from lorasave.runtimes.llama_cpp import ggml

    lib = ggml.ggml_base()
    p, c_p = ctypes.c_void_p, ctypes.c_char_p
    for fn, res, args in [
        ("ggml_init", p, [_InitParams]),
        ("ggml_new_tensor_2d", p, [p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]),
        ("ggml_set_name", p, [p, c_p]),
        ("ggml_get_data", p, [p]),
        ("ggml_tensor_overhead", ctypes.c_size_t, []),
        ("gguf_init_empty", p, []),
        ("gguf_set_val_str", None, [p, c_p, c_p]),
        ("gguf_set_arr_str", None, [p, c_p, ctypes.POINTER(c_p), ctypes.c_size_t]),
        ("gguf_set_val_u32", None, [p, c_p, ctypes.c_uint32]),
        ("gguf_add_tensor", None, [p, p]),
        ("gguf_write_to_file", ctypes.c_bool, [p, c_p, ctypes.c_bool]),
        ("gguf_free", None, [p]),
        ("ggml_free", None, [p]),
    ]:
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, args
    size = sum(2 * lib.ggml_tensor_overhead() + 4 * (s.size + c.size) + 64 for s, c in zip(sums.values(), counts.values(), strict=True))
    ctx = lib.ggml_init(_InitParams(size, None, False))
    g = lib.gguf_init_empty()
    lib.gguf_set_val_str(g, b"general.type", b"imatrix")
    lib.gguf_set_arr_str(g, b"imatrix.datasets", (c_p * len(datasets))(*[d.encode() for d in datasets]), len(datasets))
    lib.gguf_set_val_u32(g, b"imatrix.chunk_count", chunk_count)
    lib.gguf_set_val_u32(g, b"imatrix.chunk_size", chunk_size)
    for name in sorted(sums):
        c = np.ascontiguousarray(counts[name], dtype=np.float32).reshape(-1)
        s = np.ascontiguousarray(sums[name], dtype=np.float32).reshape(len(c), -1)
        for suffix, arr, ne0 in ((".in_sum2", s, s.shape[1]), (".counts", c, 1)):
            t = lib.ggml_new_tensor_2d(ctx, 0, ne0, len(c))  # GGML_TYPE_F32
            lib.ggml_set_name(t, (name + suffix).encode())
            ctypes.memmove(lib.ggml_get_data(t), arr.ctypes.data, arr.nbytes)
            lib.gguf_add_tensor(g, t)
    assert lib.gguf_write_to_file(g, str(path).encode(), False)
    lib.gguf_free(g)
    lib.ggml_free(ctx)


def test_bytes_are_ggml_gguf_writers(tmp_path: Path) -> None:
    need_llama_cpp()
    sums, counts = _sample()
    ours = write_imatrix(tmp_path / "ours.gguf", sums, counts, datasets=["calib.txt", "b"], chunk_count=3, chunk_size=512)
    _ggml_write(tmp_path / "ggml.gguf", sums, counts, ["calib.txt", "b"], 3, 512)
    assert ours.read_bytes() == (tmp_path / "ggml.gguf").read_bytes()


def _legacy(entries: list[tuple[bytes, int, np.ndarray]], trailer: bytes = b"") -> bytes:
    out = struct.pack("<i", len(entries))
    for name, ncall, values in entries:
        out += struct.pack("<i", len(name)) + name + struct.pack("<ii", ncall, values.size) + values.astype("<f4").tobytes()
    return out + trailer


def test_legacy_dat(tmp_path: Path) -> None:
    a, b = _raw(1, 48, 3).reshape(-1), _raw(1, 16, 4).reshape(-1)
    path = tmp_path / "old.dat"
    path.write_bytes(_legacy([(b"blk.0.attn_k.weight", 7, a), (b"blk.0.ffn_up.weight", 0, b)], struct.pack("<ii", 12, 9) + b"wiki.text"))
    imx = load_imatrix(path)
    assert imx.legacy and imx.names == ["blk.0.attn_k.weight", "blk.0.ffn_up.weight"]
    assert (imx.chunk_count, imx.chunk_size, imx.datasets) == (12, 0, ["wiki.text"])
    np.testing.assert_array_equal(imx.importance("blk.0.attn_k.weight"), (a / np.float32(7)).astype(np.float32))
    np.testing.assert_array_equal(imx.importance("blk.0.ffn_up.weight"), b)  # ncall 0: the values as stored
    path.write_bytes(_legacy([(b"blk.0.attn_k.weight", 7, a)]))  # the trailer is optional
    assert load_imatrix(path).chunk_count == 0 and load_imatrix(path).datasets == []


def _gguf_file(path: Path, tensors: dict[str, np.ndarray], keys: bool = True, chunk_count_type: gguf.GGUFValueType = gguf.GGUFValueType.UINT32) -> Path:
    """A GGUF written by gguf-py (not by ``write_imatrix``): the imatrix keys unless ``keys`` is False."""
    w = gguf.GGUFWriter(path, arch="x")
    if keys:
        w.add_array("imatrix.datasets", ["t"])
        w.add_key_value("imatrix.chunk_count", 1, chunk_count_type)
        w.add_uint32("imatrix.chunk_size", 16)
    for n, t in tensors.items():
        w.add_tensor(n, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _hostile(tmp_path: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, a word of the expected message)."""
    good = write_imatrix(tmp_path / "good.gguf", *_sample(), datasets=["t"], chunk_count=1, chunk_size=16).read_bytes()
    f32 = np.ones((1, 8), np.float32)
    nan = f32.copy()
    nan[0, 3] = np.nan
    big_count = np.array([[1e30]], np.float32)
    made = {
        "no_metadata": (_gguf_file(tmp_path / "a", {"w.in_sum2": f32, "w.counts": np.ones((1, 1), np.float32)}, keys=False), "metadata"),
        "sums_alone": (_gguf_file(tmp_path / "b", {"w.in_sum2": f32}), "mismatched"),
        "shapes": (_gguf_file(tmp_path / "c", {"w.in_sum2": np.ones((3, 8), np.float32), "w.counts": np.ones((2, 1), np.float32)}), "disagree"),
        "nan": (_gguf_file(tmp_path / "d", {"w.in_sum2": nan, "w.counts": np.ones((1, 1), np.float32)}), "non-finite"),
        "huge_count": (_gguf_file(tmp_path / "e", {"w.in_sum2": f32, "w.counts": big_count}), "counts"),
        "f16": (_gguf_file(tmp_path / "f", {"w.in_sum2": f32.astype(np.float16), "w.counts": np.ones((1, 1), np.float32)}), "F32"),
        "wrong_key_type": (
            _gguf_file(tmp_path / "g", {"w.in_sum2": f32, "w.counts": np.ones((1, 1), np.float32)}, chunk_count_type=gguf.GGUFValueType.INT64),
            "UINT32",
        ),
    }
    out = {k: (p.read_bytes(), word) for k, (p, word) in made.items()}
    out["truncated_header"] = (good[:40], "readable")
    out["truncated_data"] = (good[: len(good) - 100], "readable")
    out["huge_tensor_count"] = (good[:8] + struct.pack("<Q", 1 << 60) + good[16:], "tensors")
    # imatrix.datasets claims 2**60 strings: gguf-py's reader would loop over nothing without the strict reads
    pos = good.index(b"imatrix.datasets") + len(b"imatrix.datasets") + 8
    out["huge_kv_array"] = (good[:pos] + struct.pack("<Q", 1 << 60) + good[pos + 8 :], "readable")
    out["empty"] = (b"", "not an importance matrix")
    out["random"] = (bytes(range(7, 107)), "")
    out["legacy_huge_entries"] = (struct.pack("<i", 1 << 30) + b"\0" * 64, "entries")
    out["legacy_negative_name"] = (struct.pack("<ii", 1, -5) + b"\0" * 64, "bytes")
    out["legacy_huge_nval"] = (struct.pack("<ii", 1, 1) + b"w" + struct.pack("<ii", 1, 1 << 30) + b"\0" * 64, "truncated")
    out["legacy_truncated"] = (_legacy([(b"w", 1, np.ones(8, np.float32))])[:-3], "truncated")
    out["legacy_nan"] = (_legacy([(b"w", 1, np.array([1, np.inf], np.float32))]), "non-finite")
    out["legacy_twice"] = (_legacy([(b"w", 1, np.ones(2, np.float32)), (b"w", 1, np.ones(2, np.float32))]), "twice")
    out["legacy_zero_values"] = (_legacy([(b"w", 1, np.ones(0, np.float32))]), "values")
    return out


def test_hostile_files_are_one_line(tmp_path: Path) -> None:
    cases = _hostile(tmp_path)
    for name, (data, word) in cases.items():
        path = tmp_path / f"{name}.imatrix"
        path.write_bytes(data)
        t0 = time.perf_counter()
        with pytest.raises(ImatrixError) as info:
            load_imatrix(path)
        msg = str(info.value)
        assert "\n" not in msg and word in msg and str(path) in msg, (name, msg)
        assert time.perf_counter() - t0 < 2, name
        assert isinstance(info.value, ValueError)


def test_write_refuses_what_llama_cpp_cannot_read(tmp_path: Path) -> None:
    sums, counts = _sample()
    for bad in (
        lambda: write_imatrix(tmp_path / "x", sums, counts, datasets=[], chunk_count=1, chunk_size=16),
        lambda: write_imatrix(tmp_path / "x", {"a" * 60: np.ones(4)}, {"a" * 60: np.array([1])}, datasets=["t"], chunk_count=1, chunk_size=16),
        lambda: write_imatrix(tmp_path / "x", {"w": np.full(4, np.nan)}, {"w": np.array([1])}, datasets=["t"], chunk_count=1, chunk_size=16),
        lambda: write_imatrix(tmp_path / "x", {"w": np.ones((2, 4))}, {"w": np.array([1])}, datasets=["t"], chunk_count=1, chunk_size=16),
        lambda: write_imatrix(tmp_path / "x", {"w": np.ones(4)}, {"v": np.array([1])}, datasets=["t"], chunk_count=1, chunk_size=16),
    ):
        with pytest.raises(ImatrixError):
            bad()
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))


# ------------------------------------------------------------------------ lorasave imatrix (torch)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A Llama whose rows are multiples of 256 (i-quants apply), untied, a LoRA with non-zero B on every
    projection, a byte-level BPE tokenizer that adds BOS, and a calibration text."""
    root = tmp_path_factory.mktemp("imatrix")
    tok = M.build_byte_bpe_tokenizer(TEXT, 256, specials=["<|endoftext|>", "<s>"], bos="<s>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)])
    assert tok.encode("a")[0] == BOS
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=0,
    )
    base, lora = root / "base", root / "lora"
    LlamaForCausalLM(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False))
    peft_model.save_pretrained(lora)
    text = root / "calib.txt"
    text.write_text(TEXT * 3, encoding="utf-8")
    out = root / "out"
    res = CliRunner().invoke(main, ["imatrix", str(base), str(lora), "--text", str(text), "-o", str(out), "--chunk-size", "32", "--chunks", "3", "--json"])
    assert res.exit_code == 0, res.output
    return {"root": root, "base": base, "lora": lora, "tok": tok, "text": text, "out": out, "json": json.loads(res.stdout)}


def _merged_state(base: Path, lora: Path) -> dict[str, torch.Tensor]:
    """W0 + (alpha/r) B @ A for every LoRA module, from the safetensors files."""
    w = load_file(base / "model.safetensors")
    ad = load_file(lora / "adapter_model.safetensors")
    cfg = json.loads((lora / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    for key in [k for k in ad if k.endswith("lora_A.weight")]:
        target = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        w[target] = w[target] + scale * ad[key.replace("lora_A", "lora_B")] @ ad[key]
    return w


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE of ``(heads, tokens, head_dim)``, positions 0..tokens-1."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    return x * cos + torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1) * sin


def _chunks(tiny: dict[str, Any], size: int, n: int) -> list[list[int]]:
    """llama-imatrix's chunks: BOS, the text's tokens (special-token text not parsed), each chunk's first token BOS."""
    ids = [BOS] + tiny["tok"](tiny["text"].read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    return [[BOS, *ids[i * size + 1 : (i + 1) * size]] for i in range(n)]


def test_imatrix_matches_a_hand_computation(tiny: dict[str, Any]) -> None:
    imx = load_imatrix(tiny["out"])
    assert tiny["json"]["chunks"] == 3 and tiny["json"]["n_entries"] == 14
    kinds = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    assert imx.names == sorted(f"blk.{i}.{k}.weight" for i in range(2) for k in kinds)  # no output.weight by default
    assert (imx.chunk_count, imx.chunk_size, imx.datasets) == (3, 32, [str(tiny["text"])])
    assert all(e.counts.tolist() == [96] for e in imx.entries.values())

    cfg = json.loads((tiny["base"] / "config.json").read_text())
    eps, theta = cfg["rms_norm_eps"], cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    n_head, n_kv, hd = 4, 2, 64
    w = _merged_state(tiny["base"], tiny["lora"])
    p = "model.layers.0."
    want: dict[str, torch.Tensor] = {
        k: torch.zeros(256 if k != "ffn_down" else 512, dtype=torch.float64) for k in ("attn_q", "attn_output", "ffn_up", "ffn_down")
    }
    want1 = torch.zeros(256, dtype=torch.float64)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["base"]), tiny["lora"]).eval()
    for ids in _chunks(tiny, 32, 3):
        with torch.no_grad():
            emb = w["model.embed_tokens.weight"][torch.tensor(ids)]
            x0 = _rms(emb, w[p + "input_layernorm.weight"], eps)
            q = (x0 @ w[p + "self_attn.q_proj.weight"].T).view(-1, n_head, hd).transpose(0, 1)
            k = (x0 @ w[p + "self_attn.k_proj.weight"].T).view(-1, n_kv, hd).transpose(0, 1)
            v = (x0 @ w[p + "self_attn.v_proj.weight"].T).view(-1, n_kv, hd).transpose(0, 1)
            q, k = _rope(q, theta), _rope(k, theta)
            k, v = k.repeat_interleave(n_head // n_kv, 0), v.repeat_interleave(n_head // n_kv, 0)
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).reshape(len(ids), -1)
            h = emb + att @ w[p + "self_attn.o_proj.weight"].T
            x1 = _rms(h, w[p + "post_attention_layernorm.weight"], eps)
            act = F.silu(x1 @ w[p + "mlp.gate_proj.weight"].T) * (x1 @ w[p + "mlp.up_proj.weight"].T)
            for key, x in (("attn_q", x0), ("attn_output", att), ("ffn_up", x1), ("ffn_down", act)):
                want[key] += x.double().pow(2).sum(0)
            hidden1 = peft_model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0]
            want1 += _rms(hidden1, w["model.layers.1.input_layernorm.weight"], eps).double().pow(2).sum(0)
    for key, ref in want.items():
        np.testing.assert_allclose(imx.entries[f"blk.0.{key}.weight"].sums[0], ref.numpy(), rtol=2e-5, atol=1e-6, err_msg=key)
    np.testing.assert_array_equal(imx.entries["blk.0.attn_k.weight"].sums, imx.entries["blk.0.attn_q.weight"].sums)
    np.testing.assert_array_equal(imx.entries["blk.0.ffn_gate.weight"].sums, imx.entries["blk.0.ffn_up.weight"].sums)
    np.testing.assert_allclose(imx.entries["blk.1.attn_q.weight"].sums[0], want1.numpy(), rtol=2e-5, atol=1e-6)
    manifest = json.loads((tiny["out"] / "lorasave.json").read_text())
    assert manifest["command"] == "imatrix" and set(manifest["files"]) == {"imatrix.gguf"}


def test_process_output_records_output_weight(tiny: dict[str, Any], tmp_path: Path) -> None:
    from lorasave.formats.gguf.calibrate import compute_imatrix

    res = compute_imatrix(tiny["base"], [], tmp_path / "o", text=tiny["text"], chunk_size=16, chunks=1, process_output=True)
    imx = load_imatrix(res.output)
    assert "output.weight" in imx.names and imx.entries["output.weight"].counts.tolist() == [16] and len(imx.names) == 15


def test_cli_errors_are_one_line(tiny: dict[str, Any], tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe not utf-8")
    short = tmp_path / "short.txt"
    short.write_text("tiny", encoding="utf-8")
    runner = CliRunner()
    for args, code, word in (
        (["--text", str(bad)], 2, "not UTF-8"),
        (["--text", str(short)], 2, "fewer than one chunk"),
        (["--text", str(tmp_path / "none.txt")], 2, "does not exist"),
    ):
        res = runner.invoke(main, ["imatrix", str(tiny["base"]), "-o", str(tmp_path / "o"), *args])
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == code and len(lines) == 1 and lines[0].startswith("error:") and word in lines[0], (args, res.output)
        assert not (tmp_path / "o").exists()
    res = runner.invoke(main, ["imatrix", str(tiny["base"]), "-o", str(tmp_path / "o"), "--text", str(short), "--chunk-size", "8"])
    assert res.exit_code == 2 and "--chunk-size" in res.output and not (tmp_path / "o").exists()


# --------------------------------------------------------------------- llama_model_quantize takes it


def test_llama_model_quantize_uses_the_importances(tiny: dict[str, Any]) -> None:
    need_llama_cpp()
    from lorasave.errors import LlamaCppError
    from lorasave.formats.gguf.export import export_gguf
    from lorasave.runtimes.llama_cpp import lib as llama_cpp

    root = tiny["root"]
    f32 = export_gguf(tiny["base"], tiny["lora"], root / "f32", type="f32", modelfile=False).gguf_file
    imx = load_imatrix(tiny["out"])
    with pytest.raises(LlamaCppError):
        llama_cpp.quantize(f32, root / "none.gguf", "iq2_xxs")
    llama_cpp.quantize(f32, root / "a.gguf", "iq2_xxs", imatrix=imx.importances())
    other = {n: np.ascontiguousarray(v[::-1]) for n, v in imx.importances().items()}
    llama_cpp.quantize(f32, root / "b.gguf", "iq2_xxs", imatrix=other)
    a = {t.name: (t.tensor_type, bytes(t.data)) for t in gguf.GGUFReader(root / "a.gguf").tensors}
    b = {t.name: (t.tensor_type, bytes(t.data)) for t in gguf.GGUFReader(root / "b.gguf").tensors}
    assert a["blk.0.attn_q.weight"][0] == gguf.GGMLQuantizationType.IQ2_XXS
    assert a["blk.0.attn_q.weight"][1] != b["blk.0.attn_q.weight"][1]
    assert a["token_embd.weight"] == b["token_embd.weight"]  # llama.cpp gives the embedding no importance


# ------------------------------------------------------- llama.cpp's own evaluation, as llama-imatrix


class _GgmlTensor(ctypes.Structure):
    """``struct ggml_tensor`` (ggml/include/ggml.h, v0.5.0: GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10, GGML_MAX_NAME 64)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def _llama_cpp_imatrix(gguf_file: Path, chunks: list[list[int]]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """``IMatrixCollector::collect_imatrix``'s sums for dense weights, from llama.cpp's evaluation callback."""
    from lorasave.runtimes.llama_cpp import ggml
    from lorasave.runtimes.llama_cpp import lib as llama_cpp

    base = ggml.ggml_base()
    base.ggml_op_name.restype, base.ggml_op_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
    mul_mat = next(i for i in range(200) if base.ggml_op_name(i) == b"MUL_MAT")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def collect(t_ptr: int, ask: bool, _: Any) -> bool:
        t = _GgmlTensor.from_address(t_ptr)
        if t.op != mul_mat:
            return not ask  # not interested; a call with ask=False goes on
        src0, src1 = _GgmlTensor.from_address(t.src[0]), _GgmlTensor.from_address(t.src[1])
        wname = src0.name.decode().split("#")[1] if b"#" in src0.name else src0.name.decode()
        if ask:
            return src1.ne[1] >= 16 and src1.type == 0 and wname.startswith("blk.")
        shape = (src1.ne[3], src1.ne[2], src1.ne[1], src1.ne[0])
        strides = (src1.nb[3], src1.nb[2], src1.nb[1], src1.nb[0])
        extent = sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) + 4
        buf = np.frombuffer((ctypes.c_char * extent).from_address(src1.data), dtype=np.uint8)
        x = np.lib.stride_tricks.as_strided(buf.view(np.float32), shape, strides).reshape(-1, src1.ne[0]).astype(np.float64)
        sums[wname] = sums.get(wname, 0) + (x * x).sum(0)
        counts[wname] = counts.get(wname, 0) + x.shape[0]
        return True

    callback = llama_cpp.ggml_backend_sched_eval_callback(collect)
    real = llama_cpp._lib()

    class WithCallback:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def llama_context_default_params(self) -> Any:
            params = real.llama_context_default_params()
            params.cb_eval = callback
            return params

    original = llama_cpp._lib
    llama_cpp._lib = lambda: WithCallback()  # type: ignore[assignment]
    try:
        with llama_cpp.LlamaCppModel(gguf_file, n_ctx=len(chunks[0])) as m:
            for ids in chunks:
                m.logits(ids)
    finally:
        llama_cpp._lib = original  # type: ignore[assignment]
    return sums, counts


def test_imatrix_matches_llama_cpp_evaluation(tiny: dict[str, Any]) -> None:
    """The sums llama-imatrix's collector would take from llama.cpp evaluating the f32 GGUF of the same merge."""
    need_llama_cpp()
    from lorasave.formats.gguf.export import export_gguf

    root = tiny["root"]
    found = sorted((root / "f32-eval").glob("*-F32.gguf"))
    f32 = found[0] if found else export_gguf(tiny["base"], tiny["lora"], root / "f32-eval", type="f32", modelfile=False).gguf_file
    sums, counts = _llama_cpp_imatrix(f32, _chunks(tiny, 32, 3))
    imx = load_imatrix(tiny["out"])
    assert sorted(sums) == imx.names
    for name in imx.names:  # llama.cpp's f32 kernels against float32 torch: 3e-6 here
        assert counts[name] == int(imx.entries[name].counts[0]) == 96, name
        np.testing.assert_allclose(imx.entries[name].sums[0], sums[name], rtol=5e-5, atol=1e-6, err_msg=name)
