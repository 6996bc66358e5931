"""GGUF export: tensor names/types/shapes/metadata read back with gguf-py, and logits of the file
loaded by transformers' GGUF loader against the unmerged PeftModel.

Models: a tiny Llama with GQA (4 heads, 2 KV heads, untied) and a tiny Qwen2 (q/k/v biases,
tied embeddings, intermediate size 80 so ``ffn_down`` rows are not a multiple of 32 and Q8_0 must
fall back to F16), each with a byte-level BPE tokenizer and a LoRA trained a few steps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import _models as M
from lorasave.errors import InvalidOptionError, OutputExistsError, UnsupportedModelError
from lorasave.formats.gguf.arch import gguf_arch_for
from lorasave.formats.gguf.export import GgufResult, export_gguf, permute_qk

TEXT = "LoRA adapts a frozen model by adding a low-rank update to some of its weight matrices. Merging folds that update into the weights. " * 6
VOCAB = 256
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tokenizer() -> PreTrainedTokenizerFast:
    return M.build_byte_bpe_tokenizer(TEXT, VOCAB)


def _make(root: Path, kind: str) -> tuple[Path, Path]:
    """Write a tiny base (float32) and a trained LoRA; return their folders."""
    torch.manual_seed(0)
    tok = _tokenizer()
    common: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    if kind == "llama":
        model: torch.nn.Module = LlamaForCausalLM(LlamaConfig(intermediate_size=128, tie_word_embeddings=False, **common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(intermediate_size=80, tie_word_embeddings=True, **common))
    base, lora = root / f"{kind}-base", root / f"{kind}-lora"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :96]
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(15):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.save_pretrained(lora)
    return base, lora


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Base, adapter, the unmerged PeftModel's logits on the training text, and the three exports."""
    root = tmp_path_factory.mktemp(request.param)
    base, lora = _make(root, request.param)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, lora).eval()
    ids = PreTrainedTokenizerFast.from_pretrained(base)(TEXT, return_tensors="pt").input_ids[:, :64]
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits
        merged = {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    results = {t: export_gguf(base, lora, root / f"out-{t}", type=t) for t in ("f32", "f16", "q8_0")}
    return {"kind": request.param, "base": base, "lora": lora, "ids": ids, "ref": ref, "merged": merged, "results": results, "root": root}


def _reader(res: GgufResult) -> gguf.GGUFReader:
    return gguf.GGUFReader(res.gguf_file)


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    return reader.fields[key].contents()


def _expected_names(kind: str) -> set[str]:
    names = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if kind == "llama" else set())
    for b in range(2):
        for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm"):
            names.add(f"blk.{b}.{t}.weight")
        if kind == "qwen2":
            names |= {f"blk.{b}.attn_q.bias", f"blk.{b}.attn_k.bias", f"blk.{b}.attn_v.bias"}
    return names


def test_file_layout_and_manifest(tiny: dict[str, Any]) -> None:
    res = tiny["results"]["f16"]
    # named as llama.cpp's converter names a conversion of the base folder (llama-base): no longer after OUT
    size = _field(_reader(res), "general.size_label")
    assert res.gguf_file == res.output / f"{tiny['kind'].title()}-Base-{size}-F16.gguf" and res.gguf_file.is_file()
    assert _field(_reader(res), "general.name") == f"{tiny['kind'].title()} Base"
    manifest = json.loads((res.output / "lorasave.json").read_text())
    assert manifest["command"] == "gguf" and manifest["settings"]["type"] == "f16"
    assert manifest["files"][res.gguf_file.name]["bytes"] == res.gguf_file.stat().st_size == res.total_bytes
    assert res.n_merged == 14 and res.n_tensors == len(_expected_names(tiny["kind"]))
    assert not [p for p in res.output.parent.iterdir() if "lorasave-tmp" in p.name]


@pytest.mark.parametrize("type", ["f32", "f16", "q8_0"])
def test_tensor_names_types_shapes(tiny: dict[str, Any], type: str) -> None:
    reader = _reader(tiny["results"][type])
    got = {t.name: t for t in reader.tensors}
    assert set(got) == _expected_names(tiny["kind"])
    hf = {
        "token_embd.weight": (VOCAB, 64),
        "blk.0.attn_q.weight": (64, 64),
        "blk.0.attn_k.weight": (32, 64),
        "blk.1.ffn_down.weight": (64, 128 if tiny["kind"] == "llama" else 80),
    }
    for name, shape in hf.items():
        assert tuple(int(n) for n in got[name].shape) == shape[::-1], name  # ggml order: ne0 = row length
    want = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[type]
    for name, t in got.items():
        if name.endswith(("_norm.weight", ".bias")):
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        elif type == "q8_0" and int(t.shape[0]) % 32 != 0:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16, name  # llama.cpp's QuantError fallback
        else:
            assert t.tensor_type == want, name
    if type == "q8_0" and tiny["kind"] == "qwen2":
        assert got["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16
        assert any("F16" in n for n in tiny["results"]["q8_0"].notes)


def test_metadata(tiny: dict[str, Any]) -> None:
    kind = tiny["kind"]
    reader = _reader(tiny["results"]["q8_0"])
    assert _field(reader, "general.architecture") == kind
    assert _field(reader, "general.type") == "model"
    assert _field(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    expect = {
        "context_length": 128,
        "embedding_length": 64,
        "block_count": 2,
        "feed_forward_length": 128 if kind == "llama" else 80,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
    }
    for key, value in expect.items():
        assert _field(reader, f"{kind}.{key}") == value, key
    cfg = json.loads((tiny["base"] / "config.json").read_text())
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    assert _field(reader, f"{kind}.rope.freq_base") == pytest.approx(float(theta))
    assert _field(reader, f"{kind}.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6, rel=1e-3)
    if kind == "llama":
        assert _field(reader, "llama.vocab_size") == VOCAB and _field(reader, "llama.rope.dimension_count") == 16
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    tok = PreTrainedTokenizerFast.from_pretrained(tiny["base"])
    assert len(tokens) == VOCAB and tokens[tok.eos_token_id] == "<|endoftext|>"
    assert _field(reader, "tokenizer.ggml.token_type")[tok.eos_token_id] == int(gguf.TokenType.CONTROL)
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    merges = json.loads((tiny["base"] / "tokenizer.json").read_text())["model"]["merges"]
    assert len(_field(reader, "tokenizer.ggml.merges")) == len(merges) > 10


def test_qk_permutation(tiny: dict[str, Any]) -> None:
    """attn_q/attn_k hold the merged weights permuted (Llama, n_head_kv for k) or as-is (Qwen2)."""
    reader = _reader(tiny["results"]["f32"])
    data = {t.name: np.asarray(t.data) for t in reader.tensors}
    m = tiny["merged"]
    q, k, v = (m[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    if tiny["kind"] == "llama":
        q, k = permute_qk(q, 4, 4), permute_qk(k, 4, 2)
        assert not torch.equal(permute_qk(k, 4, 2), permute_qk(k, 4, 4))  # GQA matters
    else:
        np.testing.assert_allclose(data["blk.1.attn_k.bias"], m["model.layers.1.self_attn.k_proj.bias"].numpy(), atol=1e-6)
    for name, ref in (("attn_q", q), ("attn_k", k), ("attn_v", v)):
        np.testing.assert_allclose(data[f"blk.1.{name}.weight"], ref.numpy(), atol=1e-6, rtol=1e-6, err_msg=name)


def _gguf_logits(tiny: dict[str, Any], type: str) -> torch.Tensor:
    res = tiny["results"][type]
    model = AutoModelForCausalLM.from_pretrained(res.output, gguf_file=res.gguf_file.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tiny["ids"]).logits


def test_logits_f32(tiny: dict[str, Any]) -> None:
    ref = tiny["ref"]
    assert (_gguf_logits(tiny, "f32") - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_logits_f16(tiny: dict[str, Any]) -> None:
    ref = tiny["ref"]
    assert (_gguf_logits(tiny, "f16") - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_logits_q8_0_top1(tiny: dict[str, Any]) -> None:
    ref = tiny["ref"]
    agree = (_gguf_logits(tiny, "q8_0").argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.95


def test_output_exists_and_overwrite(tiny: dict[str, Any]) -> None:
    res = tiny["results"]["f32"]
    with pytest.raises(OutputExistsError):
        export_gguf(tiny["base"], tiny["lora"], res.output, type="f32")
    again = export_gguf(tiny["base"], tiny["lora"], res.output, type="f32", overwrite=True)
    assert again.gguf_file.read_bytes() == res.gguf_file.read_bytes()  # deterministic, replaced whole


def test_bad_type_and_unsupported_model(tiny: dict[str, Any]) -> None:
    with pytest.raises(InvalidOptionError, match="q4_kx"):  # q4_k is llama-quantize's alias of q4_k_m now
        export_gguf(tiny["base"], tiny["lora"], tiny["root"] / "bad", type="q4_kx")
    other = tiny["root"] / "other-base"
    shutil.copytree(tiny["base"], other, dirs_exist_ok=True)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_type"] = "phi3"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="phi3"):
        export_gguf(other, tiny["lora"], tiny["root"] / "phi", type="f16")
    with pytest.raises(UnsupportedModelError, match="bert"):
        gguf_arch_for({"model_type": "bert"})
    assert not (tiny["root"] / "bad").exists() and not (tiny["root"] / "phi").exists()
