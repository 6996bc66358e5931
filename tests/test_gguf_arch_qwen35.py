"""GGUF export of Qwen3.5 dense and MoE (issue 14): llama.cpp's ``qwen35`` / ``qwen35moe``, run in llama.cpp
against transformers on the float32 merge (``_gguf_check``).

Two tiny models, with a LoRA on the full attention (``q_proj``... with its output gate), the Gated DeltaNet
projections (``in_proj_qkv``, ``in_proj_z``, ``in_proj_a``, ``in_proj_b``, ``out_proj``) and the MLP / the
shared expert and the fused routed experts (PEFT ``target_parameters``):

* ``qwen3_5_text`` (``Qwen3_5ForCausalLM``), the relations of Qwen3.5-9B: three linear-attention layers,
  then one full (``full_attention_interval`` 4); head_dim x heads = hidden with 4:1 GQA; partial rotary
  0.25 with M-RoPE sections summing to the rotated half ([2, 1, 1] for [11, 11, 10]); linear attention with
  twice as many value heads as key heads (32 / 16), head size hidden / value heads; MLP 3 x hidden;
* ``qwen3_5_moe`` (``Qwen3_5MoeForConditionalGeneration``, its language model; a one-block vision tower),
  the relations of Qwen3.5-35B-A3B: top-4 of 16 experts (8 of 256) plus the sigmoid-gated shared expert of
  the routed size.

Also checked, bit for bit against the converter's transforms written out here from its source
(``_LinearAttentionVReorderBase`` / ``Qwen3NextModel.modify_tensors``) on the merged checkpoint: the V-head
reorder of rows and columns, ``-exp(A_log)``, ``dt_bias``, the squeezed ``conv1d``, the RMSNorms ``+1`` but
the gated one; the keys; the ``mtp.*`` block left out (``--no-mtp``); the refusals.
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
from transformers import AutoModelForImageTextToText, Qwen3_5ForCausalLM, Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration, Qwen3_5TextConfig

from _gguf_check import GgufCase, build_case, check_logits
from _gguf_dense import fields, tensors
from _llama import need_llama_cpp
from _models import build_bpe_tokenizer
from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf.arch import gguf_arch_for
from lorasave.formats.gguf.export import export_gguf

Q = gguf.GGMLQuantizationType
LINEAR = ["in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"]
#: Linear-attention sizes: 2 key heads and 4 value heads of 32 (Qwen3.5: 16 and 32 of 128).
NK, NV, HD = 2, 4, 32


def _text(**extra: Any) -> dict[str, Any]:
    rope = {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1], "mrope_interleaved": True}
    return dict(
        vocab_size=320, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=32, rope_parameters=rope,
        linear_num_key_heads=NK, linear_num_value_heads=NV, linear_key_head_dim=HD, linear_value_head_dim=HD, linear_conv_kernel_dim=4,
        max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.1, bos_token_id=0, eos_token_id=0, pad_token_id=0, **extra,
    )  # fmt: skip


def _dense() -> Qwen3_5TextConfig:
    return Qwen3_5TextConfig(**_text(intermediate_size=384), tie_word_embeddings=False)


def _moe() -> Qwen3_5MoeConfig:
    text = _text(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=128, num_position_embeddings=16, patch_size=8)
    ids = {"image_token_id": 1, "video_token_id": 2, "vision_start_token_id": 1, "vision_end_token_id": 2}
    return Qwen3_5MoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Norm weights away from their init (zero-centred ones near 0, the gated ``linear_attn.norm`` near 1) and
    distinct per-head ``dt_bias`` / ``A_log``, so a tensor written to the wrong place or head shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("linear_attn.norm.weight"):
                p.normal_(1.0, 0.1)
            elif "norm" in name and "visual" not in name:
                p.normal_(0.0, 0.1)
            elif name.endswith(("dt_bias", "A_log")):
                p.normal_(0.0, 1.0)
    return model.eval()


def _case(root: Path, kind: str, model: torch.nn.Module, lora: LoraConfig, **kw: Any) -> GgufCase:
    need_llama_cpp()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_case(root, kind, _perturb(model), build_bpe_tokenizer("qwen2"), lora, pretrain_steps=30, **kw)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> GgufCase:
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", *LINEAR, "gate_proj", "up_proj", "down_proj"])
    return _case(tmp_path_factory.mktemp("qwen35"), "qwen3_5_text", Qwen3_5ForCausalLM(_dense()), lora)


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> GgufCase:
    torch.manual_seed(0)
    modules = "|".join(["q_proj", "v_proj", "o_proj", *LINEAR, "gate_proj", "up_proj", "down_proj"])
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=rf".*language_model.*\.({modules})",
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )  # fmt: skip
    model = Qwen3_5MoeForConditionalGeneration(_moe())
    return _case(tmp_path_factory.mktemp("qwen35moe"), "qwen3_5_moe", model, lora, auto=AutoModelForImageTextToText)


@pytest.mark.parametrize("type", ["f32", "q8_0"])
def test_dense_logits(dense: GgufCase, type: str) -> None:
    check_logits(dense, type)


@pytest.mark.parametrize("type", ["f32", "q8_0"])
def test_moe_logits(moe: GgufCase, type: str) -> None:
    check_logits(moe, type)


def _reorder(x: np.ndarray, axis: int, head_dim: int) -> np.ndarray:
    """``_LinearAttentionVReorderBase._reorder_v_heads``: value heads grouped by key head -> tiled."""
    shape = list(x.shape)
    y = x.reshape(*shape[:axis], NK, NV // NK, head_dim, *shape[axis + 1 :])
    return np.swapaxes(y, axis, axis + 1).reshape(shape)


def _converter(name: str, w: np.ndarray) -> tuple[str, np.ndarray]:
    """The converter's transforms of one merged linear-attention / norm tensor: (renamed HF name, values)."""
    qk = 2 * NK * HD
    if name.endswith("in_proj_qkv.weight"):
        w = np.concatenate([w[:qk], _reorder(w[qk:], 0, HD)])
    elif name.endswith("in_proj_z.weight"):
        w = _reorder(w, 0, HD)
    elif name.endswith(("in_proj_a.weight", "in_proj_b.weight")):
        w = _reorder(w, 0, 1)
    elif name.endswith("out_proj.weight"):
        w = _reorder(w, 1, HD)
    elif name.endswith("conv1d.weight"):
        w = w.squeeze()
        w = np.concatenate([w[:qk], _reorder(w[qk:], 0, HD)])
    elif name.endswith("A_log"):
        w = (-torch.exp(torch.from_numpy(_reorder(w, 0, 1)))).numpy()  # torch's exp, as the converter
    elif name.endswith("dt_bias"):
        w, name = _reorder(w, 0, 1), name.replace("dt_bias", "dt_proj.bias")
    elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        w = w + np.float32(1)
    return name, w


def test_tensors(dense: GgufCase) -> None:
    """Every transformed tensor of the f32 file = the converter's transform of the merged checkpoint, bit for bit;
    the LoRA changed them (so the merge comes before the reorder); layer 3 is full attention."""
    got = tensors(dense.export("f32").gguf_file)
    merged = load_file(dense.merged / "model.safetensors")
    base = load_file(dense.base / "model.safetensors")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN35, 4)
    checked = 0
    for hf, t in merged.items():
        if ".linear_attn." not in hf and not hf.endswith("norm.weight"):
            continue
        mapped, want = _converter(hf, t.numpy())
        gname = names.get_name(mapped, try_suffixes=(".weight", ".bias"))
        np.testing.assert_array_equal(got[gname], want.astype(np.float32), err_msg=f"{hf} -> {gname}")
        checked += 1
        if hf.rsplit(".", 2)[-2] in LINEAR:
            assert not torch.equal(t, base[hf]), f"the LoRA did not change {hf}"
    assert checked == 3 * 11 + 4 + 1, checked
    assert got["blk.0.ssm_conv1d.weight"].shape == (2 * NK * HD + NV * HD, 4) and got["blk.0.ssm_a"].shape == (NV,)
    assert "blk.3.attn_q.weight" in got and "blk.3.ssm_a" not in got and "blk.0.attn_q.weight" not in got
    q8 = {t.name: Q(t.tensor_type) for t in gguf.GGUFReader(dense.export("q8_0").gguf_file).tensors}
    assert q8["blk.0.ssm_conv1d.weight"] is Q.F32 and q8["blk.0.ssm_a"] is Q.F32 and q8["blk.0.attn_qkv.weight"] is Q.Q8_0


def test_keys(dense: GgufCase, moe: GgufCase) -> None:
    """``Qwen3NextModel.set_gguf_parameters`` (SSM keys, recurrent layers, rotary dimensions) and the MoE keys;
    the MoE file holds the stacked experts, the shared expert and its gate, and no vision tensor."""
    f = fields(dense.export("f32").gguf_file)
    assert f["general.architecture"] == "qwen35"
    want = {
        "ssm.conv_kernel": 4, "ssm.state_size": HD, "ssm.group_count": NK, "ssm.time_step_rank": NV, "ssm.inner_size": NV * HD,
        "attention.recurrent_layers": [True, True, True, False], "full_attention_interval": 4, "rope.dimension_count": 8,
        "rope.dimension_sections": [2, 1, 1, 0], "feed_forward_length": 384, "attention.key_length": 32, "block_count": 4,
    }  # fmt: skip
    assert {k: f[f"qwen35.{k}"] for k in want} == want
    assert "qwen35.nextn_predict_layers" not in f
    m = fields(moe.export("f32").gguf_file)
    assert m["general.architecture"] == "qwen35moe"
    assert {k: m[f"qwen35moe.{k}"] for k in ("expert_count", "expert_used_count", "expert_feed_forward_length", "expert_shared_feed_forward_length")} == {
        "expert_count": 16, "expert_used_count": 4, "expert_feed_forward_length": 32, "expert_shared_feed_forward_length": 32,
    }  # fmt: skip
    got = tensors(moe.export("f32").gguf_file)
    assert got["blk.0.ffn_gate_exps.weight"].shape == (16, 32, 128) and got["blk.0.ffn_gate_inp_shexp.weight"].shape == (1, 128)
    assert "blk.0.ffn_up_shexp.weight" in got and not any(n.startswith(("v.", "mm.")) for n in got)
    assert any("vision/audio/projector tensors left out" in n for n in moe.export("f32").notes)


def test_mtp_left_out(dense: GgufCase, tmp_path: Path) -> None:
    """A checkpoint with Qwen3.5's MTP block (``mtp.*``, which transformers does not load) gives the same file
    as without it (``--no-mtp``), with a note."""
    base = tmp_path / "base"
    shutil.copytree(dense.base, base)
    state = load_file(base / "model.safetensors")
    state["mtp.fc.weight"] = torch.zeros(128, 256)
    state["mtp.pre_fc_norm_embedding.weight"] = torch.zeros(128)
    state["mtp.layers.0.mlp.up_proj.weight"] = torch.zeros(384, 128)
    save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    res = export_gguf(base, dense.lora, tmp_path / "out", type="f32", modelfile=False)
    ours, ref = tensors(res.gguf_file), tensors(dense.export("f32").gguf_file)
    assert ours.keys() == ref.keys()
    for name, t in ref.items():
        assert ours[name].tobytes() == t.tobytes(), name
    assert any("3 multi-token-prediction (nextn) layer tensors left out" in n for n in res.notes), res.notes


def test_imatrix_columns(dense: GgufCase, tmp_path: Path) -> None:
    """``lorasave imatrix``: the entry of ``ssm_out`` (whose columns the converter reorders) has its inputs'
    squares in the GGUF file's column order, as llama-imatrix records them on that file."""
    from transformers import AutoTokenizer

    from _models import GGUF_CORPUS
    from lorasave.formats.gguf.calibrate import adds_bos, compute_imatrix, tokenize_chunks
    from lorasave.formats.gguf.imatrix import load_imatrix

    text = tmp_path / "text.txt"
    text.write_text(GGUF_CORPUS, encoding="utf-8")
    res = compute_imatrix(dense.base, dense.lora, tmp_path / "imx", text=text, chunk_size=16, chunks=1)
    got = load_imatrix(res.output).entries
    tok = AutoTokenizer.from_pretrained(dense.base)
    (ids,), _ = tokenize_chunks(tok, GGUF_CORPUS, 16, 1, adds_bos(dense.base, tok), tok.bos_token_id)
    hf = Qwen3_5ForCausalLM.from_pretrained(dense.merged, dtype=torch.float32).eval()
    seen: list[torch.Tensor] = []
    hf.model.layers[0].linear_attn.out_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, NV * HD)))
    with torch.no_grad():
        hf(input_ids=torch.tensor([ids]), use_cache=False)
    want = (seen[0].double() ** 2).sum(0).numpy()
    np.testing.assert_allclose(got["blk.0.ssm_out.weight"].sums[0], _reorder(want, 0, HD), rtol=2e-5, atol=1e-6)
    assert not np.allclose(got["blk.0.ssm_out.weight"].sums[0], want, rtol=2e-5, atol=1e-6)


def test_adapter_refused(dense: GgufCase, tmp_path: Path) -> None:
    """A GGUF LoRA adapter cannot carry the V-head reorder of a linear-attention projection: one line."""
    from lorasave.errors import UnsupportedAdapterError
    from lorasave.formats.gguf.adapter import export_gguf_adapter

    with pytest.raises(UnsupportedAdapterError, match=r"linear_attn\.in_proj_\w+\.weight, whose values llama.cpp's converter transforms") as e:
        export_gguf_adapter(dense.base, dense.lora, tmp_path / "a", type="f32")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"linear_value_head_dim": 64}, "ssm.state_size"),
        ({"attention_bias": True}, "attention output bias"),
        ({"hidden_act": "gelu"}, "SiLU"),
        ({"linear_num_value_heads": 3}, "multiple of linear_num_key_heads"),
    ],
)
def test_refused(change: dict[str, Any], match: str) -> None:
    """What llama.cpp's qwen35 would not load or run as transformers does: one line."""
    ok = _dense().to_dict()
    gguf_arch_for(ok)
    gguf_arch_for(_moe().to_dict())
    with pytest.raises(UnsupportedModelError, match=match) as e:
        gguf_arch_for({**ok, **change})
    assert "\n" not in str(e.value)


def test_verify_passes(dense: GgufCase, moe: GgufCase) -> None:
    """``lorasave verify`` undoes the transforms (V-head reorder, squeeze, rename, norms ``+1``) or says which it cannot."""
    from lorasave.verify.run import verify

    for case in (dense, moe):
        for type in ("f32", "q8_0"):
            report = verify(case.export(type).output)
            print(report.summary())
            assert report.ok, report.summary()
