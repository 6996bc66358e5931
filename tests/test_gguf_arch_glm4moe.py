"""GGUF export of GLM-4.5 (``glm4_moe``, issue 14): a tiny ``Glm4MoeForCausalLM`` with a LoRA on attention,
the dense and shared-expert MLPs and the fused routed experts (PEFT ``target_parameters``), run in
llama.cpp against transformers on the float32 merge (``_gguf_check``).

Also checked: the keys of ``Glm4MoeModel.set_gguf_parameters`` (leading dense layers, shared expert
count, sigmoid gating, ``routed_scaling_factor``, ``norm_topk_prob``), the router's correction bias as
``exp_probs_b`` (randomised here, so the logits fail without it), the MTP layers of a checkpoint left
out (``--no-mtp``), the EOT / EOM ids of ``_set_vocab_glm``, expert groups (``n_group`` 4 keeping ``topk_group`` 2: llama.cpp's ``build_moe_ffn``
chooses groups as transformers' router does; the groups change transformers' logits, so matching them
proves llama.cpp honours them), and a ``topk_group`` llama.cpp asserts against refused.

The config keeps GLM-4.5's relations at a tiny size: head_dim * heads = 3 x hidden (96 x 128 = 12288
for 5120 there), GQA, Q/K norms, Q/K/V biases, half of each head rotated, one leading dense
layer with a wider MLP, one shared expert of the routed size, top-4 of 16 (8 of 160 there),
``routed_scaling_factor`` 2.5, ``norm_topk_prob``.
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
from tokenizers import AddedToken
from transformers import AutoTokenizer

from _gguf_check import GgufCase, build_case, check_logits
from _llama import need_llama_cpp
from _models import build_bpe_tokenizer
from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch import gguf_arch_for
from lorasave.formats.gguf.export import export_gguf

Q = gguf.GGMLQuantizationType


def _config(vocab: int = 320, **changes: Any) -> Any:
    from transformers import Glm4MoeConfig

    rope = {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}
    cfg: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=128, intermediate_size=320, moe_intermediate_size=64, num_attention_heads=6, num_key_value_heads=2, head_dim=64,
        n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3, routed_scaling_factor=2.5,
        norm_topk_prob=True, n_group=1, topk_group=1, use_qk_norm=True, attention_bias=True, rope_parameters=rope, max_position_embeddings=256,
        initializer_range=0.1, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return Glm4MoeConfig(**{**cfg, **changes})


def _case(root: Path, kind: str, **changes: Any) -> GgufCase:
    """A tiny GLM-4.5 (:func:`_config` with ``changes``) with a randomised correction bias, LoRA trained."""
    from transformers import Glm4MoeForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        tok = build_bpe_tokenizer("llama3", vocab=319)
        glm = ("<|user|>", "<|observation|>")  # GLM's EOT and EOM, which the converter looks up (_set_vocab_glm)
        tok.add_tokens([AddedToken(t, special=True) for t in glm], special_tokens=True)
        model = Glm4MoeForCausalLM(_config(len(tok), **changes)).eval()
        with torch.no_grad():  # the correction bias (a buffer, zero at init) chooses experts: make it matter
            for layer in model.model.layers[1:]:
                layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(16) * 0.5)
        lora = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        )  # fmt: skip
        return build_case(root, kind, model, tok, lora, pretrain_steps=30)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def glm4_moe(tmp_path_factory: pytest.TempPathFactory) -> GgufCase:
    need_llama_cpp()
    return _case(tmp_path_factory.mktemp("glm4_moe"), "glm4_moe")


def _tensors(path: Path) -> dict[str, Any]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_logits(glm4_moe: GgufCase) -> None:
    """f32 and q8_0 in llama.cpp against transformers on the float32 merge."""
    check_logits(glm4_moe, "f32")
    check_logits(glm4_moe, "q8_0")


def test_keys_and_tensors(glm4_moe: GgufCase) -> None:
    """``Glm4MoeModel.set_gguf_parameters``'s keys; layer 0 dense, layers 1-2 experts + shared expert;
    ``exp_probs_b`` = the correction bias; the stacked experts = ``torch.stack`` of the merged ones."""
    path = glm4_moe.export("f32").gguf_file
    r = gguf.GGUFReader(path)
    f = {k: r.fields[f"glm4moe.{k}"].contents() for k in (
        "expert_count", "expert_used_count", "expert_shared_count", "leading_dense_block_count", "expert_gating_func", "expert_weights_scale",
        "expert_weights_norm", "expert_feed_forward_length", "feed_forward_length", "rope.dimension_count", "block_count",
    )}  # fmt: skip
    assert f == {
        "expert_count": 16, "expert_used_count": 4, "expert_shared_count": 1, "leading_dense_block_count": 1, "expert_gating_func": 2,
        "expert_weights_scale": 2.5, "expert_weights_norm": True, "expert_feed_forward_length": 64, "feed_forward_length": 320,
        "rope.dimension_count": 32, "block_count": 3,
    }  # fmt: skip
    assert "glm4moe.nextn_predict_layers" not in r.fields
    vocab = AutoTokenizer.from_pretrained(glm4_moe.base).get_vocab()
    assert r.fields["tokenizer.ggml.eot_token_id"].contents() == vocab["<|user|>"]
    assert r.fields["tokenizer.ggml.eom_token_id"].contents() == vocab["<|observation|>"]
    got = _tensors(path)
    merged = load_file(glm4_moe.merged / "model.safetensors")
    assert "blk.0.ffn_gate.weight" in got and "blk.0.ffn_gate_exps.weight" not in got
    for layer in (1, 2):
        pre = f"model.layers.{layer}.mlp"
        np.testing.assert_array_equal(np.asarray(got[f"blk.{layer}.exp_probs_b.bias"].data), merged[f"{pre}.gate.e_score_correction_bias"].numpy())
        for proj in ("gate", "up", "down"):  # the merge holds one tensor per expert (transformers 5 reverts its fusion)
            want = torch.stack([merged[f"{pre}.experts.{k}.{proj}_proj.weight"] for k in range(16)])
            np.testing.assert_array_equal(np.asarray(got[f"blk.{layer}.ffn_{proj}_exps.weight"].data), want.numpy())
        assert f"blk.{layer}.ffn_down_shexp.weight" in got and f"blk.{layer}.attn_q_norm.weight" in got
    q8 = _tensors(glm4_moe.export("q8_0").gguf_file)
    assert Q(q8["blk.1.exp_probs_b.bias"].tensor_type) is Q.F32 and Q(q8["blk.1.ffn_gate_inp.weight"].tensor_type) is Q.F32


def test_mtp_layers_left_out(glm4_moe: GgufCase, tmp_path: Path) -> None:
    """A checkpoint with GLM-4.5's MTP layer (``model.layers.<num_hidden_layers>.*``, which transformers
    does not load) gives the same file as without it (``--no-mtp``), with a note."""
    base = tmp_path / "base"
    shutil.copytree(glm4_moe.base, base)
    state = load_file(base / "model.safetensors")
    state["model.layers.3.eh_proj.weight"] = torch.zeros(128, 256)
    state["model.layers.3.enorm.weight"] = torch.ones(128)
    state["model.layers.3.mlp.experts.0.gate_proj.weight"] = torch.zeros(64, 128)
    save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    res = export_gguf(base, glm4_moe.lora, tmp_path / "out", type="f32", modelfile=False)
    ours, ref = _tensors(res.gguf_file), _tensors(glm4_moe.export("f32").gguf_file)
    assert set(ours) == set(ref)
    for name, t in ref.items():
        assert np.asarray(ours[name].data).tobytes() == np.asarray(t.data).tobytes(), name
    assert any("3 multi-token-prediction (nextn) layer tensors left out" in n for n in res.notes), res.notes


def test_expert_groups(tmp_path: Path) -> None:
    """16 experts in 4 groups keeping 2 (one MoE layer): the group keys written, f32 logits in llama.cpp
    = transformers', whose logits without the groups differ beyond the tolerance (so the groups count)."""
    from transformers import Glm4MoeForCausalLM

    need_llama_cpp()
    case = _case(tmp_path, "glm4_moe (n_group 4, topk_group 2)", n_group=4, topk_group=2, num_hidden_layers=2)
    r = gguf.GGUFReader(case.export("f32").gguf_file)
    assert r.fields["glm4moe.expert_group_count"].contents() == 4 and r.fields["glm4moe.expert_group_used_count"].contents() == 2
    check_logits(case, "f32")
    ungrouped = Glm4MoeForCausalLM.from_pretrained(case.merged, dtype=torch.float32, n_group=1, topk_group=1).eval()
    with torch.no_grad():
        other = ungrouped(input_ids=torch.tensor([case.ids])).logits[0].numpy()
    assert np.abs(other - case.ref).max() > 1e-2 * np.abs(case.ref).max()


def test_refused() -> None:
    """A ``topk_group`` llama.cpp asserts against (all groups kept): one line."""
    ok = _config().to_dict()
    gguf_arch_for(ok)
    gguf_arch_for({**ok, "n_group": 4, "topk_group": 2})
    with pytest.raises(UnsupportedModelError, match="topk_group=4 of n_group=4") as e:
        gguf_arch_for({**ok, "n_group": 4, "topk_group": 4})
    assert "\n" not in str(e.value)
