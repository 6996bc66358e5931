"""GGUF output types: per-tensor GGML types against llama.cpp's own quantizer, tensor bytes against
gguf-py's quantizers on the f32 merge, logits in llama.cpp against transformers, the k-quants
streamed through ``ggml_quantize_chunk`` (bit-identical to ``llama_model_quantize`` of the f32
merge), the model card and the ``--no-modelfile`` switch.

Models: a tiny Llama (untied ``output.weight``) and a tiny Qwen2 (tied embeddings, q/k/v biases),
hidden size 256 so that llama.cpp's Q6_K for the output fits its 256-block, and intermediate size
272 so ``ffn_down`` rows (272) are not a multiple of 32 and must fall back to F16. Each has a
byte-level BPE tokenizer with a ChatML chat template and a LoRA trained a few steps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import ModelCard
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import _models as M
from lorasave.cli.main import GGUF_TYPE_CHOICES, main
from lorasave.errors import LlamaCppNotInstalledError
from lorasave.formats.gguf import mix as gguf_mix
from lorasave.formats.gguf import quant as gguf_quant
from lorasave.formats.gguf.export import GgufResult, export_gguf
from lorasave.formats.gguf.quant import K_SUBSTITUTE, GgufType
from lorasave.pipeline import run as pipeline_run
from lorasave.runtimes.llama_cpp import lib as llama_cpp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _llama import need_llama_cpp

Q = gguf.GGMLQuantizationType
TEXT = "Merging folds a low-rank update into the weights, and a GGUF file carries them to llama.cpp. " * 8
VOCAB = 256
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STREAMED = ["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
KQUANTS = ["q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k"]
#: The i-quants whose llama-quant.cpp mix needs no importance matrix.
IQUANTS = ["iq4_nl", "iq4_xs", "iq3_s", "iq3_m"]
#: llama-quantize's types that need an importance matrix, and the rest of its table (tests/test_gguf_imatrix.py)
IMATRIX_TYPES = ["q2_k_s", "iq3_xxs", "iq3_xs", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq1_s", "iq1_m"]
OTHER_TYPES = ["tq1_0", "tq2_0", "mxfp4_moe", "q1_0"]


def _tokenizer() -> PreTrainedTokenizerFast:
    out = M.build_byte_bpe_tokenizer(TEXT, VOCAB, specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>")
    out.chat_template = CHATML
    return out


def _make(root: Path, kind: str) -> dict[str, Any]:
    """A tiny float32 base, a trained LoRA, the PeftModel's logits and the merged state dict."""
    torch.manual_seed(0)
    tok = _tokenizer()
    common: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=272,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    if kind == "llama":
        model: torch.nn.Module = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **common))
    base, lora = root / f"{kind}-base", root / f"{kind}-lora"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :128]
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(12):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.save_pretrained(lora)
    peft_model.eval()
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits[0]
    return {"kind": kind, "base": base, "lora": lora, "ids": ids[0].tolist(), "ref": ref, "root": root}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Base, adapter, reference logits, the f32 export and llama.cpp's quantizations of it (cached per type)."""
    need_llama_cpp()
    m = _make(tmp_path_factory.mktemp(request.param), request.param)
    m["f32"] = export_gguf(m["base"], m["lora"], m["root"] / "out-f32", type="f32")
    # files are named as llama.cpp's converter names them (general.name / size label of the base, then the type)
    m["stem"] = m["f32"].gguf_file.name.removesuffix("-F32.gguf")
    m["ours"] = {}
    m["llama"] = {}
    return m


def _ours(tiny: dict[str, Any], type: str) -> GgufResult:
    if type not in tiny["ours"]:
        tiny["ours"][type] = export_gguf(tiny["base"], tiny["lora"], tiny["root"] / f"out-{type}", type=type)
    return tiny["ours"][type]


def _llama_quantized(tiny: dict[str, Any], type: str) -> Path:
    """llama.cpp's ``llama_model_quantize`` of our f32 GGUF (the f32 merge) to ``type``."""
    if type not in tiny["llama"]:
        dst = tiny["root"] / f"llama-{type}.gguf"
        llama_cpp.quantize(tiny["f32"].gguf_file, dst, type)
        tiny["llama"][type] = dst
    return tiny["llama"][type]


def _tensors(path: Path) -> dict[str, Any]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _file_type(path: Path) -> int:
    return int(gguf.GGUFReader(path).fields["general.file_type"].contents())


def test_cli_choices_are_the_enum() -> None:
    assert tuple(t.value for t in GgufType) == GGUF_TYPE_CHOICES
    assert all(t.streamed for t in GgufType)
    assert [t.value for t in GgufType if not t.needs_runtime] == ["f32", *STREAMED]
    assert [t.value for t in GgufType if t.needs_runtime] == [*KQUANTS, *IQUANTS, *IMATRIX_TYPES, *OTHER_TYPES]
    assert [t.value for t in GgufType if t.needs_imatrix] == IMATRIX_TYPES


@pytest.mark.parametrize("type", STREAMED)
def test_streamed_types_follow_llama_cpp(tiny: dict[str, Any], type: str) -> None:
    """Each tensor's type is llama-quantize's for the same file type, K types replaced by llama.cpp's
    own fallback; general.file_type is llama.cpp's; the bytes are gguf-py's quantization of the f32 merge."""
    res = _ours(tiny, type)
    ours = _tensors(res.gguf_file)
    theirs = _tensors(_llama_quantized(tiny, type))
    f32 = _tensors(tiny["f32"].gguf_file)
    assert set(ours) == set(theirs) == set(f32)
    substituted = []
    for name, t in ours.items():
        want = Q(theirs[name].tensor_type)
        assert t.tensor_type == K_SUBSTITUTE.get(want, want), (name, t.tensor_type.name, want.name)
        if want in K_SUBSTITUTE:
            substituted.append(name)
        got = np.asarray(t.data).tobytes()
        assert got == gguf.quants.quantize(np.asarray(f32[name].data), Q(t.tensor_type)).tobytes(), name
    assert _file_type(res.gguf_file) == _file_type(_llama_quantized(tiny, type)) == int(GgufType(type).file_type)
    # the rules the tiny models are built to exercise
    if type in ("q4_0", "q4_1", "q5_0", "q5_1"):
        promoted = "output.weight" if tiny["kind"] == "llama" else "token_embd.weight"
        assert substituted == [promoted] and Q(theirs[promoted].tensor_type) is Q.Q6_K
        assert any(promoted in n and "Q6_K" in n for n in res.notes)
    else:
        assert substituted == []
    if type != "f16" and type != "bf16":
        assert ours["blk.0.ffn_down.weight"].tensor_type == Q.F16  # 272 columns: not a multiple of 32
        assert ours["blk.0.ffn_up.weight"].tensor_type == GgufType(type).default_qtype
    assert ours["blk.0.attn_norm.weight"].tensor_type == Q.F32
    assert res.tensor_types == {k: sum(1 for t in ours.values() if t.tensor_type.name == k) for k in res.tensor_types}


@pytest.mark.parametrize("type", ["q8_0", "q4_0"])
def test_logits_in_llama_cpp(tiny: dict[str, Any], type: str) -> None:
    """The file run by llama.cpp against the unmerged PeftModel in transformers: top-1 agreement >= 95%."""
    with llama_cpp.LlamaCppModel(_ours(tiny, type).gguf_file, n_ctx=256) as m:
        got = torch.from_numpy(m.logits(tiny["ids"]))
    ref = tiny["ref"]
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    diff = (got - ref).abs().max().item()
    print(f"{tiny['kind']} {type}: top-1 agreement {agree:.1%}, max |diff| {diff:.3g} (max |logit| {ref.abs().max().item():.3g})")
    assert agree >= 0.95


def test_q4_k_m_streamed(tiny: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """q4_k_m: llama.cpp's mix (Q4_K and Q6_K), the same types as llama-quantize of the f32 merge,
    no intermediate file, the free-space check the file's own size, the manifest and card right."""
    needed: list[int] = []
    real = pipeline_run.check_free_space

    def spy(path: Path, nbytes: int, **kw: Any) -> None:
        needed.append(nbytes)
        real(path, nbytes, **kw)

    monkeypatch.setattr(pipeline_run, "check_free_space", spy)  # every output's check is the pipeline's
    res = _ours(tiny, "q4_k_m")
    assert res.llama_cpp_quantized and {"Q4_K", "Q6_K"} <= set(res.tensor_types)
    ours = _tensors(res.gguf_file)
    theirs = _tensors(_llama_quantized(tiny, "q4_k_m"))
    assert {n: t.tensor_type for n, t in ours.items()} == {n: t.tensor_type for n, t in theirs.items()}
    assert _file_type(res.gguf_file) == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert sorted(p.name for p in res.output.iterdir()) == sorted(["Modelfile", "README.md", "lorasave.json", f"{tiny['stem']}-Q4_K_M.gguf"])
    assert not [p for p in res.output.parent.iterdir() if "lorasave-tmp" in p.name]
    manifest = json.loads((res.output / "lorasave.json").read_text())
    assert set(manifest["files"]) == {"Modelfile", "README.md", res.gguf_file.name}
    assert manifest["files"][res.gguf_file.name]["bytes"] == res.gguf_file.stat().st_size
    assert manifest["result"]["quantized_from"] == "f32" and manifest["result"]["tensor_types"] == res.tensor_types
    assert "intermediate" not in manifest["result"]
    assert any("ggml_quantize_chunk" in n for n in manifest["result"]["notes"]) and "llama.cpp" in res.summary()
    size = res.gguf_file.stat().st_size  # the file only: no 16-bit intermediate to make room for
    assert needed and size <= needed[0] <= size + (16 << 20)


def test_bf16_base_quantizes_from_the_f32_merge(tiny: dict[str, Any], tmp_path: Path) -> None:
    """A bfloat16 base: the k-quant blocks are encoded from the float32 merge (no BF16 intermediate any more)."""
    base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.bfloat16).save_pretrained(base)
    PreTrainedTokenizerFast.from_pretrained(tiny["base"]).save_pretrained(base)
    res = export_gguf(base, tiny["lora"], tmp_path / "out", type="q6_k", modelfile=False)
    manifest = json.loads((res.output / "lorasave.json").read_text())
    assert manifest["result"]["quantized_from"] == "f32" and set(res.tensor_types) <= {"F32", "Q6_K", "Q8_0", "F16"}
    # bf16-base: the converter's heuristics make "bf16" a type and "base" the finetune
    assert res.gguf_file.name == f"Bf16-Base-{res.gguf_file.name.split('-')[2]}-base-Q6_K.gguf"
    assert sorted(p.name for p in res.output.iterdir()) == sorted([res.gguf_file.name, "README.md", "lorasave.json"])


def test_missing_runtime_writes_nothing(tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama_cpp, "available", lambda: False)
    out = tmp_path / "out"
    with pytest.raises(LlamaCppNotInstalledError, match="lorasave install-llama-cpp"):
        export_gguf(tiny["base"], tiny["lora"], out, type="q4_k_m")
    assert list(tmp_path.iterdir()) == []
    runner = CliRunner()
    r = runner.invoke(main, ["gguf", str(tiny["base"]), str(tiny["lora"]), "-o", str(out), "--type", "q5_k_m"])
    assert r.exit_code != 0 and "lorasave install-llama-cpp" in r.output and list(tmp_path.iterdir()) == []


def test_card_and_modelfile(tiny: dict[str, Any]) -> None:
    res = _ours(tiny, "q8_0")
    card = (res.output / "README.md").read_text()
    data = ModelCard.load(res.output / "README.md").data.to_dict()
    assert data["library_name"] == "gguf" and "gguf" in data["tags"] and "base_model" not in data  # a local base: no Hub id
    assert f"llama-cli -m {res.gguf_file.name}" in card and f"ollama create {res.output.name} -f Modelfile" in card
    assert f"| {tiny['lora'].name} | LORA | 8 | 16 |" in card and "Type: q8_0" in card
    for k, n in res.tensor_types.items():
        assert f"| {k} | {n} |" in card
    modelfile = (res.output / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{res.gguf_file.name}\n") and "<|im_start|>" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and res.chat_template_family == "chatml"
    manifest = json.loads((res.output / "lorasave.json").read_text())
    assert {"README.md", "Modelfile"} <= set(manifest["files"]) and res.modelfile == res.output / "Modelfile"


def test_no_modelfile_flag(tiny: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["gguf", str(tiny["base"]), str(tiny["lora"]), "-o", str(out), "--type", "q4_0", "--no-modelfile", "--json"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.md", "lorasave.json", f"{tiny['stem']}-Q4_0.gguf"])
    assert "ollama create" not in (out / "README.md").read_text()


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
@pytest.mark.parametrize("types", [["q8_0", "q4_k_m", "f16"], ["q4_k_m", "q4_0"]], ids=["q8_0,q4_k_m,f16", "q4_k_m,q4_0"])
def test_many_types_from_one_read(tiny: dict[str, Any], types: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--type a,b,c: one pass over the base, a writer per type (k-quants included: no intermediate file),
    each file byte-identical to its single-type run, and the output verifies."""
    passes: list[int] = []
    real = pipeline_run.execute_pass

    def counting(jobs: Any, *a: Any, **kw: Any) -> None:
        passes.append(sum(len(j.writers) for j in jobs))
        real(jobs, *a, **kw)

    monkeypatch.setattr(pipeline_run, "execute_pass", counting)
    out = tmp_path / "multi" / "m"
    out.parent.mkdir()
    r = CliRunner().invoke(main, ["gguf", str(tiny["base"]), str(tiny["lora"]), "-o", str(out), "--type", ",".join(types), "--verify", "--json"])
    assert r.exit_code == 0, r.output
    assert passes == [len(types)], "one pass: a writer per type"
    name = {t: f"{tiny['stem']}-{t.upper()}.gguf" for t in types}
    files = set(name.values())
    assert {p.name for p in out.iterdir()} == files | {"README.md", "Modelfile", "lorasave.json"}, "no intermediate left"
    doc = json.loads(r.output)
    assert doc["types"] == types and [Path(p).name for p in doc["gguf_files"]] == [name[t] for t in types]
    manifest = json.loads((out / "lorasave.json").read_text())
    assert manifest["settings"]["type"] == ",".join(types) and set(manifest["result"]["gguf_files"]) == files
    assert manifest["result"]["verification"]["ok"] and manifest["result"]["verification"]["tensors_exact"] > 0
    for t in types:
        single = export_gguf(tiny["base"], tiny["lora"], tmp_path / t / "m", type=t)
        assert (out / name[t]).read_bytes() == single.gguf_file.read_bytes(), t
        assert manifest["result"]["gguf_files"][name[t]]["tensor_types"] == single.tensor_types
        if t == types[0]:
            assert (out / "Modelfile").read_bytes() == (single.output / "Modelfile").read_bytes()
    card = (out / "README.md").read_text()
    assert all(f"`{name[t]}`" in card for t in types)
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0 and all(name[t] in r.output for t in types), r.output
    bad = CliRunner().invoke(main, ["gguf", str(tiny["base"]), str(tiny["lora"]), "-o", str(tmp_path / "bad"), "--type", "q8_0,q9_9"])
    assert bad.exit_code == 2 and "'q9_9' is not a GGUF type" in bad.output and not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------- k-quants in the stream


def _make_kquant(root: Path, kind: str) -> dict[str, Any]:
    """A tiny Llama whose rows are all multiples of 256 (hidden 256, intermediate 512) and a LoRA with
    random non-zero B on every projection: ``untied`` has 8 layers and GQA 2, ``tied`` 4 layers, tied
    embeddings and GQA 4 (q2_k's attn_v rule)."""
    torch.manual_seed(1)
    tok = _tokenizer()
    tied = kind == "tied"
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4 if tied else 8,
        num_attention_heads=8 if tied else 4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    base, lora = root / "base", root / "lora"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM"))
    peft_model.save_pretrained(lora)
    m = {"kind": kind, "base": base, "lora": lora, "root": root, "ours": {}, "llama": {}}
    m["f32"] = export_gguf(base, lora, root / "out-f32", type="f32", modelfile=False)
    return m


@pytest.fixture(scope="module", params=["untied", "tied"])
def tiny256(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    need_llama_cpp()
    return _make_kquant(tmp_path_factory.mktemp(f"k-{request.param}"), request.param)


def _kquant_matches(m: dict[str, Any], type: str) -> GgufResult:
    """Every tensor's type and bytes equal llama_model_quantize's of the f32 GGUF of the same merge."""
    res = export_gguf(m["base"], m["lora"], m["root"] / f"kq-{type}", type=type, modelfile=False)
    ours = _tensors(res.gguf_file)
    theirs = _tensors(_llama_quantized(m, type))
    assert set(ours) == set(theirs)
    for name, t in ours.items():
        assert t.tensor_type == theirs[name].tensor_type, (type, name, t.tensor_type.name, theirs[name].tensor_type.name)
        assert np.asarray(t.data).tobytes() == np.asarray(theirs[name].data).tobytes(), (type, name, t.tensor_type.name)
    assert _file_type(res.gguf_file) == _file_type(_llama_quantized(m, type)) == int(GgufType(type).file_type)
    assert res.llama_cpp_quantized and not [p for p in res.output.iterdir() if p.suffix == ".gguf" and p != res.gguf_file]
    return res


@pytest.mark.parametrize("type", KQUANTS)
def test_kquants_streamed_bit_identical(tiny256: dict[str, Any], type: str) -> None:
    """Rows of 256: the k-quant mix itself (use_more_bits layers, attn_v / ffn_down / attn_output promotions,
    the Q6_K output or tied token embedding), every byte as llama.cpp's own quantizer writes it."""
    res = _kquant_matches(tiny256, type)
    assert GgufType(type).default_qtype.name in res.tensor_types, res.tensor_types
    manifest = json.loads((res.output / "lorasave.json").read_text())
    assert manifest["result"]["quantized_from"] == "f32" and "intermediate" not in manifest["result"]


@pytest.mark.parametrize("type", KQUANTS)
def test_kquants_fallbacks_bit_identical(tiny: dict[str, Any], type: str) -> None:
    """The small-row models (ffn_down rows of 272): tensor_type_fallback's F16, the rest of the mix, byte for byte."""
    res = _kquant_matches(tiny, type)
    assert _tensors(res.gguf_file)["blk.0.ffn_down.weight"].tensor_type == Q.F16


# --------------------------------------------------------------------------- llama-quantize's options


def _llama_quantized_with(m: dict[str, Any], type: str, **params: Any) -> Path:
    """``llama_model_quantize`` of the f32 GGUF to ``type`` with the same ``llama_model_quantize_params`` fields."""
    key = (type, *sorted(params.items()))
    if key not in m["llama"]:
        dst = m["root"] / f"llama-{type}-{len(m['llama'])}.gguf"
        llama_cpp.quantize(m["f32"].gguf_file, dst, type, **params)
        m["llama"][key] = dst
    return m["llama"][key]


def _options_match(m: dict[str, Any], type: str, **opts: Any) -> GgufResult:
    """Types and bytes of every tensor equal llama_model_quantize's with the same params."""
    out = m["root"] / f"opt-{type}-{'-'.join(f'{k}={v}' for k, v in sorted(opts.items()))}"
    res = export_gguf(m["base"], m["lora"], out, type=type, modelfile=False, **opts)
    ours, theirs_path = _tensors(res.gguf_file), _llama_quantized_with(m, type, **opts)
    theirs = _tensors(theirs_path)
    assert set(ours) == set(theirs)
    for name, t in ours.items():
        assert t.tensor_type == theirs[name].tensor_type, (type, opts, name, t.tensor_type.name, theirs[name].tensor_type.name)
        assert np.asarray(t.data).tobytes() == np.asarray(theirs[name].data).tobytes(), (type, opts, name, t.tensor_type.name)
    assert _file_type(res.gguf_file) == _file_type(theirs_path) == int(GgufType(type).file_type)
    assert res.llama_cpp_quantized
    settings = json.loads((res.output / "lorasave.json").read_text())["settings"]
    assert settings["pure"] is bool(opts.get("pure", False))
    for k in ("output_tensor_type", "token_embedding_type"):
        assert settings[k] == (opts[k].lower() if opts.get(k) else None)
    return res


OPTION_CASES = [
    ("q4_k_m", {"pure": True}),
    ("q3_k_m", {"pure": True}),
    ("q4_0", {"pure": True}),
    ("q5_k_m", {"output_tensor_type": "q8_0", "token_embedding_type": "q4_k"}),
    ("q4_0", {"output_tensor_type": "q4_k"}),
    ("q3_k_l", {"token_embedding_type": "f16"}),
    ("q6_k", {"pure": True, "output_tensor_type": "F16"}),
    ("q2_k", {"output_tensor_type": "q5_k"}),
]


@pytest.mark.parametrize(("type", "opts"), OPTION_CASES, ids=[f"{t}-{'-'.join(o)}" for t, o in OPTION_CASES])
def test_kquants_options_bit_identical(tiny256: dict[str, Any], type: str, opts: dict[str, Any]) -> None:
    """--pure / --output-tensor-type / --token-embedding-type: every tensor's type and bytes as
    llama_model_quantize writes them with the same params (a tied token embedding follows
    output_tensor_type through the mix, unless pure or its own override)."""
    res = _options_match(tiny256, type, **opts)
    default = GgufType(type).default_qtype.name
    if opts.get("pure"):
        assert set(res.tensor_types) - {"F32", default} <= {opts.get("output_tensor_type", "").upper()} - {""}, res.tensor_types
        assert any("--pure" in n for n in res.notes)


@pytest.mark.parametrize(("type", "opts"), [("q4_k_m", {"pure": True}), ("q5_0", {"output_tensor_type": "q8_0"})])
def test_kquants_options_fallbacks_bit_identical(tiny: dict[str, Any], type: str, opts: dict[str, Any]) -> None:
    """The small-row models: tensor_type_fallback still applies under --pure; the overrides are taken as they are."""
    _options_match(tiny, type, **opts)


def test_options_refused_where_they_do_not_apply(tiny: dict[str, Any], tmp_path: Path) -> None:
    from lorasave.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError, match=r"--pure apply to llama-quantize's types .* not to f16"):
        export_gguf(tiny["base"], tiny["lora"], tmp_path / "a", type="q4_k_m,f16", pure=True)
    with pytest.raises(InvalidOptionError, match="GGML type 'q7_k' is not supported"):
        export_gguf(tiny["base"], tiny["lora"], tmp_path / "b", type="q4_k_m", output_tensor_type="q7_k")
    assert not any((tmp_path / n).exists() for n in "ab")
    # rows not a multiple of the override's block: llama.cpp takes an override as it is (no fallback), so it is refused
    shapes = [("token_embd.weight", (100, 288)), ("blk.0.attn_v.weight", (256, 288)), ("output.weight", (100, 288))]
    with pytest.raises(InvalidOptionError, match=r"--token-embedding-type q4_k: token_embd\.weight has rows of 288 values"):
        gguf_mix.tensor_types(shapes, GgufType.Q4_0, options=gguf_quant.QuantOptions(token_embedding_type=Q.Q4_K))
    pure = gguf_mix.tensor_types(shapes, GgufType.Q4_K_M, options=gguf_quant.QuantOptions(pure=True, output_tensor_type=Q.F16))
    assert [t.qtype for t in pure] == [Q.Q5_0, Q.Q5_0, Q.F16]  # tensor_type_fallback under --pure; the override as it is
    bad = CliRunner().invoke(main, ["gguf", str(tiny["base"]), str(tiny["lora"]), "-o", str(tmp_path / "d"), "--type", "q8_0", "--pure"])
    assert bad.exit_code == 2 and "not to q8_0" in bad.output and not (tmp_path / "d").exists(), bad.output


def test_cli_options(tiny256: dict[str, Any]) -> None:
    """The CLI flags reach export_gguf; the override choices are quant.OVERRIDE_TYPES."""
    from lorasave.cli.gguf import GGML_OVERRIDE_CHOICES
    from lorasave.formats.gguf.quant import OVERRIDE_TYPES

    assert tuple(t.name.lower() for t in OVERRIDE_TYPES) == GGML_OVERRIDE_CHOICES
    out = tiny256["root"] / "cli-opts"
    args = ["gguf", str(tiny256["base"]), str(tiny256["lora"]), "-o", str(out), "--type", "q4_k_s", "--pure", "--output-tensor-type", "Q8_0"]
    r = CliRunner().invoke(main, [*args, "--token-embedding-type", "q6_k", "--no-modelfile"])
    assert r.exit_code == 0, r.output
    ours = _tensors(next(out.glob("*.gguf")))
    theirs = _tensors(_llama_quantized_with(tiny256, "q4_k_s", pure=True, output_tensor_type="q8_0", token_embedding_type="q6_k"))
    for name, t in ours.items():
        assert t.tensor_type == theirs[name].tensor_type and np.asarray(t.data).tobytes() == np.asarray(theirs[name].data).tobytes(), name
    settings = json.loads((out / "lorasave.json").read_text())["settings"]
    assert (settings["pure"], settings["output_tensor_type"], settings["token_embedding_type"]) == (True, "q8_0", "q6_k")


# --------------------------------------------------------------------------- i-quants without an importance matrix


@pytest.mark.parametrize("type", IQUANTS)
def test_iquants_streamed_bit_identical(tiny256: dict[str, Any], type: str) -> None:
    """iq4_nl / iq4_xs / iq3_s / iq3_m: llama-quant.cpp's mix without an imatrix (attn_v Q5_K/Q4_K at
    GQA 4, the first eighth of ffn_down, iq3_m's attn_output), every byte as llama_model_quantize writes it."""
    res = _kquant_matches(tiny256, type)
    assert GgufType(type).default_qtype.name in res.tensor_types, res.tensor_types


@pytest.mark.parametrize("type", ["iq4_xs", "iq3_m"])
def test_iquants_fallbacks_bit_identical(tiny: dict[str, Any], type: str) -> None:
    """Rows of 272: IQ4_XS / IQ3_S fall back to IQ4_NL, then F16, as tensor_type_fallback does."""
    res = _kquant_matches(tiny, type)
    assert _tensors(res.gguf_file)["blk.0.ffn_down.weight"].tensor_type == Q.F16


@pytest.mark.parametrize(("type", "opts"), [("iq4_xs", {"pure": True, "output_tensor_type": "iq4_nl"}), ("q4_k_m", {"token_embedding_type": "iq3_s"})])
def test_iquant_options_bit_identical(tiny256: dict[str, Any], type: str, opts: dict[str, Any]) -> None:
    _options_match(tiny256, type, **opts)
