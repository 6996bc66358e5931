"""compressed-tensors save methods (issue 16): bit-identical to the reference quantization, loadable by transformers.

The reference for each scheme is what llm-compressor 0.14's ``oneshot`` writes for the same data-free
preset on the PEFT-merged model (PEFT ``merge_and_unload`` in float32, rounded to bfloat16): llm-
compressor is not a dependency (it pins older transformers), so the reference is rebuilt here the way
its memoryless min-max observer and ``QuantizationModifier`` do it, with compressed-tensors' own
``calculate_qparams`` / ``generate_gparam`` and compressors, written independently of lorasave's code
(per-group loops over row slices). lorasave's output was also compared once with a real ``oneshot``
run (llm-compressor 0.14.0.1 + compressed-tensors 0.19 on CPU): every tensor bit-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import _models as M
import lorasave

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.compressors.format import infer_module_format  # noqa: E402
from compressed_tensors.quantization import preset_name_to_scheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam  # noqa: E402

SCHEMES = {
    "fp8_dynamic": "FP8_DYNAMIC",
    "fp8_block": "FP8_BLOCK",
    "w8a16": "W8A16",
    "w4a16": "W4A16",
    "w8a8": "W8A8",
    "nvfp4a16": "NVFP4A16",
    "mxfp4a16": "MXFP4A16",
}
EIGHT_BIT = {"fp8_dynamic", "fp8_block", "w8a16", "w8a8"}
HIDDEN = 128  # group 128 / block 128 fit; k/v (64 rows) exercise the block padding
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _chain(seed: int, n: int = 24) -> torch.Tensor:
    """Sequences of a fixed random successor map over the vocabulary: learnable, so logits get peaked."""
    g = torch.Generator().manual_seed(seed)
    nxt = torch.randperm(M.VOCAB - 3, generator=g) + 3
    start = torch.randint(3, M.VOCAB, (8,), generator=g)
    rows = [start]
    for _ in range(n - 1):
        rows.append(nxt[rows[-1] - 3])
    return torch.stack(rows, 1)


def _fit(model: torch.nn.Module, ids: torch.Tensor, steps: int, lr: float) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Llama (hidden 128) trained on one successor chain, and a LoRA (all linear) trained on another."""
    root = tmp_path_factory.mktemp("serve")
    model = M.build_llama(5, hidden=HIDDEN)
    _fit(model, _chain(1), steps=12, lr=1e-2)
    model.save_pretrained(root / "base")
    M.build_tokenizer().save_pretrained(root / "base")
    torch.manual_seed(2)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"))
    _fit(peft, torch.cat([_chain(1), _chain(2)]), steps=10, lr=1e-2)
    peft.save_pretrained(root / "lora")
    return {"root": root, "base": root / "base", "lora": root / "lora"}


@pytest.fixture(scope="module")
def merged_bf16(case: dict[str, Path]) -> dict[str, torch.Tensor]:
    """The PEFT-merged model at the output precision: float32 ``merge_and_unload``, rounded to bfloat16."""
    base = AutoModelForCausalLM.from_pretrained(case["base"], dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, case["lora"]).merge_and_unload()
    return {k: v.to(torch.bfloat16) for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def peft_logits(case: dict[str, Path]) -> torch.Tensor:
    """The unmerged PeftModel (float32) on both chains."""
    base = AutoModelForCausalLM.from_pretrained(case["base"], dtype=torch.float32)
    return M.logits_of(PeftModel.from_pretrained(base, case["lora"]), _ids())


def _ids() -> torch.Tensor:
    return torch.cat([_chain(1)[:4], _chain(2)[:4]])


def _observe(w: torch.Tensor, args: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Min / max per scale, one slice at a time (the memoryless min-max observer of each strategy)."""
    strategy = str(getattr(args.strategy, "value", args.strategy))  # type: ignore[attr-defined]
    rows, cols = w.shape
    if strategy == "channel":
        return w.min(dim=1, keepdim=True).values, w.max(dim=1, keepdim=True).values
    if strategy in ("group", "tensor_group"):
        chunks = w.split(args.group_size, dim=1)  # type: ignore[attr-defined]
        return torch.stack([c.min(dim=1).values for c in chunks], 1), torch.stack([c.max(dim=1).values for c in chunks], 1)
    assert strategy == "block"
    bh, bw = args.block_structure  # type: ignore[attr-defined]
    nb_r, nb_c = -(-rows // bh), -(-cols // bw)
    mins = torch.zeros(nb_r, nb_c, dtype=w.dtype)
    maxs = torch.zeros(nb_r, nb_c, dtype=w.dtype)
    for i in range(nb_r):
        for j in range(nb_c):
            blk = w[i * bh : (i + 1) * bh, j * bw : (j + 1) * bw]
            pad = blk.numel() < bh * bw  # llm-compressor zero-pads partial blocks before observing
            mins[i, j] = torch.minimum(blk.min(), torch.zeros((), dtype=w.dtype)) if pad else blk.min()
            maxs[i, j] = torch.maximum(blk.max(), torch.zeros((), dtype=w.dtype)) if pad else blk.max()
    return mins, maxs


def _reference(state: dict[str, torch.Tensor], preset: str) -> dict[str, torch.Tensor]:
    """Every Linear but lm_head quantized as llm-compressor's oneshot does with ``preset``."""
    scheme = preset_name_to_scheme(preset, ["Linear"])
    compressor = BaseCompressor.get_value_from_registry(infer_module_format(torch.nn.Linear, scheme).value)
    modules = [k.removesuffix(".weight") for k in state if k.endswith("_proj.weight")]
    gscale: dict[str, torch.Tensor] = {}
    if preset == "NVFP4A16":
        for m in modules:
            parent, _, leaf = m.rpartition(".")
            group = next((f for f in FUSED if leaf in f), (leaf,))
            absmax = max(float(state[f"{parent}.{x}.weight"].abs().max()) for x in group)
            t = torch.tensor([absmax], dtype=torch.bfloat16)
            gscale[m] = generate_gparam(-t, t)
    out = {k: v for k, v in state.items() if k.removesuffix(".weight") not in modules}
    for m in modules:
        w = state[f"{m}.weight"]
        mn, mx = _observe(w, scheme.weights)
        scale, zp = calculate_qparams(mn, mx, scheme.weights, global_scale=gscale.get(m))
        sd = {"weight": w, "weight_scale": scale, "weight_zero_point": zp}
        if m in gscale:
            sd["weight_global_scale"] = gscale[m]
        out.update({f"{m}.{k}": v for k, v in compressor.compress(sd, scheme).items()})
    return out


def _margin_top1(got: torch.Tensor, ref: torch.Tensor, tol: float) -> tuple[float, int]:
    top2 = ref.topk(2, dim=-1).values
    keep = (top2[..., 0] - top2[..., 1]) > tol
    return float((got.argmax(-1)[keep] == ref.argmax(-1)[keep]).float().mean()), int(keep.sum())


@pytest.mark.parametrize("save_method", list(SCHEMES))
def test_scheme_bit_identical_and_loads(save_method: str, case: dict[str, Path], merged_bf16: dict[str, torch.Tensor], peft_logits: torch.Tensor) -> None:
    """Each quantized tensor and scale equals the reference bit for bit; transformers loads it; logits follow the PeftModel."""
    preset = SCHEMES[save_method]
    out = case["root"] / f"out-{save_method}"
    result = lorasave.merge(case["base"], case["lora"], out, dtype="bfloat16", save_method=save_method)
    assert preset in (result.quantization or "")
    got = M.read_tensors(out)
    ref = _reference(merged_bf16, preset)
    assert set(got) == set(ref)
    for k, r in ref.items():
        g = got[k]
        assert (g.dtype, g.shape) == (r.dtype, r.shape), k
        assert torch.equal(g.view(torch.uint8), r.contiguous().view(torch.uint8)), f"{k} differs from the reference"
    qc = M.read_json(out / "config.json")["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert qc["ignore"] == ["lm_head"]
    assert qc["format"] == infer_module_format(torch.nn.Linear, preset_name_to_scheme(preset, ["Linear"])).value
    manifest = M.read_json(out / "lorasave.json")
    assert manifest["settings"]["compressed_tensors"]["scheme"] == preset

    from transformers import CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    logits = M.logits_of(model, _ids())
    scale = float(peft_logits.abs().max())
    top1, n = _margin_top1(logits, peft_logits, 0.02 * scale)
    diff = float((logits - peft_logits).abs().max())
    total = peft_logits.shape[0] * peft_logits.shape[1]
    print(f"{save_method}: transformers (dequantize=True) vs PeftModel: max|diff| {diff / scale:.3f} x max|logit|, top-1 {top1:.3f} over {n} of {total} tokens")
    assert n >= total // 2
    assert top1 >= (0.99 if save_method in EIGHT_BIT else 0.85)


def test_nvfp4_global_scale_is_fused(case: dict[str, Path]) -> None:
    """q/k/v and gate/up share one NVFP4 global scale (vLLM fuses them); o_proj and down_proj have their own."""
    out = case["root"] / "out-nvfp4a16"
    if not out.exists():
        lorasave.merge(case["base"], case["lora"], out, dtype="bfloat16", save_method="nvfp4a16")
    t = M.read_tensors(out)
    p = "model.layers.0."
    g = {
        n: float(t[f"{p}{n}.weight_global_scale"])
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")
    }
    assert g["self_attn.q_proj"] == g["self_attn.k_proj"] == g["self_attn.v_proj"] != g["self_attn.o_proj"]
    assert g["mlp.gate_proj"] == g["mlp.up_proj"]


def test_live_and_cli_match_merge(case: dict[str, Path], tmp_path: Path) -> None:
    """``save_pretrained_merged(save_method="w4a16")`` and ``lorasave merge --save-method w4a16`` write the same weights as ``merge``."""
    from click.testing import CliRunner

    from lorasave.cli.main import main

    ref = case["root"] / "out-w4a16"
    if not ref.exists():
        lorasave.merge(case["base"], case["lora"], ref, dtype="bfloat16", save_method="w4a16")
    res = CliRunner().invoke(
        main, ["merge", str(case["base"]), str(case["lora"]), "-o", str(tmp_path / "cli"), "--dtype", "bfloat16", "--save-method", "w4a16"]
    )
    assert res.exit_code == 0, res.output
    base = AutoModelForCausalLM.from_pretrained(case["base"], dtype=torch.float32)
    live = PeftModel.from_pretrained(base, case["lora"])
    lorasave.save_pretrained_merged(live, tmp_path / "live", save_method="w4a16", dtype="bfloat16")
    want = M.read_tensors(ref)
    for folder in (tmp_path / "cli", tmp_path / "live"):
        got = M.read_tensors(folder)
        assert set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in want), folder.name
        assert json.loads((folder / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"


def test_odd_shapes_are_ignored() -> None:
    """A Linear whose input is not a multiple of the group stays 16-bit and goes to the ignore list; routers too."""
    from lorasave.formats.compressed import CompressedSpec, select_modules

    linear = ["a.q_proj", "a.o_proj", "mlp.gate", "lm_head"]
    shapes = {"a.q_proj": (64, 256), "a.o_proj": (64, 96), "mlp.gate": (8, 256), "lm_head": (10, 256)}
    chosen, ignore, notes = select_modules(CompressedSpec("w4a16"), linear, {"a.q_proj", "a.o_proj", "mlp.gate"}, shapes)
    assert chosen == {"a.q_proj"} and ignore == ["a.o_proj", "mlp.gate", "lm_head"] and "a.o_proj" in notes[0]
    chosen, _, notes = select_modules(CompressedSpec("fp8_dynamic"), linear, {"a.q_proj", "a.o_proj"}, shapes)
    assert chosen == {"a.q_proj", "a.o_proj"} and not notes
