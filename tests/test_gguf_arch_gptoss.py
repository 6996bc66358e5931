"""GGUF export of gpt-oss (issue 14): a tiny ``GptOssForCausalLM`` with a LoRA on attention and on
the fused experts (PEFT ``target_parameters``), run in llama.cpp against transformers on the float32
merge (``_gguf_check``).

Besides the logits, checked against references that are not lorasave's own numbers:

* ``ffn_{gate,up}_exps`` (+ biases) = the merged ``gate_up_proj`` transposed and de-interleaved (even
  columns gate, odd up), ``ffn_down_exps`` = ``down_proj`` transposed: ``GptOssModel.modify_tensors``
  for float experts; ``attn_sinks``, the router with its bias, the keys of ``set_gguf_parameters``;
* what ``openai-moe.cpp`` hard-codes is refused in one line.

The config keeps gpt-oss-20b's relations at a tiny size: 32 experts, top-4, ``intermediate_size`` =
``hidden_size``, head_dim * heads = 2 x hidden (4096 / 2880 there), 8:1 GQA, sliding / full
layers alternating, a sliding window shorter than the text, YaRN (factor 32 there; ``truncate``
true here: llama.cpp always rounds the correction range, see ``arch.gptoss``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

from _gguf_check import GgufCase, build_case, check_logits
from _llama import need_llama_cpp
from _models import build_bpe_tokenizer
from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch import gguf_arch_for

Q = gguf.GGMLQuantizationType
ROPE = {
    "rope_type": "yarn",
    "factor": 4.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": True,
    "original_max_position_embeddings": 64,
    "rope_theta": 150000.0,
}


def _gpt_oss(vocab: int) -> Any:
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=64, head_dim=16, num_attention_heads=8, num_key_value_heads=1, num_local_experts=32,
        num_experts_per_tok=4, sliding_window=32, num_hidden_layers=2, max_position_embeddings=256, initializer_range=0.1, rope_parameters=dict(ROPE),
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return GptOssForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> GgufCase:
    need_llama_cpp()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        tok = build_bpe_tokenizer("qwen2")
        model = _gpt_oss(len(tok))
        lora = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
        )
        return build_case(tmp_path_factory.mktemp("gpt_oss"), "gpt_oss", model, tok, lora, pretrain_steps=30)
    finally:
        torch.set_num_threads(threads)


def _tensors(path: Path) -> dict[str, Any]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_logits(gpt_oss: GgufCase) -> None:
    """f32 and q8_0 in llama.cpp against transformers on the float32 merge (attention and experts LoRA'd)."""
    check_logits(gpt_oss, "f32")
    check_logits(gpt_oss, "q8_0")


def test_experts_split_as_the_converter(gpt_oss: GgufCase) -> None:
    """The fused experts of the merge split as ``GptOssModel.modify_tensors`` does (transpose, even/odd
    rows), biases likewise; sinks, router, keys; the expert LoRA changed every expert."""
    merged, base = load_file(gpt_oss.merged / "model.safetensors"), load_file(gpt_oss.base / "model.safetensors")
    path = gpt_oss.export("f32").gguf_file
    got = _tensors(path)
    for layer in range(2):
        pre = f"model.layers.{layer}.mlp.experts"
        gate_up, down = merged[f"{pre}.gate_up_proj"], merged[f"{pre}.down_proj"]
        assert all(not torch.equal(gate_up[k], base[f"{pre}.gate_up_proj"][k]) for k in range(32))
        t = gate_up.transpose(-1, -2)
        want = {
            "ffn_gate_exps.weight": t[:, ::2, :],
            "ffn_up_exps.weight": t[:, 1::2, :],
            "ffn_down_exps.weight": down.transpose(-1, -2),
            "ffn_gate_exps.bias": merged[f"{pre}.gate_up_proj_bias"][..., ::2],
            "ffn_up_exps.bias": merged[f"{pre}.gate_up_proj_bias"][..., 1::2],
            "ffn_down_exps.bias": merged[f"{pre}.down_proj_bias"],
            "attn_sinks.weight": merged[f"model.layers.{layer}.self_attn.sinks"],
            "ffn_gate_inp.weight": merged[f"model.layers.{layer}.mlp.router.weight"],
            "ffn_gate_inp.bias": merged[f"model.layers.{layer}.mlp.router.bias"],
            "post_attention_norm.weight": merged[f"model.layers.{layer}.post_attention_layernorm.weight"],
        }
        for name, w in want.items():
            np.testing.assert_array_equal(np.asarray(got[f"blk.{layer}.{name}"].data), w.contiguous().numpy(), err_msg=name)
    r = gguf.GGUFReader(path)
    cfg = json.loads((gpt_oss.base / "config.json").read_text())
    field = {k: r.fields[f"gpt-oss.{k}"].contents() for k in ("attention.sliding_window", "expert_count", "expert_used_count", "expert_feed_forward_length")}
    assert field == {"attention.sliding_window": 32, "expert_count": 32, "expert_used_count": 4, "expert_feed_forward_length": cfg["intermediate_size"]}
    assert r.fields["general.architecture"].contents() == "gpt-oss"
    assert r.fields["gpt-oss.rope.scaling.type"].contents() == "yarn"
    assert r.fields["gpt-oss.rope.scaling.original_context_length"].contents() == 64
    q8 = _tensors(gpt_oss.export("q8_0").gguf_file)
    assert Q(q8["blk.0.ffn_gate_inp.weight"].tensor_type) is Q.F32 and Q(q8["blk.0.attn_sinks.weight"].tensor_type) is Q.F32
    assert Q(q8["blk.0.ffn_up_exps.weight"].tensor_type) is Q.Q8_0


def test_mxfp4_moe_bit_identical(gpt_oss: GgufCase) -> None:
    """``mxfp4_moe`` writes the merged experts as MXFP4: every tensor's type and bytes as
    ``llama_model_quantize`` of the f32 file; each file notes its experts' type (float merge, not the
    checkpoint's MXFP4 blocks)."""
    from lorasave.runtimes.llama_cpp import lib as llama_cpp

    res = gpt_oss.export("mxfp4_moe")
    ours = _tensors(res.gguf_file)
    dst = gpt_oss.root / "llama-mxfp4_moe.gguf"
    llama_cpp.quantize(gpt_oss.export("f32").gguf_file, dst, "mxfp4_moe")
    theirs = _tensors(dst)
    assert set(ours) == set(theirs)
    for name, t in ours.items():
        assert t.tensor_type == theirs[name].tensor_type, (name, t.tensor_type.name, theirs[name].tensor_type.name)
        assert np.asarray(t.data).tobytes() == np.asarray(theirs[name].data).tobytes(), name
    assert Q(ours["blk.0.ffn_gate_exps.weight"].tensor_type) is Q.MXFP4 and Q(ours["blk.0.ffn_gate_exps.bias"].tensor_type) is Q.F32
    assert any(n.startswith("gpt-oss experts written as MXFP4 ") for n in res.notes), res.notes
    assert any(n.startswith("gpt-oss experts written as Q8_0 ") for n in gpt_oss.export("q8_0").notes)


def test_mxfp4_checkpoint_refused(gpt_oss: GgufCase, tmp_path: Path) -> None:
    """OpenAI's published checkpoints keep the experts as MXFP4 ``_blocks`` / ``_scales`` (``quant_method``
    ``mxfp4``): refused in one line naming it (the merge needs the float experts, e.g. a BF16 copy)."""
    import shutil

    from lorasave.formats.gguf.export import export_gguf

    base = tmp_path / "base"
    shutil.copytree(gpt_oss.base, base)
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(
        json.dumps({**cfg, "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}})
    )
    with pytest.raises(UnsupportedModelError, match="mxfp4") as e:
        export_gguf(base, gpt_oss.lora, tmp_path / "out", type="f32", modelfile=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
        ({"swiglu_limit": 10.0}, "swiglu"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"sliding_window": None}, "sliding_window"),
    ],
)
def test_refused_configs(change: dict[str, Any], match: str) -> None:
    """What llama.cpp's gpt-oss graph hard-codes: refused in one line."""
    cfg = {"model_type": "gpt_oss", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8, "sliding_window": 32, "rope_parameters": dict(ROPE)}
    gguf_arch_for(cfg)
    with pytest.raises(UnsupportedModelError, match=match) as e:
        gguf_arch_for({**cfg, **change})
    assert "\n" not in str(e.value)
