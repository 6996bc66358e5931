"""Quantized bases read exactly (issue 16, point 3): FP8 checkpoints dequantized with their scales.

Fixtures are made here: a tiny Llama and a tiny Qwen3-MoE saved in bfloat16, their projections
quantized by transformers' own FP8 quantizer (``integrations.finegrained_fp8.Fp8Quantize``, the op
``save_pretrained`` runs for ``FineGrainedFP8Config``), with 128x128 blocks (DeepSeek-V3 / Qwen3-FP8
layout, ``weight_scale_inv``), one scale per tensor, or one per output channel; an adapter is trained
a few steps on the base as transformers loads it (base and adapter fitted on successor chains, so logits are
peaked; top-1 is margin-aware: positions whose top-2 margin exceeds 2% of max|logit|). The reference is never lorasave's arithmetic:
transformers loading the FP8 checkpoint on CPU (it dequantizes FP8 models there) in float32, PEFT on
it, ``merge_and_unload``.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import _models as M
import lorasave
from _parity import build_qwen3_moe
from lorasave.errors import LorasaveError, QuantizedBaseError

VOCAB = M.VOCAB
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def chain(seed: int, n: int = 16) -> torch.Tensor:
    """Sequences of a fixed random successor map over the vocabulary: learnable, so logits get peaked."""
    g = torch.Generator().manual_seed(seed)
    nxt = torch.randperm(VOCAB - 3, generator=g) + 3
    rows = [torch.randint(3, VOCAB, (8,), generator=g)]
    for _ in range(n - 1):
        rows.append(nxt[rows[-1] - 3])
    return torch.stack(rows, 1)


def fit(model: torch.nn.Module, ids: torch.Tensor, steps: int, lr: float = 1e-2) -> torch.nn.Module:
    """A few Adam steps on ``ids`` (every trainable parameter)."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def eval_ids() -> torch.Tensor:
    return torch.cat([chain(1)[:4], chain(2)[:4]])


def fp8_quantize(state: dict[str, torch.Tensor], block: tuple[int, int] | None, per_channel: bool = False) -> dict[str, torch.Tensor]:
    """Every ``*_proj.weight`` through transformers' ``Fp8Quantize`` (its own block / per-tensor / per-row scales)."""
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.endswith("_proj.weight"):
            bs = (1, v.shape[-1]) if per_channel else block
            q = Fp8Quantize(types.SimpleNamespace(quantization_config=types.SimpleNamespace(weight_block_size=bs, scale_fmt="float")))
            out.update(q._quantize_one(k, v))
        else:
            out[k] = v
    return out


def save_fp8(model: torch.nn.Module, folder: Path, block: tuple[int, int] | None, per_channel: bool = False) -> Path:
    """``model`` in bfloat16, its projections FP8 as transformers writes them, ``quantization_config`` fp8."""
    model.to(torch.bfloat16).save_pretrained(folder)
    state = fp8_quantize(load_file(folder / "model.safetensors"), block, per_channel)
    assert any(v.dtype == torch.float8_e4m3fn for v in state.values())
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(block) if block else None}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def load_reference(base: Path) -> torch.nn.Module:
    """transformers on CPU: the FP8 checkpoint dequantized (float32)."""
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def train_adapter(base: Path, dst: Path, config: LoraConfig, steps: int = 4) -> Path:
    """A LoRA trained a few Adam steps on the base as transformers loads it."""
    torch.manual_seed(3)
    peft = fit(get_peft_model(load_reference(base), config), torch.cat([chain(1), chain(2)]), steps, lr=2e-2)
    peft.save_pretrained(dst)
    return dst


def margin_top1(got: torch.Tensor, ref: torch.Tensor, tol: float) -> tuple[float, int]:
    """Top-1 agreement over the positions whose reference top-2 margin exceeds ``tol``."""
    top2 = ref.topk(2, dim=-1).values
    keep = (top2[..., 0] - top2[..., 1]) > tol
    return float((got.argmax(-1)[keep] == ref.argmax(-1)[keep]).float().mean()), int(keep.sum())


def build_llama128(seed: int = 11) -> LlamaForCausalLM:
    """hidden 128 (one 128x128 block per q/o, two per gate/up/down); k/v (64 rows) are left 16-bit by the quantizer."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**M._COMMON, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2})
    return LlamaForCausalLM(cfg).eval()


CASES: dict[str, dict[str, Any]] = {
    "llama-block": {"build": build_llama128, "block": (128, 128), "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")},
    "llama-tensor": {"build": build_llama128, "block": None, "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])},
    "qwen3moe-channel": {
        "build": build_qwen3_moe,
        "block": None,
        "per_channel": True,
        "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], target_parameters=EXPERTS),
    },
    "qwen3moe-block": {
        "build": build_qwen3_moe,
        "block": (32, 32),
        "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS),
    },
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Any:
    cache: dict[str, dict[str, Any]] = {}

    def get(name: str) -> dict[str, Any]:
        if name not in cache:
            case = CASES[name]
            root = tmp_path_factory.mktemp(name)
            base = save_fp8(fit(case["build"](), chain(1), 15), root / "base", case["block"], case.get("per_channel", False))
            lora = train_adapter(base, root / "lora", case["lora"]())
            ref = PeftModel.from_pretrained(load_reference(base), lora)
            ids = eval_ids()
            logits = M.logits_of(ref, ids)
            state = {k: v.detach().clone() for k, v in ref.merge_and_unload().state_dict().items()}
            cache[name] = {"root": root, "base": base, "lora": lora, "ids": ids, "logits": logits, "merged": state}
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_fp8_base_merged_exactly(name: str, built: Any) -> None:
    """float32 output bit-identical to transformers (dequantized) + PEFT ``merge_and_unload``; bf16 output its
    rounding, no scale tensor written, no quantization_config; logits follow; verify probes every tensor."""
    from lorasave.verify.run import verify

    c = built(name)
    out32 = c["root"] / "out-f32"
    lorasave.merge(c["base"], c["lora"], out32, dtype="float32")
    got = M.read_tensors(out32)
    reloaded = AutoModelForCausalLM.from_pretrained(out32, dtype=torch.float32)
    want = {k: v for k, v in reloaded.state_dict().items()}
    assert set(want) == set(c["merged"])
    for k, v in c["merged"].items():
        assert torch.equal(want[k], v), f"{k} differs from the reference merge"
    assert not any(k.endswith(("_scale_inv", "activation_scale")) for k in got)
    assert all(v.dtype == torch.float32 for v in got.values())
    assert "quantization_config" not in M.read_json(out32 / "config.json")

    out16 = c["root"] / "out-bf16"
    res = lorasave.merge(c["base"], c["lora"], out16)
    assert res.dtype == "bfloat16"
    model16 = AutoModelForCausalLM.from_pretrained(out16, dtype=torch.float32)
    for k, v in model16.state_dict().items():
        assert torch.equal(v, c["merged"][k].to(torch.bfloat16).float()), k
    logits = M.logits_of(model16, c["ids"])
    scale = float(c["logits"].abs().max())
    top1, n = margin_top1(logits, c["logits"], 0.02 * scale)
    diff = float((logits - c["logits"]).abs().max()) / scale
    print(f"{name}: bf16 merge of the FP8 base vs transformers+PEFT float32: max|diff| {diff:.4f} x max|logit|, top-1 {top1:.3f} over {n} tokens")
    assert n >= c["ids"].numel() // 2 and top1 >= 0.99
    for out in (out32, out16):
        rep = verify(out, level="tensors")
        assert rep.ok, rep.counts()
        assert all(".experts." in n for n in rep.not_probed), rep.not_probed  # target_parameters deltas: not checkable
        print(f"{name}: verify {out.name}: {rep.counts()}")


def test_ragged_blocks_follow_weight_block_size() -> None:
    """Partial edge blocks (DeepSeek-V3's 576-row ``kv_a_proj_with_mqa``): each scale covers its 128x128 block, the
    last ones cut short (DeepSeek's ``weight_dequant``), checked block by block here."""
    from lorasave.formats.fp8 import dequantize_fp8

    g = torch.Generator().manual_seed(0)
    q = (torch.randn(200, 300, generator=g) * 50).to(torch.float8_e4m3fn)
    s = torch.rand(2, 3, generator=g) + 0.01
    got = dequantize_fp8(q, s, (128, 128))
    for i in range(2):
        for j in range(3):
            blk = q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].float() * s[i, j]
            assert torch.equal(got[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128], blk)
    # an evenly tiled grid: transformers' own load-time dequantization, bit for bit
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    q2, s2 = q[:128, :256], s[:1, :2]
    assert torch.equal(dequantize_fp8(q2, s2, (128, 128)), Fp8Dequantize(None)._dequantize_one(q2, s2, torch.float32))
    ue = torch.tensor([[120, 130]], dtype=torch.uint8)  # ue8m0 exponents
    assert torch.equal(dequantize_fp8(q2, ue, (128, 128)), Fp8Dequantize(None)._dequantize_one(q2, ue, torch.float32))


def _break(c: dict[str, Any], dst: Path, edit: Any) -> Path:
    import shutil

    shutil.copytree(c["base"], dst)
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    ("what", "edit", "named"),
    [
        ("odd grid", lambda s: s.update({"model.layers.0.mlp.up_proj.weight_scale_inv": torch.ones(3, 1)}), "model.layers.0.mlp.up_proj.weight_scale_inv"),
        ("no scale", lambda s: s.pop("model.layers.0.mlp.up_proj.weight_scale_inv"), "model.layers.0.mlp.up_proj.weight"),
        ("int scale", lambda s: s.update({"model.layers.0.mlp.up_proj.weight_scale_inv": torch.ones(2, 1, dtype=torch.int32)}), "weight_scale_inv"),
        ("orphan scale", lambda s: s.update({"model.layers.0.self_attn.k_proj.weight_scale_inv": torch.ones(1, 1)}), "k_proj.weight_scale_inv"),
    ],
)
def test_unrecognised_scale_layout_refused(what: str, edit: Any, named: str, built: Any, tmp_path: Path) -> None:
    """A scale lorasave does not read is refused in one line naming the tensor, before anything is written."""
    c = built("llama-block")
    base = _break(c, tmp_path / "base", edit)
    with pytest.raises(QuantizedBaseError) as e:
        lorasave.merge(base, c["lora"], tmp_path / "out")
    assert named in str(e.value) and "\n" not in str(e.value) and isinstance(e.value, LorasaveError), what
    assert e.value.tensor.endswith(named)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- MXFP4 (gpt-oss)

E2M1_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])


def mxfp4_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What transformers' ``quantize_to_mxfp4`` (triton_kernels ``downcast_to_mxfp_torch``, ROUND_UP) makes of a run-time
    ``(E, in, out)`` parameter, stated on values: bf16 first; per 32 inputs the scale is the smallest power of two
    >= amax/6; each value / scale rounded to the nearest E2M1 value, ties away from zero, saturating at 6."""
    x = w.to(torch.bfloat16).float().transpose(1, 2)  # (E, out, in)
    g = x.unflatten(-1, (-1, 32))
    d = g.abs().amax(-1, keepdim=True) / 6.0
    m, e = torch.frexp(d)
    exp = torch.where(m == 0.5, e - 1, e).clamp(min=-126)
    scale_byte = torch.where(d == 0, torch.zeros_like(exp), exp + 127).to(torch.uint8)
    q = g / torch.where(d == 0, torch.ones_like(d), torch.ldexp(torch.ones_like(d), exp))
    code = torch.bucketize(q.abs(), E2M1_MIDPOINTS, right=True).to(torch.uint8) | (torch.signbit(q).to(torch.uint8) << 3)
    return (code[..., 0::2] | (code[..., 1::2] << 4)).contiguous(), scale_byte.squeeze(-1).contiguous()


def build_gpt_oss(seed: int = 12) -> Any:
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    cfg = GptOssConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=1, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=16, num_hidden_layers=2, max_position_embeddings=64, initializer_range=0.1,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return GptOssForCausalLM(cfg).eval()


def save_mxfp4(model: torch.nn.Module, folder: Path) -> Path:
    """gpt-oss as OpenAI ships it: experts as MXFP4 ``_blocks`` / ``_scales``, the rest bfloat16, quant_method mxfp4."""
    model.to(torch.bfloat16).save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    out = {}
    for k, v in state.items():
        if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            out[k + "_blocks"], out[k + "_scales"] = mxfp4_reference(v)
        else:
            out[k] = v
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    }
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("gpt_oss")
    base = save_mxfp4(fit(build_gpt_oss(), chain(1), 15), root / "base")
    lora = train_adapter(base, root / "lora", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS))
    ref = PeftModel.from_pretrained(load_reference(base), lora)
    ids = eval_ids()
    logits = M.logits_of(ref, ids)
    state = {k: v.detach().clone() for k, v in ref.merge_and_unload().state_dict().items()}
    return {"root": root, "base": base, "lora": lora, "ids": ids, "logits": logits, "merged": state}


def test_mxfp4_codec_matches_transformers() -> None:
    """lorasave's MXFP4 encoder equals the value-level statement of transformers' quantizer (zeros, ties, saturation,
    tiny and huge blocks); its decoder equals transformers' ``convert_moe_packed_tensors``; decode∘encode is the
    identity on values MXFP4 holds."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from lorasave.formats.mxfp4 import dequantize_mxfp4, quantize_mxfp4

    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 128, 40, generator=g) * torch.logspace(-6, 3, 40)
    w[0, :32, 0] = 0.0
    w[1, :32, 1] = torch.tensor([6.0, 5.0, 3.5, 2.5, 1.75, 1.25, 0.75, 0.25, -5.0, -0.25, -0.0, 0.1] + [0.0] * 20)  # exact ties
    blocks, scales = quantize_mxfp4(w)
    ref_b, ref_s = mxfp4_reference(w)
    assert torch.equal(blocks, ref_b) and torch.equal(scales, ref_s)
    deq = dequantize_mxfp4(blocks, scales)
    assert torch.equal(deq, convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(deq)), deq)


def test_mxfp4_base_merged(gpt_oss: dict[str, Any]) -> None:
    """The MXFP4 experts dequantized as transformers does, merged with the expert LoRA: float32 output bit-identical
    to transformers + PEFT ``merge_and_unload``; bf16 output has no _blocks/_scales and no quantization_config."""
    from lorasave.verify.run import verify

    c = gpt_oss
    out32 = c["root"] / "out-f32"
    lorasave.merge(c["base"], c["lora"], out32, dtype="float32")
    reloaded = AutoModelForCausalLM.from_pretrained(out32, dtype=torch.float32).state_dict()
    assert set(reloaded) == set(c["merged"])
    for k, v in c["merged"].items():
        assert torch.equal(reloaded[k], v), k
    out16 = c["root"] / "out-bf16"
    lorasave.merge(c["base"], c["lora"], out16)
    got = M.read_tensors(out16)
    assert not any(k.endswith(("_blocks", "_scales")) for k in got) and got["model.layers.0.mlp.experts.gate_up_proj"].dtype == torch.bfloat16
    assert "quantization_config" not in M.read_json(out16 / "config.json")
    model16 = AutoModelForCausalLM.from_pretrained(out16, dtype=torch.float32)
    for k, v in model16.state_dict().items():
        assert torch.equal(v, c["merged"][k].to(torch.bfloat16).float()), k
    logits = M.logits_of(model16, c["ids"])
    scale = float(c["logits"].abs().max())
    top1, n = margin_top1(logits, c["logits"], 0.02 * scale)
    diff = float((logits - c["logits"]).abs().max()) / scale
    print(f"gpt-oss mxfp4 base, bf16 merge vs transformers+PEFT float32: max|diff| {diff:.4f} x max|logit|, top-1 {top1:.3f} over {n} tokens")
    assert n >= c["ids"].numel() // 2 and top1 >= 0.99
    rep = verify(out16, level="tensors")
    assert rep.ok and all(".experts." in n for n in rep.not_probed), rep.counts()
    print(f"gpt-oss: verify {out16.name}: {rep.counts()}")


def test_save_method_mxfp4(gpt_oss: dict[str, Any], tmp_path: Path) -> None:
    """``--save-method mxfp4``: merged experts re-quantized exactly as transformers' quantizer would (on the bf16 merge),
    the rest bf16, gpt-oss's quantization_config kept; experts no adapter changes keep the base's bytes; transformers
    loads it."""
    c = gpt_oss
    out = c["root"] / "out-mxfp4"
    res = lorasave.merge(c["base"], c["lora"], out, save_method="mxfp4")
    assert res.quantization == "gpt-oss MXFP4 experts"
    got = M.read_tensors(out)
    for layer in range(2):
        for p in EXPERTS:
            name = f"model.layers.{layer}.{p}"
            b, s = mxfp4_reference(c["merged"][name])
            assert torch.equal(got[name + "_blocks"], b) and torch.equal(got[name + "_scales"], s), name
            assert name not in got
    assert got["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert M.read_json(out / "config.json")["quantization_config"] == M.read_json(c["base"] / "config.json")["quantization_config"]
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    state = model.state_dict()
    for layer in range(2):
        name = f"model.layers.{layer}.mlp.experts.down_proj"
        assert torch.equal(state[name], convert_moe_packed_tensors(*mxfp4_reference(c["merged"][name]), dtype=torch.float32))
    logits = M.logits_of(model, c["ids"])
    scale = float(c["logits"].abs().max())
    top1, _ = margin_top1(logits, c["logits"], 0.02 * scale)
    diff = float((logits - c["logits"]).abs().max()) / scale
    print(f"gpt-oss --save-method mxfp4 (transformers, dequantized) vs transformers+PEFT float32: max|diff| {diff:.3f} x max|logit|, top-1 {top1:.3f}")
    assert top1 >= 0.9  # 4-bit experts: the bytes are checked exactly above
    from lorasave.verify.run import verify

    rep = verify(out, level="tensors")
    assert rep.ok and set(rep.not_probed) == {f"model.layers.{i}.{p}{x}" for i in range(2) for p in EXPERTS for x in ("_blocks", "_scales")}, rep.counts()
    print(f"gpt-oss --save-method mxfp4: verify {rep.counts()}")
    # an adapter that leaves the experts alone: their blocks and scales are the base's, byte for byte
    attn = get_peft_model(load_reference(c["base"]), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    attn.save_pretrained(tmp_path / "attn")
    lorasave.merge(c["base"], tmp_path / "attn", tmp_path / "out", save_method="mxfp4")
    base, kept = load_file(c["base"] / "model.safetensors"), M.read_tensors(tmp_path / "out")
    assert all(torch.equal(kept[k], v) for k, v in base.items() if k.endswith(("_blocks", "_scales")))
    rep = verify(tmp_path / "out", level="tensors")
    assert rep.ok and not rep.not_probed, rep.counts()  # every expert block and scale bit-equal to the base's


def test_mxfp4_layout_refused(gpt_oss: dict[str, Any], tmp_path: Path) -> None:
    """``_blocks`` without ``_scales`` is refused in one line naming the tensor."""
    base = _break(gpt_oss, tmp_path / "base", lambda s: s.pop("model.layers.1.mlp.experts.down_proj_scales"))
    with pytest.raises(QuantizedBaseError) as e:
        lorasave.merge(base, gpt_oss["lora"], tmp_path / "out")
    assert "model.layers.1.mlp.experts.down_proj_blocks" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------- fp8_block on an FP8 base


def _dequant_blocks(v: torch.Tensor, s: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
    rows, cols = v.shape
    return v.float() * s.float().repeat_interleave(bh, 0)[:rows].repeat_interleave(bw, 1)[:, :cols]


@pytest.mark.parametrize("name", ["llama-block", "qwen3moe-block"])
def test_fp8_block_keeps_the_base_layout(name: str, built: Any, tmp_path: Path) -> None:
    """``--save-method fp8_block`` on a block-scaled FP8 base: FP8 tensors no adapter changes keep the base's bytes
    (values and ``weight_scale_inv``); merged ones are what ``formats.compressed``'s fp8_block (llm-compressor's
    FP8_BLOCK preset, with the base's block) makes of the bf16 merge, the scale stored float32; the base's
    quantization_config is kept; transformers loads it."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    c = built(name)
    out = tmp_path / "out"
    res = lorasave.merge(c["base"], c["lora"], out, save_method="fp8_block")
    assert "base's layout" in (res.quantization or "")
    base, got = load_file(c["base"] / "model.safetensors"), M.read_tensors(out)
    assert set(got) == set(base)
    qc = M.read_json(c["base"] / "config.json")["quantization_config"]
    assert M.read_json(out / "config.json")["quantization_config"] == qc
    bh, bw = qc["weight_block_size"]
    scheme = preset_name_to_scheme("FP8_BLOCK", ["Linear"])
    scheme = scheme.model_copy(update={"weights": scheme.weights.model_copy(update={"block_structure": [bh, bw]})})
    compressor = BaseCompressor.get_value_from_registry("float-quantized")
    lorasave.merge(c["base"], c["lora"], tmp_path / "f32", dtype="float32")
    merged32 = M.read_tensors(tmp_path / "f32")
    changed = 0
    for k, v in base.items():
        if k.endswith("_scale_inv"):
            continue  # checked with its FP8 tensor
        if v.dtype != torch.float8_e4m3fn:
            assert torch.equal(got[k], merged32[k].to(torch.bfloat16)), k
            continue
        if torch.equal(merged32[k], _dequant_blocks(v, base[k + "_scale_inv"], bh, bw)):  # no adapter changes it
            assert torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)) and torch.equal(got[k + "_scale_inv"], base[k + "_scale_inv"]), k
            continue
        changed += 1
        w = merged32[k].to(torch.bfloat16)
        rows, cols = w.shape
        p = torch.nn.functional.pad(w, (0, -cols % bw, 0, -rows % bh))
        blocks = p.reshape(p.shape[0] // bh, bh, p.shape[1] // bw, bw).transpose(1, 2).flatten(-2)
        scale, zp = calculate_qparams(blocks.amin(-1), blocks.amax(-1), scheme.weights)
        ref = compressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme)
        assert torch.equal(got[k].view(torch.uint8), ref["weight"].view(torch.uint8)), k
        assert got[k + "_scale_inv"].dtype == torch.float32 and torch.equal(got[k + "_scale_inv"], ref["weight_scale"].float()), k
    assert changed
    from lorasave.verify.run import verify

    rep = verify(out, level="tensors")
    assert rep.ok and len(rep.not_probed) == 2 * changed, rep.counts()  # re-quantized values and scales: not checkable
    print(f"{name} --save-method fp8_block: verify {rep.counts()}")
    logits = M.logits_of(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), c["ids"])
    scale = float(c["logits"].abs().max())
    top1, n = margin_top1(logits, c["logits"], 0.02 * scale)
    diff = float((logits - c["logits"]).abs().max()) / scale
    print(f"{name} --save-method fp8_block (base layout, {changed} re-quantized): max|diff| {diff:.4f} x max|logit|, top-1 {top1:.3f} over {n} tokens")
    assert top1 >= 0.99


def test_fp8_block_refused_without_blocks(built: Any, tmp_path: Path) -> None:
    """A per-tensor FP8 base has no blocks to keep: ``fp8_block`` refuses in one line."""
    c = built("llama-tensor")
    with pytest.raises(QuantizedBaseError, match="weight_block_size") as e:
        lorasave.merge(c["base"], c["lora"], tmp_path / "out", save_method="fp8_block")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------- compressed-tensors FP8 bases


def save_compressed_fp8(model: torch.nn.Module, folder: Path, preset: str) -> Path:
    """``model`` in bfloat16 as llm-compressor's data-free ``preset`` writes it: each ``*_proj`` weight observed
    min-max per the scheme's strategy, compressed-tensors' ``calculate_qparams`` and compressor; the config by
    its ``ModelCompressor``."""
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    model.to(torch.bfloat16).save_pretrained(folder)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    scheme.format = infer_module_format(torch.nn.Linear, scheme)
    compressor = BaseCompressor.get_value_from_registry(scheme.format.value)
    state, out = load_file(folder / "model.safetensors"), {}
    for k, w in state.items():
        if not k.endswith("_proj.weight"):
            out[k] = w
            continue
        if scheme.weights.strategy == "channel":
            mn, mx = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        else:
            bh, bw = scheme.weights.block_structure
            p = torch.nn.functional.pad(w, (0, -w.shape[1] % bw, 0, -w.shape[0] % bh))
            blk = p.reshape(p.shape[0] // bh, bh, p.shape[1] // bw, bw).transpose(1, 2).flatten(-2)
            mn, mx = blk.amin(-1), blk.amax(-1)
        scale, zp = calculate_qparams(mn, mx, scheme.weights)
        module = k.removesuffix(".weight")
        out.update({f"{module}.{n}": t for n, t in compressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme).items()})
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = QuantizationConfig(
        config_groups={"group_0": scheme}, format=scheme.format.value, quantization_status=QuantizationStatus.COMPRESSED, ignore=["lm_head"]
    )
    ModelCompressor(quantization_config=cfg).update_config(str(folder))
    return folder


def exact_dequantized(folder: Path) -> dict[str, torch.Tensor]:
    """The compressed base's weights as compressed-tensors' ``dequantize`` computes them with the scale in float32."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    qc = QuantizationConfig.model_validate(M.read_json(folder / "config.json")["quantization_config"])
    args = qc.config_groups["group_0"].weights
    state = load_file(folder / "model.safetensors")
    out = {}
    for k, v in state.items():
        if k.endswith("_scale"):
            continue
        out[k] = dequantize(v, state[k + "_scale"].float(), None, args, dtype=torch.float32) if v.dtype == torch.float8_e4m3fn else v.float()
    return out


@pytest.mark.parametrize("preset", ["FP8_DYNAMIC", "FP8_BLOCK"])
def test_compressed_tensors_fp8_base(preset: str, tmp_path: Path) -> None:
    """A compressed-tensors FP8 base (per-channel / 128x128 blocks, bf16 scales): merged in float32 from the exact
    products, bit-identical to PEFT ``merge_and_unload`` on compressed-tensors' dequantization with float32 scales;
    the bf16 output against transformers loading the compressed base (``dequantize=True``) + the PeftModel;
    ``fp8_block`` on the FP8_BLOCK base keeps its layout."""
    from transformers import CompressedTensorsConfig

    base = save_compressed_fp8(fit(build_llama128(), chain(1), 15), tmp_path / "base", preset)
    exact = build_llama128()
    exact.load_state_dict(exact_dequantized(base))
    torch.manual_seed(3)
    peft = fit(get_peft_model(exact.float(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")), torch.cat([chain(1), chain(2)]), 4, lr=2e-2)
    peft.save_pretrained(tmp_path / "lora")
    ref = {k: v.detach().clone() for k, v in peft.merge_and_unload().state_dict().items()}
    lorasave.merge(base, tmp_path / "lora", tmp_path / "f32", dtype="float32")
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "f32", dtype=torch.float32).state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.items())
    lorasave.merge(base, tmp_path / "lora", tmp_path / "bf16")
    assert not any(k.endswith("_scale") for k in M.read_tensors(tmp_path / "bf16"))
    loaded = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    want = M.logits_of(PeftModel.from_pretrained(loaded, tmp_path / "lora"), eval_ids())
    logits = M.logits_of(AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32), eval_ids())
    scale = float(want.abs().max())
    top1, n = margin_top1(logits, want, 0.02 * scale)
    diff = float((logits - want).abs().max()) / scale
    print(f"compressed-tensors {preset} base, bf16 merge vs transformers+PeftModel: max|diff| {diff:.4f} x max|logit|, top-1 {top1:.3f} over {n} tokens")
    assert top1 >= 0.99
    if preset == "FP8_BLOCK":
        lorasave.merge(base, tmp_path / "lora", tmp_path / "block", save_method="fp8_block")
        kept, src = M.read_tensors(tmp_path / "block"), load_file(base / "model.safetensors")
        assert set(kept) == set(src) and all(kept[k].dtype == v.dtype for k, v in src.items())
        assert M.read_json(tmp_path / "block" / "config.json")["quantization_config"] == M.read_json(base / "config.json")["quantization_config"]
    else:
        with pytest.raises(QuantizedBaseError, match="weight_block_size"):
            lorasave.merge(base, tmp_path / "lora", tmp_path / "block", save_method="fp8_block")


def test_cli(gpt_oss: dict[str, Any], built: Any, tmp_path: Path) -> None:
    """``lorasave merge --save-method mxfp4`` writes what the API writes; on a model without gpt-oss experts, and on a
    broken FP8 scale, one ``error:`` line."""
    from click.testing import CliRunner

    from lorasave.cli.main import main

    c = gpt_oss
    res = CliRunner().invoke(main, ["merge", str(c["base"]), str(c["lora"]), "-o", str(tmp_path / "cli"), "--save-method", "mxfp4"])
    assert res.exit_code == 0, res.output
    api = c["root"] / "out-mxfp4"
    if not api.exists():
        lorasave.merge(c["base"], c["lora"], api, save_method="mxfp4")
    got, want = M.read_tensors(tmp_path / "cli"), M.read_tensors(api)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    llama = built("llama-block")
    res = CliRunner().invoke(main, ["merge", str(llama["base"]), str(llama["lora"]), "-o", str(tmp_path / "no"), "--save-method", "mxfp4"])
    assert res.exit_code == 1 and "mxfp4" in res.output and not (tmp_path / "no").exists()
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
