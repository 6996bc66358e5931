"""``GgufArch.transforms`` (``arch.base.ValueTransform``): a converter value transform that needs the whole
tensor, applied by the streaming writer to the float32 merge before encoding.

The bundled tiny Llama with its LoRA, exported with made-up transforms on top of the ``llama`` rules: one
tensor negated (LoRA-merged, read in several row blocks), one split into two GGUF tensors of other
shapes, one on a Q/K-permuted tensor (transform first, then the permutation). Each written tensor must
equal the transform of the merged checkpoint's tensor, at f32 and at q8_0 (gguf-py's encoding).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lorasave
from lorasave.formats.gguf import arch
from lorasave.formats.gguf.arch.base import ValueTransform
from lorasave.formats.gguf.export import export_gguf
from lorasave.formats.gguf.model import permute_qk
from lorasave.merging import stream

ROOT = Path(__file__).resolve().parents[1] / "examples"

TRANSFORMS = (
    ValueTransform("mlp.down_proj.weight", (("mlp.down_proj.weight", lambda hp, w: -w),)),
    # two tensors from one: gguf-py maps both names; shapes differ from the source's
    ValueTransform(
        "mlp.up_proj.weight",
        (("mlp.up_proj.weight", lambda hp, w: w[: w.shape[0] // 2].T), ("mlp.gate_proj.weight", lambda hp, w: w[w.shape[0] // 2 :] * 2)),
    ),
    ValueTransform("self_attn.q_proj.weight", (("self_attn.q_proj.weight", lambda hp, w: w.flip(1)),)),
)


@pytest.mark.parametrize("type", ["f32", "q8_0"])
def test_value_transforms(type: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gates = frozenset(f"model.layers.{i}.mlp.gate_proj.weight" for i in range(2))  # the split of up_proj writes them
    rules = replace(arch.ARCHITECTURES["llama"], transforms=TRANSFORMS, drop=gates)
    monkeypatch.setitem(arch.ARCHITECTURES, "llama", rules)
    monkeypatch.setattr(stream, "MERGE_BLOCK_BYTES", 4096)  # merged tensors arrive in several row blocks
    monkeypatch.setattr(stream, "COPY_BLOCK_BYTES", 2048)
    base, lora = ROOT / "tiny-llama", ROOT / "tiny-llama-lora"
    merged = tmp_path / "merged"
    lorasave.merge(base, lora, merged, dtype="float32")
    m = load_file(merged / "model.safetensors")
    res = export_gguf(base, lora, tmp_path / "out", type=type, modelfile=False)
    got = {t.name: t for t in gguf.GGUFReader(res.gguf_file).tensors}
    q = gguf.GGMLQuantizationType.F32 if type == "f32" else gguf.GGMLQuantizationType.Q8_0

    def want(w: torch.Tensor) -> np.ndarray:
        x = w.contiguous().numpy()
        return x if type == "f32" else gguf.quants.quantize(x, q)

    for layer in range(2):
        pre = f"model.layers.{layer}"
        up = m[f"{pre}.mlp.up_proj.weight"]
        wq = permute_qk(m[f"{pre}.self_attn.q_proj.weight"].flip(1), 4, 4)
        cases = {
            "ffn_down": -m[f"{pre}.mlp.down_proj.weight"],
            "ffn_up": up[: up.shape[0] // 2].T,
            "ffn_gate": up[up.shape[0] // 2 :] * 2,
            "attn_q": wq,
        }
        for short, value in cases.items():
            t = got[f"blk.{layer}.{short}.weight"]
            assert list(reversed(t.shape.tolist())) == list(value.shape), short
            assert gguf.GGMLQuantizationType(t.tensor_type) is q
            np.testing.assert_array_equal(np.asarray(t.data).reshape(-1).view(np.uint8), want(value).reshape(-1).view(np.uint8), err_msg=short)
