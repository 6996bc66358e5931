"""ONNX LoRA adapters (multi-LoRA): a base exported with ``lora_inputs`` takes the LoRA weights as graph
inputs (Olive's names), ``export_onnx_adapter`` writes each PEFT adapter as an ``.onnx_adapter`` file, and
onnxruntime / onnxruntime-genai apply them at run time.

Tiny Llama (grouped-query attention), Phi-3 (fused qkv_proj / gate_up_proj) and Gemma 3 text (sliding
window 4, shorter than the prompts) with LoRAs trained a few steps by PEFT. References are transformers'
unmerged PeftModel (and the base with its adapter disabled), fed by hand here: onnxruntime's logits
with the adapter's tensors fed as inputs, onnxruntime-genai's greedy generation with ``og.Adapters``,
and two adapters (different ranks, rsLoRA, a rank pattern, other targets) switched on one base.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

import _models as M

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from lorasave.errors import AdapterMismatchError, InvalidOptionError, UnsupportedAdapterError  # noqa: E402
from lorasave.formats.onnx.adapter import export_onnx_adapter  # noqa: E402
from lorasave.formats.onnx.export import export_onnx  # noqa: E402
from lorasave.formats.onnx.lora import adapter_run_options  # noqa: E402

N_LAYERS, N_HEADS, N_KV_HEADS, HIDDEN = 2, 4, 2, 64
HEAD_DIM = HIDDEN // N_HEADS
FP32_TOLERANCE = 1e-4  # max |onnxruntime - PeftModel| / max |logit|
EOS = 2
ARCHS = ["llama", "phi3", "gemma3"]
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
#: The second adapter: other rank and alpha, rsLoRA, a rank pattern, and fewer targets.
SECOND = LoraConfig(
    r=4,
    lora_alpha=12,
    use_rslora=True,
    rank_pattern={"down_proj": 2},
    target_modules=["q_proj", "v_proj", "down_proj"],
    lora_dropout=0.0,
    task_type="CAUSAL_LM",
)


@dataclass
class Case:
    """A base, its adapters, the ONNX base with LoRA inputs on every Linear, and each adapter's ``.onnx_adapter``."""

    name: str
    base: Path
    onnx_base: Path
    adapters: dict[str, Path] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(20 + ARCHS.index(name))
    if name == "llama":
        return LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    if name == "phi3":
        return Phi3ForCausalLM(Phi3Config(**CONFIG)).eval()
    layer_types = ["sliding_attention", "full_attention"]
    cfg = Gemma3TextConfig(**{**CONFIG, "initializer_range": 0.02}, head_dim=HEAD_DIM, sliding_window=4, layer_types=layer_types, query_pre_attn_scalar=24)
    return Gemma3ForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Session memo: ``{"zoo": folder, name: Case}``, each case built on first use."""
    return {"zoo": tmp_path_factory.mktemp("onnx_lora")}


def _case(cache: dict[str, Any], name: str) -> Case:
    if name not in cache:
        zoo: Path = cache["zoo"]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            base = M.save_model(_build(name), zoo / f"{name}_base")
            seed = 20 + ARCHS.index(name)
            first = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
            case = Case(name, base, export_onnx(base, None, zoo / f"{name}_onnx", lora_inputs="all-linear").output)
            case.adapters["first"] = M.make_adapter(base, zoo / f"{name}_first", first, seed=seed)
            if name == "llama":
                case.adapters["second"] = M.make_adapter(base, zoo / f"{name}_second", SECOND, seed=seed + 1)
            for label, adapter in case.adapters.items():
                case.files[label] = export_onnx_adapter(case.onnx_base, adapter, zoo / f"{name}_{label}_onnx_adapter").adapter_file
        finally:
            torch.set_num_threads(threads)
        cache[name] = case
    case: Case = cache[name]
    return case


@pytest.fixture(scope="session", params=ARCHS)
def case(request: pytest.FixtureRequest, cases: dict[str, Any]) -> Case:
    return _case(cases, request.param)


@pytest.fixture(scope="session")
def llama(cases: dict[str, Any]) -> Case:
    return _case(cases, "llama")


# ------------------------------------------------------------------------------- references


def _peft(case: Case, *labels: str) -> Any:
    """The base under PEFT with the adapters ``labels`` loaded (the first active), float32."""
    model = AutoModelForCausalLM.from_pretrained(case.base, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(model, case.adapters[labels[0]], adapter_name=labels[0])
    for label in labels[1:]:
        peft.load_adapter(case.adapters[label], adapter_name=label)
    return peft.eval()


@torch.no_grad()
def _ref_logits(model: Any, tokens: list[int]) -> np.ndarray:
    return model(input_ids=torch.tensor([tokens])).logits[0].float().numpy()


@torch.no_grad()
def _ref_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation up to ``n`` tokens, stopping at EOS (2) as onnxruntime-genai does; EOS itself left out."""
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=EOS)
    return _until_eos([int(t) for t in out[0, len(prompt) :]])


def _until_eos(tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(EOS)] if EOS in tokens else tokens


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, M.VOCAB, (n,), generator=gen).tolist() for n in (9, 5)]


def _session(folder: Path) -> Any:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # one warning per LoRA input with a default initializer otherwise
    return ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])


def _parameters(path: Path) -> dict[str, np.ndarray]:
    """The ``.onnx_adapter``'s tensors, read with onnxruntime's own reader."""
    return {k: np.array(v.numpy()) for k, v in ort.AdapterFormat.read_adapter(str(path)).get_parameters().items()}


def _step(sess: Any, ids: np.ndarray, mask: np.ndarray, past: dict[str, np.ndarray] | None, lora: dict[str, np.ndarray], options: Any = None) -> tuple:
    """One step fed by hand (position ids as optimum computes them, LoRA tensors as inputs); logits and the next past."""
    pos = np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)[:, -ids.shape[1] :]
    feed = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64), "position_ids": pos.astype(np.int64), **lora}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feed[i.name] = past[i.name] if past is not None else np.zeros((ids.shape[0], N_KV_HEADS, 0, HEAD_DIM), np.float32)
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(names, feed, options), strict=True))
    return outs["logits"], {n.replace("present.", "past_key_values."): v for n, v in outs.items() if n.startswith("present.")}


def _steps(sess: Any, model: Any, lora: dict[str, np.ndarray], options: Any = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(step, onnxruntime, PeftModel) logits: prefill, a decode step with the cache, a left-padded batch of two."""
    rows = _prompts()
    ref = _ref_logits(model, rows[0])
    got, past = _step(sess, np.array([rows[0]]), np.ones((1, 9)), None, lora, options)
    pairs = [("prefill", got[0], ref)]
    nxt = int(ref[-1].argmax())
    got, _ = _step(sess, np.array([[nxt]]), np.ones((1, 10)), past, lora, options)
    pairs.append(("decode", got[0], _ref_logits(model, [*rows[0], nxt])[-1:]))
    ids, mask = np.zeros((2, 9), np.int64), np.zeros((2, 9), np.int64)
    for i, r in enumerate(rows):
        ids[i, 9 - len(r) :], mask[i, 9 - len(r) :] = r, 1
    got, _ = _step(sess, ids, mask, None, lora, options)
    pairs += [(f"batch row {i}", got[i, 9 - len(r) :], _ref_logits(model, r)) for i, r in enumerate(rows)]
    return pairs


def _genai_greedy(model: Any, prompt: list[int], n: int, adapters: Any = None, active: str | None = None) -> list[int]:
    og = pytest.importorskip("onnxruntime_genai")
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, do_sample=False)
    generator = og.Generator(model, params)
    if active is not None:
        generator.set_active_adapter(adapters, active)
    generator.append_tokens(np.asarray(prompt, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return _until_eos([int(t) for t in generator.get_sequence(0)][len(prompt) :])


# ------------------------------------------------------------------------------------ the tests


def test_adapter_as_inputs_matches_peft_model(case: Case) -> None:
    """onnxruntime with the ``.onnx_adapter``'s tensors fed as graph inputs equals the unmerged PeftModel (prefill,
    decode with the cache, left-padded batch); onnxruntime's own ``LoraAdapter`` gives the same logits; with no
    LoRA input fed (zero-rank defaults) the graph is the base."""
    sess = _session(case.onnx_base)
    lora = _parameters(case.files["first"])
    overridable = {i.name for i in sess.get_overridable_initializers()}
    assert set(lora) <= overridable and len(lora) == len(overridable)  # every Linear of the base, all-linear
    peft = _peft(case, "first")
    pairs = _steps(sess, peft, lora)
    scale = max(float(np.abs(w).max()) for _, _, w in pairs)
    for step, got, want in pairs:
        diff = float(np.abs(got - want).max())
        print(f"{case.name} {step}: onnxruntime + .onnx_adapter vs PeftModel max |dlogit| {diff:.3g} (max |logit| {scale:.3g})")
        assert diff <= FP32_TOLERANCE * scale, f"{step}: {diff}"
    options, adapter = adapter_run_options(case.files["first"])
    for (_, got, _), (_, again, _) in zip(pairs, _steps(sess, peft, {}, options), strict=True):
        np.testing.assert_allclose(again, got, rtol=0, atol=1e-6 * scale)
    del adapter
    with peft.disable_adapter():
        base_pairs = _steps(sess, peft, {})
    effect = max(float(np.abs(w - p[2]).max()) for p, (_, _, w) in zip(pairs, base_pairs, strict=True))
    assert effect > 100 * FP32_TOLERANCE * scale, "the adapter barely changes the logits; the comparison would say little"
    for step, got, want in base_pairs:
        assert float(np.abs(got - want).max()) <= FP32_TOLERANCE * scale, f"base alone, {step}"


def test_onnxruntime_genai_adapter_greedy_equals_peft(case: Case) -> None:
    """onnxruntime-genai loads the ``.onnx_adapter`` (``og.Adapters``) on the ONNX base and generates greedily
    exactly as transformers' PeftModel; 14 new tokens pass Gemma 3's window of 4."""
    og = pytest.importorskip("onnxruntime_genai")
    prompt = _prompts()[0]
    want = _ref_greedy(_peft(case, "first"), prompt, 14)
    model = og.Model(str(case.onnx_base))
    adapters = og.Adapters(model)
    adapters.load(str(case.files["first"]), "first")
    got = _genai_greedy(model, prompt, 14, adapters, "first")
    print(f"{case.name}: PeftModel {want} / onnxruntime-genai + .onnx_adapter {got}")
    assert got == want and len(want) >= 5


def test_two_adapters_switch_on_one_base(llama: Case) -> None:
    """One og.Model, two adapters loaded (rank 8 all-linear; rank 4/2 rsLoRA on q/v/down): generators switch
    between them and the bare base, interleaved, each equal to its PeftModel's greedy continuation; onnxruntime's
    RunOptions switch per run likewise."""
    og = pytest.importorskip("onnxruntime_genai")
    prompt = _prompts()[0]
    peft = _peft(llama, "first", "second")
    want = {}
    for label in ("first", "second"):
        peft.set_adapter(label)
        want[label] = _ref_greedy(peft, prompt, 12)
    with peft.disable_adapter():
        want[None] = _ref_greedy(peft, prompt, 12)
    assert len({tuple(v) for v in want.values()}) == 3, "the adapters do not change the greedy continuation; the test would say little"
    model = og.Model(str(llama.onnx_base))
    adapters = og.Adapters(model)
    for label in ("first", "second"):
        adapters.load(str(llama.files[label]), label)
    for label in ("first", "second", None, "second", "first"):
        got = _genai_greedy(model, prompt, 12, adapters, label)
        print(f"adapter {label}: PeftModel {want[label]} / onnxruntime-genai {got}")
        assert got == want[label], label
    sess = _session(llama.onnx_base)
    ids = np.array([prompt])
    for label in ("second", "first"):
        options, adapter = adapter_run_options(llama.files[label])
        peft.set_adapter(label)
        got, _ = _step(sess, ids, np.ones_like(ids), None, {}, options)
        ref = _ref_logits(peft, prompt)
        assert float(np.abs(got[0] - ref).max()) <= FP32_TOLERANCE * float(np.abs(ref).max()), label
        del adapter
    assert _parameters(llama.files["second"])["model.layers.0.mlp.down_proj.lora_A.weight"].shape == (2 * HIDDEN, 2)  # rank_pattern


def test_cli_manifest_and_verify(llama: Case, tmp_path: Path) -> None:
    """The commands as a user types them: a float16 base with LoRA inputs on some projections, the second adapter
    for it (float16 from the graph), `verify` at the tensors and logits levels; BASE given as the Hugging Face base
    writes the same parameters, and verify then exports a base to run it."""
    from click.testing import CliRunner

    from lorasave.cli.main import main
    from lorasave.verify.run import verify

    runner = CliRunner()
    base16 = tmp_path / "base16"
    args = ["onnx", str(llama.base), "--lora-inputs", "q_proj,v_proj", "--lora-inputs", "down_proj", "--dtype", "float16", "-o", str(base16), "-q"]
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    doc = json.loads((base16 / "lorasave.json").read_text())
    assert doc["settings"]["lora_inputs"] == ["q_proj", "v_proj", "down_proj"] and doc["result"]["lora_inputs"]["modules"] == 3 * N_LAYERS
    out = tmp_path / "second16"
    r = runner.invoke(main, ["onnx-adapter", str(base16), str(llama.adapters["second"]), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout[r.stdout.index("{") :])
    assert result["dtype"] == "float16" and result["n_modules"] == 3 * N_LAYERS and result["ranks"] == [2, 4]
    doc = json.loads((out / "lorasave.json").read_text())
    assert doc["command"] == "onnx-adapter" and set(doc["files"]) == {"second16.onnx_adapter", "README.md"}
    assert doc["sources"]["onnx_base"]["path"] == str(base16.resolve())
    assert all(v.dtype == np.float16 for v in _parameters(out / "second16.onnx_adapter").values())
    for level in ("tensors", "logits"):
        rep = verify(out, level=level)
        print(f"verify {level} (float16): {rep.summary()}")
        assert rep.ok and rep.checked, rep.summary()
    assert rep.logits_runtime == "onnxruntime" and rep.logits_judged
    hf = export_onnx_adapter(llama.base, llama.adapters["first"], tmp_path / "from_hf", name="first")
    same = _parameters(hf.adapter_file)
    assert set(same) == set(_parameters(llama.files["first"])) and all(np.array_equal(v, _parameters(llama.files["first"])[k]) for k, v in same.items())
    rep = verify(hf.output, level="logits")  # no ONNX base recorded: verify exports one
    print(f"verify logits (Hugging Face BASE): {rep.summary()}")
    assert rep.ok and rep.checked and not list(tmp_path.glob(".from_hf.*"))


def test_verify_catches_a_wrong_scaling(llama: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An adapter written with B off by 1% (hashes recorded as written) fails the tensors level."""
    import lorasave.formats.onnx.adapter as onnx_adapter
    from lorasave.verify.run import verify

    real = onnx_adapter.pair_arrays
    monkeypatch.setattr(onnx_adapter, "pair_arrays", lambda *a: (real(*a)[0], real(*a)[1] * np.float32(1.01)))
    out = export_onnx_adapter(llama.onnx_base, llama.adapters["first"], tmp_path / "bad").output
    rep = verify(out, level="tensors")
    assert not rep.ok and rep.tensors_failed == 2 * len(rep.failures) > 0, rep.summary()


def test_refusals(llama: Case, tmp_path: Path) -> None:
    """One line each: a module without LoRA inputs in the ONNX base, a projection the graph lacks, a dtype other
    than the graph's, modules_to_save, several adapters; nothing is written."""
    small = export_onnx(llama.base, None, tmp_path / "qv", lora_inputs=["q_proj", "v_proj"]).output
    with pytest.raises(UnsupportedAdapterError, match=r"has no LoRA inputs.*--lora-inputs including"):
        export_onnx_adapter(small, llama.adapters["second"], tmp_path / "x")  # down_proj
    with pytest.raises(InvalidOptionError, match="lm_head"):
        export_onnx(llama.base, None, tmp_path / "x", lora_inputs="q_proj,lm_head")
    with pytest.raises(InvalidOptionError, match="float32"):
        export_onnx_adapter(llama.onnx_base, llama.adapters["first"], tmp_path / "x", dtype="float16")
    saved = tmp_path / "saved"
    shutil.copytree(llama.adapters["first"], saved)
    cfg = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**cfg, "modules_to_save": ["lm_head"]}))
    with pytest.raises(UnsupportedAdapterError, match=r"modules_to_save.*lorasave onnx BASE ADAPTER"):
        export_onnx_adapter(llama.onnx_base, saved, tmp_path / "x")
    with pytest.raises(UnsupportedAdapterError, match="holds one adapter"):
        export_onnx_adapter(llama.onnx_base, [llama.adapters["first"], llama.adapters["second"]], tmp_path / "x")
    phi = tmp_path / "phi3"
    M.save_model(_build("phi3"), phi)
    with pytest.raises((AdapterMismatchError, UnsupportedAdapterError)):
        export_onnx_adapter(phi, llama.adapters["first"], tmp_path / "x")  # a Llama adapter on a Phi-3 base
    assert not (tmp_path / "x").exists()


def test_int4_base_with_lora_inputs(llama: Case, tmp_path: Path) -> None:
    """An int4 MatMulNBits base keeps a float LoRA branch; the adapter on it is run and reported (top-1), not judged."""
    from lorasave.verify.run import verify

    q4 = export_onnx(llama.base, None, tmp_path / "q4", quantize="int4", lora_inputs=llama.adapters["second"]).output
    sess = _session(q4)
    assert {i.name for i in sess.get_overridable_initializers()} == set(_parameters(llama.files["second"]))  # the adapter's modules
    out = export_onnx_adapter(q4, llama.adapters["second"], tmp_path / "second_q4").output
    rep = verify(out, level="logits")
    print(f"int4 base + adapter: top-1 {rep.top1_agreement:.1%}, max |dlogit| {rep.logits_max_diff:.3g} (max |logit| {rep.logits_scale:.3g})")
    assert rep.ok and not rep.logits_judged and rep.top1_agreement >= 0.25
