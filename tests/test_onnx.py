"""ONNX export: the decoder graph built directly (``formats.onnx.graph``) with the merged weights
streamed into it, for a tiny Llama (grouped-query attention), Qwen2 (q/k/v biases), Qwen3 (q/k
norms), Mistral (sliding window 4, shorter than the test prompts), Phi-3 (fused projections) and
Gemma 3 text (sliding/full layers, (1 + w) norms, attention scalar), each with a LoRA trained a few
steps with PEFT.

References come from transformers: the unmerged PeftModel in float32 (and the float32 merge written
by ``lorasave.merge``), from raw onnxruntime sessions fed by hand here, and from onnxruntime's own
``MatMulNBitsQuantizer`` for the quantized weights; never from lorasave's own runner, except where a
test is about that runner (``onnx_generate``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import _models as M

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from lorasave.errors import InvalidOptionError, OutputExistsError, UnsupportedModelError  # noqa: E402
from lorasave.formats.onnx.export import OnnxResult, OnnxVerificationError, export_onnx, onnx_generate  # noqa: E402
from lorasave.pipeline import manifest  # noqa: E402

N_LAYERS, N_HEADS, N_KV_HEADS, HIDDEN = 2, 4, 2, 64
HEAD_DIM = HIDDEN // N_HEADS
FP32_TOLERANCE = 1e-4  # max |onnxruntime - transformers| / max |logit|
PROMPT = "w3 w17 w5 w22 w9 w31"
# fill the word-level vocabulary up to the model's, so every generated id decodes to a word
FILLER_WORDS = tuple(f"x{i}" for i in range(M.VOCAB - 44))

CONFIG: dict[str, Any] = {
    "vocab_size": M.VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": 2 * HIDDEN,
    "num_hidden_layers": N_LAYERS,
    "num_attention_heads": N_HEADS,
    "num_key_value_heads": N_KV_HEADS,
    "max_position_embeddings": 64,
    "initializer_range": 0.1,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


@dataclass
class Exported:
    """A base, its LoRA, the float32 merge (the reference checkpoint) and the ONNX export of the same pair."""

    name: str
    base: Path
    adapter: Path
    merged: Path
    out: Path
    result: OnnxResult


def _biased(model: Any) -> Any:
    with torch.no_grad():  # non-trivial q/k/v biases, so an export that dropped them shows
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.1)
    return model


def _norms(model: Any) -> Any:
    with torch.no_grad():  # norm weights away from their init, so a wrong norm formula shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(ARCHS.index(name) if name in ARCHS else 9)
    if name == "llama":
        return LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    if name == "qwen2":
        return _biased(Qwen2ForCausalLM(Qwen2Config(**CONFIG)).eval())
    if name == "qwen3":
        return _norms(Qwen3ForCausalLM(Qwen3Config(**CONFIG, head_dim=HEAD_DIM)).eval())
    if name == "mistral":
        return MistralForCausalLM(MistralConfig(**CONFIG, sliding_window=4)).eval()
    if name == "phi3":
        return Phi3ForCausalLM(Phi3Config(**CONFIG)).eval()
    if name == "gemma3":
        # smaller init: with the sqrt(hidden) embedding scale a tied head of 0.1 repeats one token
        cfg = Gemma3TextConfig(
            **{**CONFIG, "initializer_range": 0.02},
            head_dim=HEAD_DIM,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=24,
        )
        return _norms(Gemma3ForCausalLM(cfg).eval())
    raise KeyError(name)


ARCHS = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3"]


@pytest.fixture(scope="session")
def onnx_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx_zoo")


@pytest.fixture(scope="session")
def sources(onnx_zoo: Path) -> dict[str, Any]:
    """Session memo: ``{name: (base, adapter, float32 merge)}`` and ``{"export:name": Exported}``, each built on first use."""
    return {}


def _sources(cache: dict[str, Any], zoo: Path, name: str) -> tuple[Path, Path, Path]:
    if name not in cache:
        import lorasave

        base = M.save_model(_build(name), zoo / f"{name}_base")
        M.build_tokenizer(FILLER_WORDS).save_pretrained(base)
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        adapter = M.make_adapter(base, zoo / f"{name}_lora", lora, seed=ARCHS.index(name) if name in ARCHS else 9)
        merged = zoo / f"{name}_merged"  # the float32 merge: a second reference, for Llama only (time)
        if name == "llama":
            lorasave.merge(base, adapter, merged, dtype="float32")
        cache[name] = (base, adapter, merged)
    return cache[name]


def _exported(cache: dict[str, Any], zoo: Path, name: str) -> Exported:
    key = f"export:{name}"
    if key not in cache:
        base, adapter, merged = _sources(cache, zoo, name)
        out = zoo / f"{name}_onnx"
        cache[key] = Exported(name, base, adapter, merged, out, export_onnx(base, adapter, out, verify=name == "llama"))
    return cache[key]


@pytest.fixture(scope="session", params=ARCHS)
def exported(request: pytest.FixtureRequest, sources: dict[str, Any], onnx_zoo: Path) -> Exported:
    return _exported(sources, onnx_zoo, request.param)


@pytest.fixture(scope="session")
def llama(sources: dict[str, Any], onnx_zoo: Path) -> tuple[Path, Path, Path]:
    return _sources(sources, onnx_zoo, "llama")


# ------------------------------------------------------------------------------- raw onnxruntime


def _session(folder: Path) -> Any:
    return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


def _run(sess: Any, ids: np.ndarray, mask: np.ndarray, past: dict[str, np.ndarray] | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One step fed by hand, position ids as optimum computes them; returns logits and ``{past name: present}``."""
    batch = ids.shape[0]
    pos = np.cumsum(mask, -1) - 1
    pos = np.where(mask == 0, 1, pos)[:, -ids.shape[1] :]
    feed = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64), "position_ids": pos.astype(np.int64)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            dtype = np.float16 if "float16" in i.type else np.float32
            feed[i.name] = past[i.name] if past is not None else np.zeros((batch, N_KV_HEADS, 0, HEAD_DIM), dtype)
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(names, feed), strict=True))
    present = {n.replace("present.", "past_key_values."): v for n, v in outs.items() if n.startswith("present.")}
    return outs["logits"].astype(np.float32), present


def _rows() -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(3, M.VOCAB, (n,), generator=gen).tolist() for n in (9, 5)]


@torch.no_grad()
def _logits(model: torch.nn.Module, tokens: list[int]) -> np.ndarray:
    return model(input_ids=torch.tensor([tokens])).logits[0].float().numpy()


def _compare_steps(sess: Any, model: torch.nn.Module) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(step, onnx logits, transformers logits) for prefill, decode with past, and a left-padded batch (prefill + decode)."""
    rows = _rows()
    pairs = []
    # prefill, then one token with the prefill's cache
    ref = _logits(model, rows[0])
    got, past = _run(sess, np.array([rows[0]]), np.ones((1, len(rows[0]))), None)
    pairs.append(("prefill", got[0], ref))
    nxt = int(ref[-1].argmax())
    got, present = _run(sess, np.array([[nxt]]), np.ones((1, len(rows[0]) + 1)), past)
    assert all(v.shape == (1, N_KV_HEADS, len(rows[0]) + 1, HEAD_DIM) for v in present.values())
    pairs.append(("decode", got[0], _logits(model, [*rows[0], nxt])[-1:]))
    # left-padded batch: each row equals its own unpadded transformers run
    width = max(map(len, rows))
    ids = np.zeros((2, width), np.int64)
    mask = np.zeros((2, width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    got, past = _run(sess, ids, mask, None)
    nexts = []
    for i, r in enumerate(rows):
        ref = _logits(model, r)
        pairs.append((f"batch row {i}", got[i, width - len(r) :], ref))
        nexts.append(int(ref[-1].argmax()))
    got, _ = _run(sess, np.array([[n] for n in nexts]), np.concatenate([mask, np.ones((2, 1), np.int64)], 1), past)
    for i, r in enumerate(rows):
        pairs.append((f"batch decode row {i}", got[i], _logits(model, [*r, nexts[i]])[-1:]))
    return pairs


def _load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------- the tests


def test_graph_names_and_kv_head_cache(exported: Exported) -> None:
    sess = _session(exported.out)
    kv = [f"{p}.{i}.{k}" for i in range(N_LAYERS) for k in ("key", "value") for p in ("past_key_values",)]
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "position_ids", *kv]
    assert [o.name for o in sess.get_outputs()] == ["logits", *(n.replace("past_key_values", "present") for n in kv)]
    for i in sess.get_inputs()[3:]:
        batch, heads, seq, dim = i.shape
        assert isinstance(batch, str) and isinstance(seq, str), i.shape
        assert (heads, dim) == (N_KV_HEADS, HEAD_DIM), f"{i.name}: cache shaped by {heads} heads, the model has {N_KV_HEADS} KV heads"
        assert i.type == "tensor(float)"
    for o in sess.get_outputs()[1:]:
        assert (o.shape[1], o.shape[3]) == (N_KV_HEADS, HEAD_DIM)
    assert (exported.result.num_kv_heads, exported.result.head_dim, exported.result.n_layers) == (N_KV_HEADS, HEAD_DIM, N_LAYERS)


def test_onnxruntime_matches_peft_model(exported: Exported) -> None:
    """Prefill, a decode step with the cache, and a left-padded batch (prefill + decode) against the unmerged
    PeftModel and the float32 merge; prompts of 9 tokens exceed Mistral's and Gemma 3's window of 4."""
    sess = _session(exported.out)
    peft_model = PeftModel.from_pretrained(_load(exported.base), exported.adapter).eval()
    references = [("PeftModel", peft_model)] + ([("transformers on the merge", _load(exported.merged))] if exported.merged.is_dir() else [])
    for label, model in references:
        pairs = _compare_steps(sess, model)
        max_logit = max(float(np.abs(want).max()) for _, _, want in pairs)
        for step, got, want in pairs:
            diff = float(np.abs(got - want).max())
            print(f"{exported.name} {step} vs {label}: max |dlogit| {diff:.3g} (max |logit| {max_logit:.3g})")
            assert diff <= FP32_TOLERANCE * max_logit, f"{step}: onnxruntime differs from {label} by {diff} (max |logit| {max_logit})"
    v = exported.result.verification
    if exported.name == "llama":  # the export's own check (verify=True) agrees
        assert v is not None and v["passed"] is True and v["relative_diff"] <= FP32_TOLERANCE
        assert set(v["checks"]) == {"prefill", "decode", "batch_prefill", "batch_decode"}


def test_onnx_generate_equals_transformers_greedy(sources: dict[str, Any], onnx_zoo: Path) -> None:
    """Llama only: for a qwen2 config transformers' AutoTokenizer picks Qwen2Tokenizer, which ignores the test's word-level tokenizer."""
    ex = _exported(sources, onnx_zoo, "llama")
    merged = _load(ex.merged)
    tok = AutoTokenizer.from_pretrained(ex.merged)
    inputs = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        generated = merged.generate(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=0)
    want = tok.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(want.split()) >= 5, f"the reference {want!r} has few words; the comparison would say little"
    got = onnx_generate(ex.out, PROMPT, max_new_tokens=10)
    print(f"llama: transformers {want!r} / onnxruntime {got!r}")
    assert got == want


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_onnxruntime_genai_greedy_equals_transformers(name: str, sources: dict[str, Any], onnx_zoo: Path) -> None:
    """onnxruntime-genai runs the same folder (genai_config.json): its greedy generator continues a prompt exactly
    as transformers' greedy generate on the PeftModel, and the logits it picks each token from match; 14 new
    tokens pass Gemma 3's window of 4."""
    og = pytest.importorskip("onnxruntime_genai")
    ex = _exported(sources, onnx_zoo, name)
    prompt = _rows()[0]
    peft_model = PeftModel.from_pretrained(_load(ex.base), ex.adapter).eval()
    with torch.no_grad():
        ref = peft_model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=14, do_sample=False, pad_token_id=0, eos_token_id=None)
    want = ref[0, len(prompt) :].tolist()
    model = og.Model(str(ex.out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + len(want), do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(prompt, dtype=np.int32))
    steps = []
    while not generator.is_done():
        steps.append(np.asarray(generator.get_logits(), dtype=np.float32).reshape(-1))  # the logits the next token is chosen from
        generator.generate_next_token()
    got = [int(t) for t in generator.get_sequence(0)][len(prompt) :]
    print(f"{name}: transformers {want} / onnxruntime-genai {got}")
    assert got == want
    full = _logits(peft_model, [*prompt, *want[:-1]])[len(prompt) - 1 :]  # (new tokens, vocab)
    assert len(steps) == len(want)
    diff = float(np.abs(np.stack(steps) - full).max())
    assert diff <= FP32_TOLERANCE * float(np.abs(full).max()), f"onnxruntime-genai's logits differ by {diff}"


def test_manifest_and_files(sources: dict[str, Any], onnx_zoo: Path) -> None:
    ex = _exported(sources, onnx_zoo, "llama")
    out = ex.out
    doc = json.loads((out / manifest.MANIFEST_NAME).read_text())
    assert doc["command"] == "onnx"
    on_disk = {p.name for p in out.iterdir()}
    assert on_disk == {*doc["files"], manifest.MANIFEST_NAME} == set(ex.result.files)
    assert {"model.onnx", "model.onnx.data", "config.json", "tokenizer.json", "genai_config.json"} <= on_disk
    assert not any(n.endswith(".safetensors") for n in on_disk), "no merged checkpoint in OUT"
    for name, entry in doc["files"].items():
        assert entry["sha256"] == manifest.sha256_file(out / name), name
    assert doc["settings"]["dtype"] == "float32" and doc["settings"]["quantize"] is None
    assert doc["result"]["verification"]["passed"] is True
    assert doc["result"]["cache"]["num_kv_heads"] == N_KV_HEADS
    assert Path(doc["sources"]["adapters"][0]["path"]) == ex.adapter.resolve()
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert not list(out.parent.glob(f".{out.name}.lorasave-*")), "staging folder left behind"
    assert ex.result.summary().startswith("exported an ONNX decoder")


def test_graph_built_directly_weights_external(llama: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No torch export runs; every weight is an external initializer of model.onnx.data, Linear weights stored (out, in)."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("torch.onnx.export was called")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    base, adapter, merged = llama
    export_onnx(base, adapter, tmp_path / "o")
    model = onnx.load(str(tmp_path / "o" / "model.onnx"), load_external_data=False)
    big = [t for t in model.graph.initializer if t.name.endswith(".weight")]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    assert all(dict((e.key, e.value) for e in t.external_data)["location"] == "model.onnx.data" for t in big)
    assert (tmp_path / "o" / "model.onnx").stat().st_size < 200_000
    want = M.read_tensors(merged)
    full = onnx.load(str(tmp_path / "o" / "model.onnx"))
    got = {t.name: onnx.numpy_helper.to_array(t) for t in full.graph.initializer if t.name in want}
    assert set(got) == {n for n in want if n != "lm_head.weight"} | ({"lm_head.weight"} if "lm_head.weight" in want else set())
    for name, value in got.items():
        np.testing.assert_array_equal(value, want[name].numpy(), err_msg=name)
    assert {"Gemm"} <= {n.op_type for n in full.graph.node}


def _reference_quantized(merged: Path, names: list[str], bits: int, block: int, symmetric: bool) -> dict[str, np.ndarray]:
    """onnxruntime's MatMulNBitsQuantizer run on one model holding every weight as a MatMul (K, N) initializer."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    tensors = M.read_tensors(merged)
    nodes, inits, outs = [], [], []
    for i, name in enumerate(names):
        w = tensors[name].float().numpy().T.copy()  # (K, N) = (in, out)
        inits.append(numpy_helper.from_array(w, name))
        nodes.append(helper.make_node("MatMul", ["x" + str(w.shape[0]), name], [f"y{i}"], name=f"mm{i}"))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    ins = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]) for k in sorted({tensors[n].shape[1] for n in names})]
    model = helper.make_model(helper.make_graph(nodes, "ref", ins, outs, inits), opset_imports=[helper.make_opsetid("", 21)])
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=symmetric, accuracy_level=4)
    q.process()
    return {t.name: numpy_helper.to_array(t) for t in q.model.model.graph.initializer}


@pytest.mark.parametrize(("bits", "block", "symmetric"), [(4, 32, True), (4, 128, False), (8, 32, False), (8, 128, True)])
def test_quantized_bit_identical_to_matmul_nbits_quantizer(llama: tuple[Path, Path, Path], tmp_path: Path, bits: int, block: int, symmetric: bool) -> None:
    base, adapter, merged = llama
    res = export_onnx(base, adapter, tmp_path / "q", quantize=f"int{bits}", block_size=block, symmetric=symmetric, verify=True)
    model = onnx.load(str(tmp_path / "q" / "model.onnx"))
    got = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    linear = sorted(n for n in M.read_tensors(merged) if n.endswith("proj.weight"))
    assert len(nodes) == len(linear) + 1  # every Linear and lm_head; the embeddings stay a float Gather
    want = _reference_quantized(merged, linear, bits, block, symmetric)
    for name in linear:
        for suffix in (f"_Q{bits}", "_scales", *(() if symmetric else ("_zero_points",))):
            np.testing.assert_array_equal(got[name + suffix], want[name + suffix], err_msg=name + suffix)
    for n in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (bits, block, 4)
        assert len(n.input) == (3 if symmetric else 4)
    v = res.verification
    print(f"int{bits} block {block} {'sym' if symmetric else 'asym'}: top-1 {v['top1_agreement']:.1%}, max |dlogit| {v['max_abs_diff']:.3g}")
    assert v["passed"] is None and np.isfinite(v["max_abs_diff"]) and v["top1_agreement"] >= (0.9 if bits == 8 else 0.25)  # random tiny weights: int4 is coarse


def test_float16(llama: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, adapter, merged = llama
    res = export_onnx(base, adapter, tmp_path / "fp16", dtype="float16", verify=True)
    sess = _session(tmp_path / "fp16")
    assert all(i.type == "tensor(float16)" for i in sess.get_inputs()[3:])
    pairs = _compare_steps(sess, _load(merged))
    max_logit = max(float(np.abs(w).max()) for _, _, w in pairs)
    diff = max(float(np.abs(g - w).max()) for _, g, w in pairs)
    print(f"float16: max |dlogit| {diff:.3g} (max |logit| {max_logit:.3g})")
    assert diff <= 2e-2 * max_logit
    assert res.verification is not None and res.verification["passed"] is True
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["dtype"] == "float16"


def test_failed_verification_writes_nothing(llama: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph whose logits are off (one weight scaled by 1.01 as it is written) is refused and OUT never appears."""
    from lorasave.formats.onnx.output import OnnxOutput

    real = OnnxOutput.write_rows

    def perturbed(self: OnnxOutput, entry: str, start: int, data: np.ndarray) -> None:
        real(self, entry, start, data * np.float32(1.01) if entry.endswith("layers.0.self_attn.v_proj.weight") else data)

    monkeypatch.setattr(OnnxOutput, "write_rows", perturbed)
    base, adapter, _ = llama
    with pytest.raises(OnnxVerificationError) as info:
        export_onnx(base, adapter, tmp_path / "bad", verify=True)
    assert info.value.verification["passed"] is False
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.*"))


def test_bad_options_and_existing_output(llama: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, adapter, _ = llama
    for kwargs in ({"dtype": "bfloat16"}, {"quantize": "int2"}, {"quantize": "int4", "block_size": 48}, {"opset": 18}):
        with pytest.raises(InvalidOptionError):
            export_onnx(base, adapter, tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        export_onnx(base, adapter, tmp_path / "taken")
    with pytest.raises(OutputExistsError):
        export_onnx(base, adapter, tmp_path / "taken", overwrite=True)  # not a lorasave output
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_other_architectures_use_torch_export(tmp_path: Path) -> None:
    """Gemma 2 is outside the builder's families: the torch.onnx.export fallback takes it, and refuses its
    sliding-window cache; MatMulNBits is refused for it up front."""
    torch.manual_seed(3)
    cfg = Gemma2Config(**{**CONFIG, "head_dim": HEAD_DIM, "sliding_window": 4})
    base = M.save_model(Gemma2ForCausalLM(cfg).eval(), tmp_path / "gemma2")
    with pytest.raises(InvalidOptionError, match="graph builder"):
        export_onnx(base, None, tmp_path / "out", quantize="int4")
    pytest.importorskip("onnxscript")
    with pytest.raises(UnsupportedModelError, match="cache"):
        export_onnx(base, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_onnxruntime_names_the_extra(llama: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    base, adapter, _ = llama
    with pytest.raises(UnsupportedModelError, match=r"pip install 'lorasave\[onnx\]'"):
        export_onnx(base, adapter, tmp_path / "out")
