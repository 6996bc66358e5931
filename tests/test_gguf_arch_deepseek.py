"""GGUF export of DeepSeek-V3 (``deepseek_v3``, issue 14) as llama.cpp's ``deepseek2``: a tiny
``DeepseekV3ForCausalLM`` with a LoRA on the MLA projections (``q_a_proj``, ``q_b_proj``,
``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``), the dense and shared-expert MLPs and the fused routed
experts (PEFT ``target_parameters``), run in llama.cpp against transformers on the float32 merge
(``_gguf_check``). DeepSeek-V2 (``deepseek_v2``, softmax gating, V2-Lite's ``q_proj`` without a LoRA rank)
the same way.

Also checked: the keys of ``DeepseekV2Model.set_gguf_parameters`` (MLA lengths and ranks, one KV head,
leading dense layers, expert groups, sigmoid gating, YaRN with its log multiplier), ``kv_b_proj`` split into
``attn_k_b`` (per-head transpose) and ``attn_v_b`` exactly as the converter does, the router's correction
bias as ``exp_probs_b`` (randomised, so the logits fail without it), stacked experts, a fused-expert
checkpoint giving the same file, MTP layers left out, refusals.

The V3 config keeps DeepSeek-V3's relations at a tiny size: ``qk_rope_head_dim`` : ``qk_nope_head_dim`` =
1 : 2 (64 : 128), ``v_head_dim`` = ``qk_nope_head_dim``, ``q_lora_rank`` and ``kv_lora_rank`` below hidden
(1536 and 512 of 7168 there: 64 and 32 of 128 here, so every row is a whole number of q8_0 blocks),
one shared expert of the routed size, top-4 of 16 experts in 4 groups of which 2 are kept (top-8 of 256 in
8 groups, 4 kept), one leading dense layer with a wider MLP, ``routed_scaling_factor`` 2.5,
``norm_topk_prob``, YaRN with ``mscale = mscale_all_dim = 1`` (factor 4 over an original context of 64,
so the scaling acts inside the 96 compared tokens).
"""

from __future__ import annotations

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
from _models import build_bpe_tokenizer
from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch import gguf_arch_for
from lorasave.formats.gguf.export import export_gguf

Q = gguf.GGMLQuantizationType
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0}
MLA_LORA = ["q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _v3_config(vocab: int = 320, **changes: Any) -> Any:
    from transformers import DeepseekV3Config

    kwargs = dict(
        vocab_size=vocab, hidden_size=128, intermediate_size=192, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
        n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=256, rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0},
        initializer_range=0.1, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return DeepseekV3Config(**{**kwargs, **changes})


def _v2_config(vocab: int = 320) -> Any:
    """DeepSeek-V2-Lite's shape: no ``q_lora_rank`` (``q_proj``), which llama.cpp takes only with 26 or 27
    layers; two shared experts, softmax gating without groups, ``mscale = mscale_all_dim = 0.707``."""
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=26, num_attention_heads=2,
        num_key_value_heads=2, q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=1.0, topk_method="greedy",
        max_position_embeddings=256, rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
        initializer_range=0.1, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip


def _build(root: Path, kind: str, model: Any, tok: Any, pretrain_steps: int) -> GgufCase:
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=MLA_LORA, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    return build_case(root, kind, model, tok, lora, pretrain_steps=pretrain_steps)


@pytest.fixture(scope="module")
def deepseek_v3(tmp_path_factory: pytest.TempPathFactory) -> GgufCase:
    need_llama_cpp()
    from transformers import DeepseekV3ForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        tok = build_bpe_tokenizer("llama3", vocab=320)
        model = DeepseekV3ForCausalLM(_v3_config(len(tok))).eval()
        with torch.no_grad():  # the correction bias (a buffer, zero at init) chooses experts: make it matter
            for layer in model.model.layers[1:]:
                layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(16) * 0.5)
        return _build(tmp_path_factory.mktemp("deepseek_v3"), "deepseek_v3", model, tok, 30)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def deepseek_v2(tmp_path_factory: pytest.TempPathFactory) -> GgufCase:
    need_llama_cpp()
    from transformers import DeepseekV2ForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(1)
        tok = build_bpe_tokenizer("llama3", vocab=320)
        model = DeepseekV2ForCausalLM(_v2_config(len(tok))).eval()
        return _build(tmp_path_factory.mktemp("deepseek_v2"), "deepseek_v2", model, tok, 10)
    finally:
        torch.set_num_threads(threads)


def _tensors(path: Path) -> dict[str, Any]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_logits(deepseek_v3: GgufCase) -> None:
    """f32 and q8_0 in llama.cpp against transformers on the float32 merge."""
    check_logits(deepseek_v3, "f32")
    check_logits(deepseek_v3, "q8_0")


def test_logits_v2(deepseek_v2: GgufCase) -> None:
    """DeepSeek-V2(-Lite): f32 and q8_0 in llama.cpp against transformers on the float32 merge."""
    check_logits(deepseek_v2, "f32")
    check_logits(deepseek_v2, "q8_0")


def test_keys_and_tensors(deepseek_v3: GgufCase) -> None:
    """``DeepseekV2Model.set_gguf_parameters``'s keys; ``kv_b_proj`` as ``attn_k_b`` / ``attn_v_b``; layer 0
    dense, layers 1-2 stacked experts (= ``torch.stack`` of the merged ones) + shared expert;
    ``exp_probs_b`` = the correction bias; router and bias F32 at q8_0, ``attn_k_b``/``attn_v_b`` Q8_0."""
    path = deepseek_v3.export("f32").gguf_file
    r = gguf.GGUFReader(path)
    keys = (
        "block_count", "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
        "attention.key_length_mla", "attention.value_length_mla", "attention.q_lora_rank", "attention.kv_lora_rank", "rope.dimension_count",
        "leading_dense_block_count", "feed_forward_length", "expert_feed_forward_length", "expert_count", "expert_used_count",
        "expert_group_count", "expert_group_used_count", "expert_shared_count", "expert_weights_scale", "expert_weights_norm",
        "expert_gating_func", "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length", "rope.scaling.yarn_log_multiplier",
    )  # fmt: skip
    f = {k: r.fields[f"deepseek2.{k}"].contents() for k in keys}
    assert f == pytest.approx({
        "block_count": 3, "attention.head_count": 4, "attention.head_count_kv": 1, "attention.key_length": 48, "attention.value_length": 32,
        "attention.key_length_mla": 48, "attention.value_length_mla": 32, "attention.q_lora_rank": 64, "attention.kv_lora_rank": 32,
        "rope.dimension_count": 16, "leading_dense_block_count": 1, "feed_forward_length": 192, "expert_feed_forward_length": 32,
        "expert_count": 16, "expert_used_count": 4, "expert_group_count": 4, "expert_group_used_count": 2, "expert_shared_count": 1,
        "expert_weights_scale": 2.5, "expert_weights_norm": True, "expert_gating_func": 2, "rope.scaling.type": "yarn",
        "rope.scaling.factor": 4.0, "rope.scaling.original_context_length": 64, "rope.scaling.yarn_log_multiplier": 0.1,
    })  # fmt: skip
    got = _tensors(path)
    merged = load_file(deepseek_v3.merged / "model.safetensors")
    assert not any(".attn_kv_b." in n or n.startswith("blk.3.") for n in got)
    for layer in range(3):
        kv_b = merged[f"model.layers.{layer}.self_attn.kv_b_proj.weight"].view(4, 64, 32)  # (head, nope + v, kv_lora_rank)
        np.testing.assert_array_equal(np.asarray(got[f"blk.{layer}.attn_k_b.weight"].data), kv_b[:, :32].transpose(1, 2).numpy())
        np.testing.assert_array_equal(np.asarray(got[f"blk.{layer}.attn_v_b.weight"].data), kv_b[:, 32:].numpy())
        for name in ("attn_q_a", "attn_q_a_norm", "attn_q_b", "attn_kv_a_mqa", "attn_kv_a_norm", "attn_output"):
            assert f"blk.{layer}.{name}.weight" in got, name
    assert "blk.0.ffn_gate.weight" in got and "blk.0.ffn_gate_exps.weight" not in got
    for layer in (1, 2):
        pre = f"model.layers.{layer}.mlp"
        np.testing.assert_array_equal(np.asarray(got[f"blk.{layer}.exp_probs_b.bias"].data), merged[f"{pre}.gate.e_score_correction_bias"].numpy())
        for proj in ("gate", "up", "down"):  # the merge holds one tensor per expert (transformers 5 reverts its fusion)
            want = torch.stack([merged[f"{pre}.experts.{k}.{proj}_proj.weight"] for k in range(16)])
            np.testing.assert_array_equal(np.asarray(got[f"blk.{layer}.ffn_{proj}_exps.weight"].data), want.numpy())
        assert f"blk.{layer}.ffn_down_shexp.weight" in got
    q8 = _tensors(deepseek_v3.export("q8_0").gguf_file)
    assert Q(q8["blk.1.exp_probs_b.bias"].tensor_type) is Q.F32 and Q(q8["blk.1.ffn_gate_inp.weight"].tensor_type) is Q.F32
    assert Q(q8["blk.1.attn_k_b.weight"].tensor_type) is Q.Q8_0 and Q(q8["blk.1.attn_v_b.weight"].tensor_type) is Q.Q8_0


def test_v2_keys(deepseek_v2: GgufCase) -> None:
    """V2-Lite: ``attn_q`` without ``q_lora_rank``, no gating key (llama.cpp's softmax), no expert norm."""
    r = gguf.GGUFReader(deepseek_v2.export("f32").gguf_file)
    assert "deepseek2.attention.q_lora_rank" not in r.fields and "deepseek2.expert_gating_func" not in r.fields
    assert "deepseek2.expert_weights_norm" not in r.fields
    assert r.fields["deepseek2.rope.scaling.yarn_log_multiplier"].contents() == pytest.approx(0.0707)
    names = {t.name for t in r.tensors}
    assert "blk.0.attn_q.weight" in names and "blk.0.attn_q_a.weight" not in names and "blk.25.ffn_gate_exps.weight" in names


def _fuse(src: Path, dst: Path) -> None:
    """``src`` (one tensor per expert) rewritten with transformers 5's fused ``gate_up_proj`` / ``down_proj``."""
    shutil.copytree(src, dst)
    state = load_file(src / "model.safetensors")
    out = {k: v for k, v in state.items() if ".experts." not in k}
    for layer in (1, 2):
        pre = f"model.layers.{layer}.mlp.experts"
        gate_up = [torch.cat([state[f"{pre}.{k}.gate_proj.weight"], state[f"{pre}.{k}.up_proj.weight"]]) for k in range(16)]
        out[f"{pre}.gate_up_proj"] = torch.stack(gate_up)
        out[f"{pre}.down_proj"] = torch.stack([state[f"{pre}.{k}.down_proj.weight"] for k in range(16)])
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})


def test_fused_checkpoint_and_mtp_same_file(deepseek_v3: GgufCase, tmp_path: Path) -> None:
    """A checkpoint with fused experts (the LoRA's ``target_parameters`` merged into them) and an MTP layer
    (``model.layers.3.*``, which transformers does not load) gives the same tensors as the per-expert
    checkpoint without it, f32 and q8_0 from one pass, and a note on the MTP tensors left out."""
    base = tmp_path / "base"
    _fuse(deepseek_v3.base, base)
    state = load_file(base / "model.safetensors")
    state["model.layers.3.eh_proj.weight"] = torch.zeros(128, 256)
    state["model.layers.3.enorm.weight"] = torch.ones(128)
    state["model.layers.3.self_attn.kv_b_proj.weight"] = torch.zeros(256, 32)
    save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    res = export_gguf(base, deepseek_v3.lora, tmp_path / "out", type="f32,q8_0", modelfile=False)
    for path, type in zip(res.gguf_files, ("f32", "q8_0"), strict=True):
        ours, ref = _tensors(path), _tensors(deepseek_v3.export(type).gguf_file)
        assert list(ours) == list(ref)
        for name, t in ref.items():
            assert np.asarray(ours[name].data).tobytes() == np.asarray(t.data).tobytes(), (type, name)
    assert any("3 multi-token-prediction (nextn) layer tensors left out" in n for n in res.notes), res.notes


def test_kquant_bit_identical(tmp_path: Path) -> None:
    """q4_k_m of a V3 base whose rows are multiples of 256 (k-quant blocks; ``attn_k_b`` / ``attn_v_b``
    3-D): every tensor's type and bytes as ``llama_model_quantize`` of the f32 file writes them."""
    need_llama_cpp()
    from transformers import DeepseekV3ForCausalLM

    from lorasave.runtimes.llama_cpp import lib as llama_cpp

    torch.manual_seed(2)
    tok = build_bpe_tokenizer("llama3", vocab=320)
    sizes = {"hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 256, "q_lora_rank": 256, "kv_lora_rank": 256, "v_head_dim": 64}
    experts = {"n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1}
    config = _v3_config(len(tok), **sizes, **experts, qk_rope_head_dim=32, qk_nope_head_dim=64)
    DeepseekV3ForCausalLM(config).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    f32 = export_gguf(tmp_path / "base", [], tmp_path / "f32", type="f32", modelfile=False).gguf_file
    ours = _tensors(export_gguf(tmp_path / "base", [], tmp_path / "q4_k_m", type="q4_k_m", modelfile=False).gguf_file)
    llama_cpp.quantize(f32, tmp_path / "llama.gguf", "q4_k_m")
    theirs = _tensors(tmp_path / "llama.gguf")
    assert set(ours) == set(theirs)
    for name, t in ours.items():
        assert t.tensor_type == theirs[name].tensor_type, (name, t.tensor_type.name, theirs[name].tensor_type.name)
        assert np.asarray(t.data).tobytes() == np.asarray(theirs[name].data).tobytes(), name
    assert Q(ours["blk.1.attn_v_b.weight"].tensor_type) is not Q.F32 and Q(ours["blk.1.ffn_gate_exps.weight"].tensor_type) is Q.Q4_K


@pytest.mark.parametrize(
    ("model_type", "change", "match"),
    [
        ("deepseek_v3", {"num_key_value_heads": 2}, "num_key_value_heads=2"),
        ("deepseek_v3", {"q_lora_rank": None}, "without q_lora_rank and 3 layers"),
        ("deepseek_v3", {"rope_interleave": False}, "rope_interleave=false"),
        ("deepseek_v3", {"attention_bias": True}, "attention_bias"),
        ("deepseek_v3", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ("deepseek_v3", {"rope_parameters": {**YARN, "mscale": 0.707, "mscale_all_dim": 1.0}}, "mscale=0.707"),
        ("deepseek_v3", {"rope_parameters": YARN}, "mscale=None, mscale_all_dim=None"),
        ("deepseek_v3", {"rope_parameters": {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0, "attention_factor": 1.0}}, "attention_factor"),
        ("deepseek_v3", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, "rope_type 'linear'"),
        ("deepseek_v2", {"n_group": 2, "topk_group": 1}, "n_group=2"),
        ("deepseek_v2", {"norm_topk_prob": True}, "norm_topk_prob"),
        ("deepseek_v2", {"num_hidden_layers": 3}, "without q_lora_rank and 3 layers"),
        ("deepseek_v2", {"q_lora_rank": 32}, "with q_lora_rank and 26 layers"),
    ],
)
def test_refused(model_type: str, change: dict[str, Any], match: str) -> None:
    """What llama.cpp's deepseek2 would run differently (or not load): one line."""
    ok = (_v3_config() if model_type == "deepseek_v3" else _v2_config()).to_dict()
    gguf_arch_for(ok)
    with pytest.raises(UnsupportedModelError, match=match) as e:
        gguf_arch_for({**ok, **change})
    assert "\n" not in str(e.value)
