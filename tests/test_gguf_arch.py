"""GGUF export per architecture, proven in llama.cpp: merged tiny Llama (Llama 3.1 rope scaling),
Qwen3, Gemma 3 and Phi-3 written by ``export_gguf`` and loaded with ``lorasave.runtimes.llama_cpp.lib``.

References are never lorasave's own numbers: logits come from transformers on the float32 merged
checkpoint, token ids from the transformers tokenizer, metadata from config.json, ``rope_freqs``
from transformers' own Llama 3 inverse frequencies.

Tokenizers: Llama and Qwen3 carry byte-level BPE (Llama 3 / Qwen2 split regexes, hashes unknown to
llama.cpp's table so the architecture default applies), Gemma 3 a SentencePiece-style
``tokenizer.json`` only (what transformers 5 saves), Phi-3 a SentencePiece ``tokenizer.model``.
The Llama adapter carries its own tokenizer whose EOS is ``<|im_end|>``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorasave
from _llama import need_llama_cpp
from _models import build_arch_model, build_bpe_tokenizer, build_spm_tokenizer, train_lora
from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch import ARCHITECTURES, gguf_arch_for
from lorasave.formats.gguf.export import export_gguf

TEXT = "Merging folds the low-rank update into the weights, 12345 times in 2024: naïve café, 日本語のテキスト. LoRA adapts a frozen model."
# The special token ends the text: after one, llama.cpp's SentencePiece tokenizer prefixes the next text
# fragment with a space (llama-vocab.cpp, ``is_prev_special``), which transformers' Metaspace does not.
SENTENCE = "Hello  world 42 times, 3.14 café 日本語 ünïcödé<|im_end|>"
TYPES = ("f32", "f16", "bf16", "q8_0")
KINDS = {
    # kind: (tokenizer, LoRA target modules)
    "llama": ("bpe-llama3", "all-linear"),
    "qwen3": ("bpe-qwen2", "all-linear"),
    "gemma3": ("spm-json", "all-linear"),
    "phi3": ("spm", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
}


def _tokenizer(folder: Path, kind: str) -> Any:
    tok_kind = KINDS[kind][0]
    if tok_kind.startswith("bpe"):
        tok = build_bpe_tokenizer(tok_kind.split("-")[1])
        tok.save_pretrained(folder)
        return tok
    return build_spm_tokenizer(folder, "GemmaTokenizer" if kind == "gemma3" else "LlamaTokenizer", keep_model=tok_kind == "spm")


def _pretrain(model: Any, tok: Any, steps: int = 120) -> None:
    """A few full-model steps on the corpus: peaked logits, like a real model's (random ones are near ties)."""
    from _models import GGUF_CORPUS

    ids = torch.tensor([tok(GGUF_CORPUS).input_ids[: 64 * 4]]).reshape(4, 64)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module", params=list(KINDS))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Base + trained LoRA, the float32 merged checkpoint's logits on TEXT, and the four exports."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    base, lora = root / "base", root / "lora"
    tok = _tokenizer(base, kind)
    model = build_arch_model(kind, vocab=len(tok))
    _pretrain(model, tok)
    model.save_pretrained(base)
    peft_model = train_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules=KINDS[kind][1], task_type="CAUSAL_LM"), seed=3)
    peft_model.save_pretrained(lora)
    if kind == "llama":  # the fine-tune's tokenizer, with its own EOS
        tok.eos_token = "<|im_end|>"
        tok.save_pretrained(lora)
    merged = root / "merged"
    lorasave.merge(base, lora, merged, dtype="float32")
    ids = AutoTokenizer.from_pretrained(lora if kind == "llama" else base)(TEXT).input_ids
    hf = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids])).logits[0].numpy()
    results = {t: export_gguf(base, lora, root / f"out-{t}", type=t) for t in TYPES}
    return {
        "kind": kind,
        "base": base,
        "lora": lora,
        "tok": AutoTokenizer.from_pretrained(lora if kind == "llama" else base),
        "ids": ids,
        "ref": ref,
        "hf": hf,
        "results": results,
    }


def _fields(path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("type", TYPES)
def test_logits_in_llama_cpp(case: dict[str, Any], type: str) -> None:
    """llama.cpp on the GGUF vs transformers on the merged float32 checkpoint, every position."""
    need_llama_cpp()
    from lorasave.runtimes.llama_cpp.lib import LlamaCppModel

    ref = case["ref"]
    with LlamaCppModel(case["results"][type].gguf_file, n_ctx=128) as m:
        got = m.logits(case["ids"])
    assert got.shape == ref.shape
    diff = float(np.abs(got - ref).max())
    scale = float(np.abs(ref).max())
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    print(f"{case['kind']} {type}: max|diff| {diff:.3g} = {diff / scale:.3g} x max|logit|, top-1 {top1:.3f} over {len(case['ids'])} tokens")
    if type in ("f32", "f16"):
        assert diff <= 1e-3 * scale and top1 == 1.0
    else:
        assert top1 >= 0.95


def test_tokenize_parity(case: dict[str, Any]) -> None:
    """llama.cpp's tokenizer from the GGUF metadata == the transformers tokenizer (specials parsed)."""
    need_llama_cpp()
    from lorasave.runtimes.llama_cpp.lib import LlamaCppModel

    tok = case["tok"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    want = tok(SENTENCE).input_ids
    assert im_end in want
    with LlamaCppModel(case["results"]["f32"].gguf_file, n_ctx=128) as m:
        assert m.tokenize(SENTENCE, add_special=True, parse_special=True) == want
        assert m.tokenize(TEXT, add_special=True) == case["ids"]


def test_metadata(case: dict[str, Any]) -> None:
    kind = case["kind"]
    f = _fields(case["results"]["q8_0"].gguf_file)
    cfg = json.loads((case["base"] / "config.json").read_text())
    arch = {"llama": "llama", "qwen3": "qwen3", "gemma3": "gemma3", "phi3": "phi3"}[kind]
    assert f["general.architecture"] == arch and f["general.type"] == "model" and f["general.name"] == "Base"  # the base folder's name
    assert f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    expect = {
        "block_count": cfg["num_hidden_layers"],
        "context_length": cfg["max_position_embeddings"],
        "embedding_length": cfg["hidden_size"],
        "feed_forward_length": cfg["intermediate_size"],
        "attention.head_count": cfg["num_attention_heads"],
        "attention.head_count_kv": cfg["num_key_value_heads"],
    }
    for key, value in expect.items():
        assert f[f"{arch}.{key}"] == value, key
    assert f[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    rope = cfg["rope_parameters"]
    assert f[f"{arch}.rope.freq_base"] == pytest.approx(rope.get("full_attention", rope)["rope_theta"])
    if kind == "llama":
        assert f["llama.vocab_size"] == cfg["vocab_size"] and f["llama.rope.dimension_count"] == 16
    if kind in ("qwen3", "gemma3"):
        assert f[f"{arch}.attention.key_length"] == f[f"{arch}.attention.value_length"] == cfg["head_dim"]
    if kind == "gemma3":
        assert f["gemma3.attention.sliding_window"] == cfg["sliding_window"]
        assert f["gemma3.rope.freq_base_swa"] == pytest.approx(rope["sliding_attention"]["rope_theta"])
        assert "gemma3.final_logit_softcapping" not in f and f["tokenizer.ggml.add_space_prefix"] is False
    if kind == "phi3":
        assert f["phi3.rope.scaling.original_context_length"] == cfg["original_max_position_embeddings"]
        assert f["phi3.rope.dimension_count"] == cfg["hidden_size"] // cfg["num_attention_heads"]
    # tokenizer
    tok = case["tok"]
    assert f["tokenizer.ggml.model"] == ("gpt2" if kind in ("llama", "qwen3") else "llama")
    assert f["tokenizer.ggml.pre"] == {"llama": "llama-bpe", "qwen3": "qwen2"}.get(kind, "default")
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == cfg["vocab_size"]
    for special in ("<|im_end|>", tok.eos_token, tok.bos_token):
        i = tok.convert_tokens_to_ids(special)
        assert tokens[i] == special and types[i] == int(gguf.TokenType.CONTROL), special
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    if kind == "llama":
        assert tokens[f["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"  # the fine-tune's EOS, not the base's
    if kind in ("gemma3", "phi3"):
        assert "tokenizer.ggml.scores" in f and int(gguf.TokenType.BYTE) in types
        assert types[tok.unk_token_id] == int(gguf.TokenType.UNKNOWN)
    else:
        assert len(f["tokenizer.ggml.merges"]) > 10
    assert f["tokenizer.chat_template"] == tok.chat_template
    assert any("not in llama.cpp's table" in n for n in case["results"]["q8_0"].notes) == (kind in ("llama", "qwen3"))


def test_tensors(case: dict[str, Any]) -> None:
    """Tied output omitted, Gemma norms +1, Llama 3.1 ``rope_freqs`` equal to transformers' factors."""
    kind = case["kind"]
    reader = gguf.GGUFReader(case["results"]["f32"].gguf_file)
    data = {t.name: np.asarray(t.data) for t in reader.tensors}
    hf = {k: v.detach().numpy() for k, v in case["hf"].state_dict().items()}
    assert ("output.weight" in data) == (kind in ("llama", "phi3"))
    if kind == "gemma3":
        for hf_name, name in (("model.norm.weight", "output_norm.weight"), ("model.layers.0.self_attn.q_norm.weight", "blk.0.attn_q_norm.weight")):
            np.testing.assert_allclose(data[name], hf[hf_name] + 1, rtol=0, atol=1e-7)
    else:
        np.testing.assert_array_equal(data["output_norm.weight"], hf["model.norm.weight"])
    if kind == "phi3":
        assert data["blk.0.attn_qkv.weight"].shape == hf["model.layers.0.self_attn.qkv_proj.weight"].shape
        assert data["blk.0.ffn_up.weight"].shape == hf["model.layers.0.mlp.gate_up_proj.weight"].shape
    if kind == "llama":
        rotary = case["hf"].model.rotary_emb
        head_dim = 16
        plain = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        np.testing.assert_allclose(data["rope_freqs.weight"], (plain / rotary.inv_freq).numpy(), rtol=1e-5)
        assert len(set(np.round(data["rope_freqs.weight"], 4))) > 2  # low, high and smoothed bands
    else:
        assert "rope_freqs.weight" not in data


def test_verify_passes(case: dict[str, Any]) -> None:
    """``lorasave verify`` undoes every transform (names, Q/K permutation, Gemma +1)."""
    from lorasave.verify.run import verify

    for type in ("f32", "q8_0"):
        report = verify(case["results"][type].output)
        assert report.ok, report.summary()


# --------------------------------------------------------------------------- refusals


def _config(kind: str, **changes: Any) -> dict[str, Any]:
    cfg = build_arch_model(kind, vocab=64).config.to_dict()
    cfg.update(changes)
    return cfg


def test_unsupported_model_type_named() -> None:
    with pytest.raises(UnsupportedModelError) as err:
        gguf_arch_for({"model_type": "gpt_neox"})
    assert "gpt_neox" in str(err.value) and all(k in str(err.value) for k in ARCHITECTURES)


def test_gemma3_attention_scale_refused() -> None:
    gguf_arch_for(_config("gemma3"))  # head_dim == query_pre_attn_scalar: accepted
    with pytest.raises(UnsupportedModelError, match="query_pre_attn_scalar"):
        gguf_arch_for(_config("gemma3", query_pre_attn_scalar=32))
    with pytest.raises(UnsupportedModelError, match="layer_types"):
        gguf_arch_for(_config("gemma3", layer_types=["full_attention"] * 6))


def test_rope_refusals() -> None:
    long = {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [1.0] * 8, "short_factor": [1.0] * 8}
    with pytest.raises(UnsupportedModelError, match="LongRoPE"):
        gguf_arch_for(_config("phi3", rope_parameters=long))
    with pytest.raises(UnsupportedModelError, match="yarn"):
        gguf_arch_for(_config("qwen3", rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}))


def test_unsupported_tokenizer_refused(tmp_path: Path) -> None:
    """A WordPiece-style tokenizer.json (no byte-level BPE, no SentencePiece) is refused before anything is written."""
    from _models import build_tokenizer, save_model

    base = save_model(build_arch_model("qwen3", vocab=128), tmp_path / "base")
    build_tokenizer().save_pretrained(base)
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
    with pytest.raises(UnsupportedModelError, match="tokenizer"):
        export_gguf(base, [], tmp_path / "out", type="f16")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- converter parity details


def _plain_bytelevel_bpe(text: str) -> Any:
    """A GPT-2 style byte-level BPE (plain ``ByteLevel`` pre-tokenizer, like SmolLM2's) whose merges
    cover ``text``, so that another pre-tokenizer splitting ``text`` differently changes its ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from _models import GGUF_CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([GGUF_CORPUS, text, text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def test_bpe_pre_hash_from_tokenizer_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``tokenizer.ggml.pre`` follows tokenizer.json, not the model type: transformers 5 loads a Qwen2
    folder's tokenizer as ``Qwen2Tokenizer`` (Qwen2's split regex and NFC) whatever ``tokenizer_class``
    says; the converter's transformers 4 loads the class named, here ``PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast

    from lorasave.formats.gguf import vocab as gguf_vocab

    text, _ = gguf_vocab.bpe_pre_table()
    tok = _plain_bytelevel_bpe(text)
    folders = {}
    for model_type in ("qwen2", "llama"):
        folder = folders[model_type] = tmp_path / model_type
        tok.save_pretrained(folder)
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "PreTrainedTokenizerFast"}))
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    # the converter's ids: the class tokenizer_config.json names, built from tokenizer.json
    want = PreTrainedTokenizerFast(tokenizer_file=str(folders["llama"] / "tokenizer.json")).encode(text)
    assert AutoTokenizer.from_pretrained(folders["qwen2"]).encode(text) != want  # what the old code hashed
    digest = hashlib.sha256(str(want).encode()).hexdigest()
    monkeypatch.setattr(gguf_vocab, "bpe_pre_table", lambda: (text, {digest: "smollm"}))
    for model_type, folder in folders.items():
        notes: list[str] = []
        _, _, pre = gguf_vocab.bpe_vocab(folder, len(tok), ARCHITECTURES[model_type], notes)
        assert pre == "smollm" and not notes, model_type


@pytest.fixture(scope="module")
def gemma_cut(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Gemma 3 whose embedding has 40 rows more than its tokenizer.json (no tokenizer.model), with a LoRA."""
    root = tmp_path_factory.mktemp("gemma-cut")
    base, lora = root / "base", root / "lora"
    tok = build_spm_tokenizer(base, "GemmaTokenizer", keep_model=False)
    model = build_arch_model("gemma3", vocab=len(tok) + 40)
    _pretrain(model, tok, steps=40)
    model.save_pretrained(base)
    train_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"), seed=3).save_pretrained(lora)
    lorasave.merge(base, lora, root / "merged", dtype="float32")
    ids = tok(TEXT).input_ids
    hf = AutoModelForCausalLM.from_pretrained(root / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids])).logits[0].numpy()
    spec = json.loads((base / "tokenizer.json").read_text())
    return {
        "rows": hf.config.vocab_size,
        # Gemma3Model.modify_tensors: n_vocab_real = len(model.vocab) + len(added_tokens)
        "converter_rows": len(spec["model"]["vocab"]) + len(spec["added_tokens"]),
        "ids": ids,
        "ref": ref,
        "result": export_gguf(base, lora, root / "out", type="f32"),
    }


def test_gemma3_token_embd_cut_to_tokenizer(gemma_cut: dict[str, Any]) -> None:
    """token_embd keeps the converter's rows; the token list has as many; llama.cpp matches transformers."""
    need_llama_cpp()
    from lorasave.runtimes.llama_cpp.lib import LlamaCppModel

    keep = gemma_cut["converter_rows"]
    assert keep < gemma_cut["rows"]
    reader = gguf.GGUFReader(gemma_cut["result"].gguf_file)
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert [int(n) for n in embd.shape] == [64, keep]  # ggml order: (n_embd, n_vocab)
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == keep
    assert any("token_embd.weight written with the tokenizer's" in n for n in gemma_cut["result"].notes)
    ref = gemma_cut["ref"][:, :keep]
    with LlamaCppModel(gemma_cut["result"].gguf_file, n_ctx=128) as m:
        got = m.logits(gemma_cut["ids"])
    assert got.shape == ref.shape
    diff, scale = float(np.abs(got - ref).max()), float(np.abs(ref).max())
    assert diff <= 1e-3 * scale and (got.argmax(-1) == ref.argmax(-1)).all(), diff / scale


def test_gemma3_cut_verifies(gemma_cut: dict[str, Any]) -> None:
    """``verify`` reads the cut token_embd back (tensors) and compares llama.cpp's logits (logits)."""
    need_llama_cpp()
    from lorasave.verify.run import verify

    for level in ("tensors", "logits"):
        report = verify(gemma_cut["result"].output, level=level)
        assert report.ok, report.summary()
