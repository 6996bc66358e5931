"""QLoRA: merging into a bitsandbytes-quantized base, into the dequantized view of a plain base,
and saving the merge as a 4-bit checkpoint.

Fixtures: a tiny fp32 Llama; copies of it quantized and saved by transformers + bitsandbytes
(NF4/FP4 with and without double quant, LLM.int8, and the usual bf16 QLoRA recipe); a LoRA
trained a few Adam steps with PEFT on each quantized model. References come from bitsandbytes
(dequantize / quantize), transformers (loading and saving 4-bit models) and PEFT (the unmerged
model and its scalings), never from lorasave's own output, except where a test says so: the
merged_4bit test quantizes lorasave's own fp32 merge with transformers, because what it checks is
the quantization and serialization step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

import _models as M
import _qlora as Q

bnb = pytest.importorskip("bitsandbytes")

BF16 = torch.bfloat16
F32 = torch.float32
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FOUR_BIT = ("nf4_dq", "nf4", "fp4_dq", "fp4")


# ------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Built:
    name: str
    variant: Q.Variant
    qdir: Path  # the quantized checkpoint transformers saved
    adapter: Path  # the LoRA trained with PEFT on that quantized model
    scalings: dict[str, float]  # module -> PEFT's layer.scaling["default"]


@pytest.fixture(scope="session")
def q_fp32_base(zoo: Path) -> Path:
    path = zoo / "q_fp32_base"
    Q.build_llama(0).save_pretrained(path)
    assert M.read_json(path / "config.json")["dtype"] == "float32"
    return path


@pytest.fixture(scope="session")
def qbuilt(zoo: Path, q_fp32_base: Path) -> Callable[[str], Built]:
    """``Q.VARIANTS[name]`` quantized by transformers, saved, and a LoRA trained on it (once per session)."""
    cache: dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in cache:
            v = Q.VARIANTS[name]
            qdir = zoo / f"q_{name}"
            model = Q.load_quantized(q_fp32_base, v.bnb_config(), v.load_dtype)
            kind = bnb.nn.Linear4bit if v.bits == 4 else bnb.nn.Linear8bitLt
            assert isinstance(model.model.layers[0].mlp.down_proj, kind)
            model.save_pretrained(qdir)
            assert "quantization_config" in M.read_json(qdir / "config.json")
            targets: list[str] | str = v.targets if isinstance(v.targets, str) else list(v.targets)
            cfg = LoraConfig(r=8, lora_alpha=v.lora_alpha, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
            peft_model = M.train_lora(model, cfg, seed=v.seed, steps=5)
            adapter = zoo / f"q_{name}_lora"
            peft_model.save_pretrained(adapter)
            scalings = M.lora_modules(peft_model)
            assert set(scalings.values()) == {v.lora_alpha / 8}
            cache[name] = Built(name, v, qdir, adapter, scalings)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def qmerge(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``lorasave.merge(base, adapter, out, **kw)``, run once per distinct call in the session."""
    cache: dict[tuple[str, str, tuple[tuple[str, str], ...]], Path] = {}

    def run(base: Path, adapter: Path, **kw: Any) -> Path:
        key = (str(base), str(adapter), tuple(sorted((k, str(v)) for k, v in kw.items())))
        if key not in cache:
            import lorasave

            out = tmp_path_factory.mktemp("qmerged") / "out"
            res = lorasave.merge(base, adapter, out, **kw)
            assert Path(res.output).resolve() == out.resolve()
            assert "model.safetensors" in res.files or "model.safetensors.index.json" in res.files
            cache[key] = out
        return cache[key]

    return run


def _lora(built: Built) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    lora = M.adapter_weights(built.adapter)
    assert set(lora) == set(built.scalings)
    return lora


def _linear_weights(n_layers: int = 2) -> set[str]:
    return {
        f"model.layers.{i}.{part}.{name}.weight"
        for i in range(n_layers)
        for part, names in (("self_attn", Q.LINEAR_NAMES[:4]), ("mlp", Q.LINEAR_NAMES[4:]))
        for name in names
    }


def _mismatches(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> list[str]:
    assert set(got) == set(want), f"extra {sorted(set(got) - set(want))}, missing {sorted(set(want) - set(got))}"
    bad = []
    for key, w in want.items():
        g = got[key]
        if g.dtype != w.dtype or g.shape != w.shape:
            bad.append(f"{key}: {g.dtype}{tuple(g.shape)} != {w.dtype}{tuple(w.shape)}")
        elif not torch.equal(g, w):
            bad.append(f"{key}: max |diff| {(g.float() - w.float()).abs().max().item():.3g}")
    return bad


def _assert_close_logits(got: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    diff = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert diff <= rel * scale, f"max |logit diff| {diff:.3g} > {rel:g} * {scale:.3g}"


# ------------------------------------------------- a. merge into a quantized base


@pytest.mark.parametrize("name", list(Q.VARIANTS))
def test_quantized_base_bit_exact(name: str, qbuilt: Callable[[str], Built], qmerge: Callable[..., Path], q_fp32_base: Path) -> None:
    """Default merge of a bnb checkpoint: W' = dequant_fp32(W0) + s·(B @ A), rounded once to bf16."""
    b = qbuilt(name)
    out = qmerge(b.qdir, b.adapter)

    cfg = M.read_json(out / "config.json")
    assert "quantization_config" not in cfg
    assert cfg.get("dtype") == "bfloat16", "'auto' for a quantized base means bfloat16"

    src = M.read_tensors(b.qdir)
    quantized = Q.quantized_weights(src)
    assert set(quantized) == _linear_weights()
    assert set(quantized.values()) == {f"{b.variant.bits}bit"}
    lora = _lora(b)

    want: dict[str, torch.Tensor] = {}
    n_targeted = n_quantized_only = 0
    for key, t in src.items():
        if Q.is_aux_key(key):
            continue
        module = key.removesuffix(".weight")
        if key in quantized:
            w0 = Q.dequant_fp32(src, key)
            if module in lora:
                want[key] = M.expected_merge(w0, *lora[module], b.scalings[module], BF16)
                n_targeted += 1
            else:
                want[key] = w0.to(BF16)
                n_quantized_only += 1
        else:
            assert module not in lora, f"{module} is targeted but not quantized"
            want[key] = t.to(BF16)
    assert n_targeted == len(lora)
    assert n_quantized_only == (0 if b.variant.targets == "all-linear" else 6)
    # the output has exactly the names of the unquantized model: every aux quant key is gone
    assert set(want) == set(M.read_tensors(q_fp32_base))

    bad = _mismatches(M.read_tensors(out), want)
    assert not bad, f"{len(bad)} tensor(s) differ: {bad[:5]}"


@pytest.mark.parametrize("name", FOUR_BIT)
def test_quantized_base_fp32_logits_match_peft(name: str, qbuilt: Callable[[str], Built], qmerge: Callable[..., Path]) -> None:
    """dtype=float32: the merged model computes what the PeftModel on the 4-bit base computes."""
    b = qbuilt(name)
    out = qmerge(b.qdir, b.adapter, dtype="float32")
    assert M.read_json(out / "config.json").get("dtype") == "float32"
    assert {t.dtype for t in M.read_tensors(out).values()} == {F32}

    qmodel = Q.load_prequantized(b.qdir)
    layer = qmodel.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.compute_dtype == F32
    without = M.logits_of(qmodel)
    ref = M.logits_of(PeftModel.from_pretrained(qmodel, b.adapter))
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=F32)
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in merged.modules())
    got = M.logits_of(merged)
    _assert_close_logits(got, ref, 1e-4)
    # the test could tell a merge that dropped the adapter
    assert (ref - without).abs().max() > 100 * 1e-4 * ref.abs().max()


# --------------------------------------------- c. merge into the dequantized base


DEQUANT_CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    # id: (variant whose adapter is merged, lorasave kwargs, the round trip they mean)
    "defaults_to_fp32": ("nf4_dq", {"dtype": "float32"}, {"quant_type": "nf4", "blocksize": 64, "double_quant": True, "input_dtype": BF16}),
    "fp32_input_to_bf16": (
        "nf4_dq",
        {"quant_input_dtype": "float32", "dtype": "bfloat16"},
        {"quant_type": "nf4", "blocksize": 64, "double_quant": True, "input_dtype": F32},
    ),
    "fp4_128_no_dq_fp16_input": (
        "fp4",
        {"quant_type": "fp4", "blocksize": 128, "double_quant": False, "quant_input_dtype": "float16", "dtype": "float32"},
        {"quant_type": "fp4", "blocksize": 128, "double_quant": False, "input_dtype": torch.float16},
    ),
}


def _dequantized_reference(base: dict[str, torch.Tensor], built: Built, out_dtype: torch.dtype, **roundtrip: Any) -> dict[str, torch.Tensor]:
    lora = _lora(built)
    want: dict[str, torch.Tensor] = {}
    for key, w0 in base.items():
        module = key.removesuffix(".weight")
        if module in lora:
            want[key] = M.expected_merge(Q.roundtrip_fp32(w0, **roundtrip), *lora[module], built.scalings[module], out_dtype)
        else:
            want[key] = w0.to(out_dtype)
    return want


@pytest.mark.parametrize("case", list(DEQUANT_CASES))
def test_merge_into_dequantized_bit_exact(case: str, qbuilt: Callable[[str], Built], qmerge: Callable[..., Path], q_fp32_base: Path) -> None:
    """merge_into="dequantized": each targeted W0 goes through the bnb 4-bit round trip first."""
    name, kw, roundtrip = DEQUANT_CASES[case]
    b = qbuilt(name)
    out = qmerge(q_fp32_base, b.adapter, merge_into="dequantized", **kw)
    assert "quantization_config" not in M.read_json(out / "config.json")
    want = _dequantized_reference(M.read_tensors(q_fp32_base), b, DTYPES[kw["dtype"]], **roundtrip)
    bad = _mismatches(M.read_tensors(out), want)
    assert not bad, f"{len(bad)} tensor(s) differ: {bad[:5]}"


@pytest.mark.parametrize("name", ["nf4_dq", "fp4", "nf4_dq_bf16"])
def test_quantization_from(name: str, qbuilt: Callable[[str], Built], qmerge: Callable[..., Path], q_fp32_base: Path) -> None:
    """quantization_from=DIR reads the round trip from DIR's quantization_config.

    What it should read, spelled out as flags: quant_type = bnb_4bit_quant_type, double_quant =
    bnb_4bit_use_double_quant, quant_input_dtype = bnb_4bit_compute_dtype (float32 for the fp32
    variants, bfloat16 for nf4_dq_bf16), blocksize = 64 (transformers always quantizes with 64;
    the quant states in DIR say so).
    """
    b = qbuilt(name)
    qc = Q.quant_config(b.qdir)
    src = M.read_tensors(b.qdir)
    blocksizes = {Q.quant_state_json(t)["blocksize"] for k, t in src.items() if Q.QUANT_STATE_PREFIX in k}
    assert blocksizes == {64}
    flags = {
        "quant_type": qc["bnb_4bit_quant_type"],
        "blocksize": 64,
        "double_quant": qc["bnb_4bit_use_double_quant"],
        "quant_input_dtype": qc["bnb_4bit_compute_dtype"],
    }
    assert (flags["quant_type"], flags["double_quant"]) == (b.variant.quant_type, b.variant.double_quant)
    assert DTYPES[flags["quant_input_dtype"]] == b.variant.compute_dtype == b.variant.load_dtype

    from_dir = qmerge(q_fp32_base, b.adapter, merge_into="dequantized", quantization_from=b.qdir, dtype="float32")
    with_flags = qmerge(q_fp32_base, b.adapter, merge_into="dequantized", dtype="float32", **flags)
    got = M.read_tensors(from_dir)
    assert not _mismatches(got, M.read_tensors(with_flags))

    roundtrip = {"quant_type": flags["quant_type"], "blocksize": 64, "double_quant": flags["double_quant"], "input_dtype": DTYPES[flags["quant_input_dtype"]]}
    base = M.read_tensors(q_fp32_base)
    # the round trip reproduces the very W0 the adapter was trained on (what transformers saved)
    for key in Q.quantized_weights(src):
        assert torch.equal(Q.roundtrip_fp32(base[key], **roundtrip), Q.dequant_fp32(src, key)), key
    bad = _mismatches(got, _dequantized_reference(base, b, F32, **roundtrip))
    assert not bad, f"{len(bad)} tensor(s) differ: {bad[:5]}"


def _qlora_reference_model(fp32_base: Path) -> torch.nn.Module:
    """The bf16 QLoRA base as transformers + bnb build it (bf16 weights quantized to NF4 with
    double quant), with float32 compute, dequantization to float32 and the unquantized tensors
    (embeddings, norms, lm_head) restored to the fp32 base's values."""
    model = Q.load_quantized(fp32_base, Q.bnb_4bit("nf4", True, F32), dtype=BF16)
    fp32 = M.read_tensors(fp32_base)
    n_restored = n_linear = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            assert module.weight.quant_state.dtype == BF16
            module.weight.quant_state.dtype = F32
            module.compute_dtype = F32
            n_linear += 1
    for name, p in model.named_parameters():
        if p.dtype.is_floating_point:
            p.data = fp32[name].clone()
            n_restored += 1
    for buf in model.buffers():
        if buf.dtype.is_floating_point:
            buf.data = buf.data.float()
    assert n_linear == 14 and n_restored == 1 + 2 * 2 + 1 + 1  # embed, 2 norms a layer, final norm, lm_head
    return model


def test_merge_into_dequantized_logits_match_qlora(qbuilt: Callable[[str], Built], qmerge: Callable[..., Path], q_fp32_base: Path) -> None:
    """The bf16 QLoRA recipe: merging into the plain fp32 base with merge_into="dequantized"
    gives the model the adapter was trained with (the PeftModel on the 4-bit base)."""
    b = qbuilt("nf4_dq_bf16")  # all-linear adapter: every quantized layer is targeted
    out = qmerge(q_fp32_base, b.adapter, merge_into="dequantized", dtype="float32")
    got = M.logits_of(AutoModelForCausalLM.from_pretrained(out, dtype=F32))
    ref = M.logits_of(PeftModel.from_pretrained(_qlora_reference_model(q_fp32_base), b.adapter))
    _assert_close_logits(got, ref, 1e-4)
    # ... and the test tells it from the plain merge into the unquantized weights
    plain = M.logits_of(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(q_fp32_base, dtype=F32), b.adapter))
    assert (plain - ref).abs().max() > 100 * 1e-4 * ref.abs().max()


# ------------------------------------------------------------- d. merged 4-bit


@pytest.mark.parametrize(("name", "double_quant"), [("nf4_dq", None), ("fp4_dq", None), ("fp4", False)])
def test_merged_4bit_equals_transformers(
    name: str, double_quant: bool | None, qbuilt: Callable[[str], Built], qmerge: Callable[..., Path], tmp_path: Path
) -> None:
    """save_method="merged_4bit" writes what transformers writes for the fp32 merge loaded in 4-bit."""
    b = qbuilt(name)
    quant_type = b.variant.quant_type
    dq = {} if double_quant is None else {"double_quant": double_quant}
    use_dq = True if double_quant is None else double_quant  # the default is double quant

    out16 = qmerge(b.qdir, b.adapter, dtype="float32")
    out4 = qmerge(b.qdir, b.adapter, dtype="float32", save_method="merged_4bit", quant_type=quant_type, **dq)

    ref_dir = tmp_path / "ref4"
    Q.load_quantized(out16, Q.bnb_4bit(quant_type, use_dq, F32)).save_pretrained(ref_dir)

    want = M.read_tensors(ref_dir)
    got = M.read_tensors(out4)
    assert sorted(got) == sorted(want)
    bad = []
    for key, w in want.items():
        g = got[key]
        if Q.QUANT_STATE_PREFIX in key:
            if Q.quant_state_json(g) != Q.quant_state_json(w):
                bad.append(f"{key}: {Q.quant_state_json(g)} != {Q.quant_state_json(w)}")
        elif g.dtype != w.dtype or g.shape != w.shape or not torch.equal(g, w):
            bad.append(f"{key}: {g.dtype}{tuple(g.shape)} vs {w.dtype}{tuple(w.shape)}")
    assert not bad, f"{len(bad)} tensor(s) differ: {bad[:5]}"
    assert any(k.endswith(".nested_absmax") for k in got) == use_dq

    qc, ref_qc = Q.quant_config(out4), Q.quant_config(ref_dir)
    for field in ("quant_method", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_quant_storage"):
        assert qc.get(field) == ref_qc.get(field), field

    model = Q.load_prequantized(out4)
    linears = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in Q.LINEAR_NAMES]
    assert len(linears) == 14 and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    assert all(m.weight.quant_state.quant_type == quant_type for m in linears)
    got_logits = M.logits_of(model)
    ref_logits = M.logits_of(Q.load_prequantized(ref_dir))
    _assert_close_logits(got_logits, ref_logits, 1e-6)


# --------------------------------------------------------------------- CLI


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "lorasave", *(str(a) for a in args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, check=False)


def test_cli_quant_options_match_api(qbuilt: Callable[[str], Built], qmerge: Callable[..., Path], q_fp32_base: Path, tmp_path: Path) -> None:
    b = qbuilt("fp4")
    _name, kw, _ = DEQUANT_CASES["fp4_128_no_dq_fp16_input"]
    api = qmerge(q_fp32_base, b.adapter, merge_into="dequantized", **kw)
    out = tmp_path / "out"
    proc = _run(
        "merge", q_fp32_base, b.adapter, "-o", out,
        "--merge-into", "dequantized", "--quant-type", "fp4", "--blocksize", "128", "--no-double-quant",
        "--quant-input-dtype", "float16", "--dtype", "float32", "--save-method", "merged_16bit",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not _mismatches(M.read_tensors(out), M.read_tensors(api))


# ---------------------------------------------------------- e. other formats


FOREIGN: dict[str, dict[str, Any]] = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
    "fp8": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    "compressed-tensors": {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {}},
    "hqq": {"quant_method": "hqq", "quant_config": {"weight_quant_params": {"nbits": 4, "group_size": 64}}},
}


@pytest.fixture(scope="session")
def foreign_base(zoo: Path, q_fp32_base: Path) -> Callable[[str], Path]:
    """The fp32 base whose config.json claims another quantization format."""

    def get(fmt: str) -> Path:
        path = zoo / f"q_foreign_{fmt}"
        if not path.exists():
            shutil.copytree(q_fp32_base, path)
            cfg = M.read_json(path / "config.json")
            cfg["quantization_config"] = FOREIGN[fmt]
            (path / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        return path

    return get


def _names_format(message: str, fmt: str) -> bool:
    low = message.lower()
    return fmt in low or fmt.replace("-", "_") in low or fmt.replace("-", " ") in low


@pytest.mark.parametrize("fmt", list(FOREIGN))
def test_other_quantization_formats_refused(fmt: str, foreign_base: Callable[[str], Path], qbuilt: Callable[[str], Built], tmp_path: Path) -> None:
    import lorasave
    from lorasave.errors import LorasaveError

    out = tmp_path / "out"
    with pytest.raises(LorasaveError) as info:
        lorasave.merge(foreign_base(fmt), qbuilt("nf4_dq").adapter, out)
    assert _names_format(str(info.value), fmt), str(info.value)
    assert not out.exists()


def test_cli_other_format_one_line(foreign_base: Callable[[str], Path], qbuilt: Callable[[str], Built], tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _run("merge", foreign_base("gptq"), qbuilt("nf4_dq").adapter, "-o", out)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and _names_format(lines[0], "gptq"), lines[0]
    assert not out.exists()


def test_bad_quant_type_refused(qbuilt: Callable[[str], Built], q_fp32_base: Path, tmp_path: Path) -> None:
    import lorasave
    from lorasave.errors import LorasaveError

    out = tmp_path / "out"
    with pytest.raises(LorasaveError):
        lorasave.merge(q_fp32_base, qbuilt("nf4_dq").adapter, out, merge_into="dequantized", quant_type="int3")
    assert not out.exists()
