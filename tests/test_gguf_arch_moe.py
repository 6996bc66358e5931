"""GGUF export of mixtures of experts (issue 14, point 2): Qwen3-MoE, Qwen2-MoE (shared expert) and
Mixtral (llama.cpp's ``llama`` with experts), each a tiny model with an expert LoRA, run in llama.cpp
against transformers on the float32 merge (``_gguf_check``).

What else is checked against a reference that is not lorasave's own numbers:

* the stacked ``ffn_*_exps`` of a checkpoint with one tensor per expert equal ``torch.stack`` of
  the experts (the converter's ``modify_tensors``) of the float32 merge transformers loads;
* a checkpoint holding transformers 5's fused ``gate_up_proj`` / ``down_proj`` (and a
  ``target_parameters`` LoRA on them) gives the same file, tensor for tensor, as the per-expert one;
* per-expert PEFT modules (``target_modules`` on ``experts.N.*``, what transformers 4 trained) are
  merged into their expert before stacking: ``W + s * B @ A`` in float64;
* the k-quant mix of a MoE (``q4_k_m``, ``mxfp4_moe``) is bit-identical to ``llama_model_quantize``
  of the f32 file;
* what llama.cpp would run differently is refused in one line.

Configs keep the real models' relations at a tiny size: Qwen3-30B-A3B (head_dim * heads = 2 * hidden,
norm_topk_prob, 16 experts per active 1 here for 128:8), Qwen1.5-MoE-A2.7B (qkv biases, shared expert
4x the expert size, top-4), Mixtral-8x7B (8 experts, top-2, GQA 4:1, intermediate 3.5x hidden).
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
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from _gguf_check import GgufCase, build_case, check_logits
from _llama import need_llama_cpp
from _models import build_bpe_tokenizer, build_spm_tokenizer
from lorasave.errors import UnsupportedAdapterError, UnsupportedModelError
from lorasave.formats.gguf.arch import gguf_arch_for
from lorasave.formats.gguf.export import export_gguf

Q = gguf.GGMLQuantizationType
COMMON: dict[str, Any] = dict(max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=False, num_hidden_layers=2)
EXPERT_LORA = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _qwen3_moe(vocab: int, hidden: int = 64, moe: int = 32) -> Any:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=moe, num_attention_heads=4, num_key_value_heads=2,
        head_dim=hidden // 2, num_experts=16, num_experts_per_tok=2, norm_topk_prob=True, bos_token_id=0, eos_token_id=0, pad_token_id=0, **COMMON,
    )  # fmt: skip
    return Qwen3MoeForCausalLM(cfg).eval()


def _qwen2_moe(vocab: int) -> Any:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=4, num_experts=8, num_experts_per_tok=4, norm_topk_prob=False, bos_token_id=0, eos_token_id=0, pad_token_id=0, **COMMON,
    )  # fmt: skip
    return Qwen2MoeForCausalLM(cfg).eval()


def _mixtral(vocab: int) -> Any:
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=224, num_attention_heads=4, num_key_value_heads=1, num_local_experts=8,
        num_experts_per_tok=2, bos_token_id=1, eos_token_id=2, pad_token_id=0, **COMMON,
    )  # fmt: skip
    return MixtralForCausalLM(cfg).eval()


def _case(root: Path, kind: str) -> GgufCase:
    torch.manual_seed(0)
    if kind == "mixtral":
        tok = build_spm_tokenizer(root / "tok", "LlamaTokenizer")
        model = _mixtral(len(tok))
    else:
        tok = build_bpe_tokenizer("qwen2")
        model = _qwen3_moe(len(tok)) if kind == "qwen3_moe" else _qwen2_moe(len(tok))
    modules = ["q_proj", "v_proj", "o_proj"] + (["shared_expert.gate_proj", "shared_expert.down_proj"] if kind == "qwen2_moe" else [])
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=modules, target_parameters=EXPERT_LORA)
    return build_case(root, kind, model, tok, lora, pretrain_steps=30)


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory: pytest.TempPathFactory) -> GgufCase:
    need_llama_cpp()
    return _case(tmp_path_factory.mktemp("qwen3_moe"), "qwen3_moe")


@pytest.fixture(scope="module")
def qwen2_moe(tmp_path_factory: pytest.TempPathFactory) -> GgufCase:
    need_llama_cpp()
    return _case(tmp_path_factory.mktemp("qwen2_moe"), "qwen2_moe")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> GgufCase:
    need_llama_cpp()
    return _case(tmp_path_factory.mktemp("mixtral"), "mixtral")


@pytest.fixture(params=["qwen3_moe", "qwen2_moe", "mixtral"])
def case(request: pytest.FixtureRequest) -> GgufCase:
    return request.getfixturevalue(request.param)


def _reader(path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)


def _tensors(path: Path) -> dict[str, Any]:
    return {t.name: t for t in _reader(path).tensors}


def _field(r: gguf.GGUFReader, key: str) -> Any:
    return r.fields[key].contents()


def test_logits(case: GgufCase) -> None:
    """f32 and q8_0 in llama.cpp against transformers on the float32 merge (experts LoRA'd)."""
    check_logits(case, "f32")
    check_logits(case, "q8_0")


def test_stacked_experts_are_the_merge(case: GgufCase) -> None:
    """``ffn_*_exps`` = ``torch.stack`` of the merged experts (the converter's stacking), the router
    ``ffn_gate_inp`` F32 even in q8_0, the expert keys; every expert changed by the LoRA."""
    merged = load_file(case.merged / "model.safetensors")
    base = load_file(case.base / "model.safetensors")
    path = case.export("f32").gguf_file
    got = _tensors(path)
    cfg = json.loads((case.base / "config.json").read_text())
    n_exp = cfg.get("num_experts") or cfg.get("num_local_experts")
    names = {"gate": "w1", "down": "w2", "up": "w3"} if case.kind == "mixtral" else {k: f"{k}_proj" for k in ("gate", "down", "up")}
    part = "block_sparse_moe" if case.kind == "mixtral" else "mlp"
    for layer in range(2):
        for proj, hf in names.items():
            experts = [merged[f"model.layers.{layer}.{part}.experts.{k}.{hf}.weight"] for k in range(n_exp)]
            assert all(not torch.equal(e, base[f"model.layers.{layer}.{part}.experts.{k}.{hf}.weight"]) for k, e in enumerate(experts))
            t = got[f"blk.{layer}.ffn_{proj}_exps.weight"]
            np.testing.assert_array_equal(np.asarray(t.data), torch.stack(experts).numpy())
    r = _reader(path)
    arch = _field(r, "general.architecture")
    assert arch == {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "mixtral": "llama"}[case.kind]
    assert _field(r, f"{arch}.expert_count") == n_exp
    assert _field(r, f"{arch}.expert_used_count") == cfg["num_experts_per_tok"]
    if case.kind != "mixtral":
        assert _field(r, f"{arch}.expert_feed_forward_length") == cfg["moe_intermediate_size"]
    q8 = _tensors(case.export("q8_0").gguf_file)
    assert Q(q8["blk.0.ffn_gate_inp.weight"].tensor_type) is Q.F32 and Q(q8["blk.0.ffn_up_exps.weight"].tensor_type) is Q.Q8_0
    if case.kind == "qwen2_moe":
        assert _field(r, f"{arch}.expert_shared_feed_forward_length") == cfg["shared_expert_intermediate_size"]
        assert Q(q8["blk.0.ffn_gate_inp_shexp.weight"].tensor_type) is Q.F32
        assert Q(q8["blk.0.ffn_gate_shexp.weight"].tensor_type) is Q.Q8_0


def _fuse(src: Path, dst: Path) -> None:
    """``src`` (one tensor per expert) rewritten with transformers 5's fused ``gate_up_proj`` ``(E, 2 * n_ff, n_embd)``
    and ``down_proj`` ``(E, n_embd, n_ff)``."""
    shutil.copytree(src, dst)
    state = load_file(src / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    n_exp = cfg.get("num_experts") or cfg["num_local_experts"]
    out = {k: v for k, v in state.items() if ".experts." not in k}
    for layer in range(2):
        pre = f"model.layers.{layer}.mlp.experts"
        gate = [state[f"{pre}.{k}.gate_proj.weight"] for k in range(n_exp)]
        up = [state[f"{pre}.{k}.up_proj.weight"] for k in range(n_exp)]
        out[f"{pre}.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up, strict=True)])
        out[f"{pre}.down_proj"] = torch.stack([state[f"{pre}.{k}.down_proj.weight"] for k in range(n_exp)])
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})


def test_fused_checkpoint_same_file(qwen3_moe: GgufCase, tmp_path: Path) -> None:
    """A checkpoint with fused experts (and a ``target_parameters`` LoRA on them) gives the same
    tensors as the per-expert checkpoint of the same weights (gate/up split on dim -2 as the
    converter does), f32 and q8_0 written from one pass (each stacked tensor's pieces in a row)."""
    case = qwen3_moe
    fused = tmp_path / "fused"
    _fuse(case.base, fused)
    res = export_gguf(fused, case.lora, tmp_path / "out-fused", type="f32,q8_0", modelfile=False)
    for path, type in zip(res.gguf_files, ("f32", "q8_0"), strict=True):
        ours, ref = _tensors(path), _tensors(case.export(type).gguf_file)
        assert set(ours) == set(ref)
        for name, t in ref.items():
            assert np.asarray(ours[name].data).tobytes() == np.asarray(t.data).tobytes(), (type, name)


def test_per_expert_peft_modules(qwen3_moe: GgufCase, tmp_path: Path) -> None:
    """A LoRA on per-expert modules (``target_modules`` on ``experts.N.*``, as transformers 4 trained
    Qwen-MoE) is merged into each expert before stacking: ``W + (alpha / r) * B @ A`` (float64 here)."""
    base = load_file(qwen3_moe.base / "model.safetensors")
    gen = torch.Generator().manual_seed(5)
    r, alpha, factors = 2, 4, {}
    for module in ("model.layers.0.mlp.experts.3.down_proj", "model.layers.1.mlp.experts.0.gate_proj", "model.layers.1.mlp.experts.15.up_proj"):
        out_f, in_f = base[f"{module}.weight"].shape
        factors[module] = (torch.randn(r, in_f, generator=gen), torch.randn(out_f, r, generator=gen))
    lora = tmp_path / "lora"
    lora.mkdir()
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    save_file(tensors, lora / "adapter_model.safetensors")
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["gate_proj", "up_proj", "down_proj"], "task_type": "CAUSAL_LM"}
    (lora / "adapter_config.json").write_text(json.dumps(cfg))
    got = _tensors(export_gguf(qwen3_moe.base, lora, tmp_path / "out", type="f32", modelfile=False).gguf_file)
    gguf_name = {"down_proj": "ffn_down_exps", "gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps"}
    for module, (a, b) in factors.items():
        parts = module.split(".")
        layer, k, proj = int(parts[2]), int(parts[5]), parts[6]
        want = base[f"{module}.weight"].double() + (alpha / r) * (b.double() @ a.double())
        stacked = np.asarray(got[f"blk.{layer}.{gguf_name[proj]}.weight"].data)
        np.testing.assert_allclose(stacked[k], want.numpy(), rtol=0, atol=1e-5)
        other = (k + 1) % 16
        np.testing.assert_array_equal(stacked[other], base[f"model.layers.{layer}.mlp.experts.{other}.{proj}.weight"].numpy())
    # a GGUF LoRA adapter cannot hold these pairs (llama.cpp applies one pair to a whole tensor): one line naming it
    from lorasave.formats.gguf.adapter import export_gguf_adapter

    with pytest.raises(UnsupportedAdapterError, match=r"experts stacked in blk\.0\.ffn_down_exps") as e:
        export_gguf_adapter(qwen3_moe.base, lora, tmp_path / "a")
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def moe256(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A Qwen3-MoE base whose expert rows are multiples of 256 (hidden and expert size 256), its f32 GGUF."""
    need_llama_cpp()
    root = tmp_path_factory.mktemp("moe256")
    torch.manual_seed(2)
    tok = build_bpe_tokenizer("qwen2")
    model = _qwen3_moe(len(tok), hidden=256, moe=256)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    return {"root": root, "base": root / "base", "f32": export_gguf(root / "base", [], root / "f32", type="f32", modelfile=False).gguf_file}


@pytest.mark.parametrize("type", ["q4_k_m", "mxfp4_moe"])
def test_moe_kquants_bit_identical(moe256: dict[str, Any], type: str) -> None:
    """The k-quant mix of a MoE (per-expert importance-free Q4_K / Q6_K choices, mxfp4_moe's MXFP4
    experts): every tensor's type and bytes as ``llama_model_quantize`` of the f32 file writes them."""
    from lorasave.runtimes.llama_cpp import lib as llama_cpp

    ours = _tensors(export_gguf(moe256["base"], [], moe256["root"] / type, type=type, modelfile=False).gguf_file)
    dst = moe256["root"] / f"llama-{type}.gguf"
    llama_cpp.quantize(moe256["f32"], dst, type)
    theirs = _tensors(dst)
    assert set(ours) == set(theirs)
    for name, t in ours.items():
        assert t.tensor_type == theirs[name].tensor_type, (name, t.tensor_type.name, theirs[name].tensor_type.name)
        assert np.asarray(t.data).tobytes() == np.asarray(theirs[name].data).tobytes(), name
    want = Q.MXFP4 if type == "mxfp4_moe" else Q.Q4_K
    assert Q(ours["blk.0.ffn_gate_exps.weight"].tensor_type) is want and Q(ours["blk.0.ffn_gate_inp.weight"].tensor_type) is Q.F32


@pytest.mark.parametrize(
    ("model_type", "change", "match"),
    [
        ("qwen3_moe", {"norm_topk_prob": False}, "norm_topk_prob"),
        ("qwen2_moe", {"norm_topk_prob": True}, "norm_topk_prob"),
        ("qwen3_moe", {"mlp_only_layers": [1]}, "dense layers"),
        ("qwen2_moe", {"decoder_sparse_step": 2}, "dense layers"),
    ],
)
def test_refused_configs(model_type: str, change: dict[str, Any], match: str) -> None:
    """Configs llama.cpp's graphs would run differently than transformers: refused in one line."""
    cfg = {
        "model_type": model_type,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_experts": 8,
        "norm_topk_prob": model_type == "qwen3_moe",
    }
    gguf_arch_for(cfg)
    with pytest.raises(UnsupportedModelError, match=match) as e:
        gguf_arch_for({**cfg, **change})
    assert "\n" not in str(e.value)
