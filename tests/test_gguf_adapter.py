"""GGUF LoRA adapters: metadata and tensors read back with gguf-py against the PEFT adapter files,
logits of llama.cpp (base GGUF + adapter GGUF) against the unmerged PeftModel, and refusals.

Models: a tiny Llama (4 heads, 2 KV heads, untied output, so Q/K permutes and embedding/lm_head
LoRA apply) and a tiny Qwen2 (no permute, q/k/v biases, tied embeddings), each with a byte-level
BPE tokenizer. The base GGUF is ``export_gguf(base, [], out, type="f32")``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from peft import IA3Config, LoHaConfig, LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import _models as M
from lorasave.errors import AdapterMismatchError, InvalidOptionError, UnsupportedAdapterError
from lorasave.formats.gguf.adapter import GgufAdapterResult, export_gguf_adapter
from lorasave.formats.gguf.export import export_gguf

TEXT = "A LoRA adapter adds a low-rank update B @ A to some weights; llama.cpp applies it at run time. " * 6
VOCAB = 256
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
N_HEAD, N_KV = 4, 2
GGUF_NAMES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}


def _tokenizer() -> PreTrainedTokenizerFast:
    return M.build_byte_bpe_tokenizer(TEXT, VOCAB)


def _base(root: Path, kind: str) -> Path:
    torch.manual_seed(0 if kind == "llama" else 1)
    tok = _tokenizer()
    common: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=N_HEAD,
        num_key_value_heads=N_KV,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=0.1,
    )
    if kind == "llama":
        model: torch.nn.Module = LlamaForCausalLM(LlamaConfig(intermediate_size=128, tie_word_embeddings=False, **common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(intermediate_size=80, tie_word_embeddings=True, **common))
    path = root / f"{kind}-base"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _adapter(base: Path, path: Path, cfg: Any, seed: int, *, train: bool = True) -> Path:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if train:
        peft_model = M.train_lora(model, cfg, seed=seed, steps=10, lr=2e-2)
    else:
        peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(path)
    return path


def _lora(**kw: Any) -> LoraConfig:
    kw.setdefault("r", 8)
    kw.setdefault("lora_alpha", 16)
    return LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **kw)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Bases, their f32 GGUFs, trained adapters and the ids every logits test uses."""
    root = tmp_path_factory.mktemp("gguf_adapter")
    llama, qwen2 = _base(root, "llama"), _base(root, "qwen2")
    z: dict[str, Any] = {"root": root, "llama": llama, "qwen2": qwen2}
    z["ids"] = PreTrainedTokenizerFast.from_pretrained(llama)(TEXT, return_tensors="pt").input_ids[:, :48]
    adapters = {
        "plain": (llama, _lora(target_modules=[*ATTN, "gate_proj", "up_proj", "down_proj"])),
        "rslora": (llama, _lora(target_modules=ATTN, use_rslora=True, r=16, lora_alpha=8)),
        # 24/8 = 3 and 12/2 = 6 are not powers of two: a wrong fold shows in the logits
        "pattern": (
            llama,
            _lora(
                target_modules=[*ATTN, "down_proj"],
                rank_pattern={"q_proj": 4, "layers.1.self_attn.o_proj": 2},
                alpha_pattern={"v_proj": 24, "layers.1.self_attn.o_proj": 12},
            ),
        ),
        "embed": (llama, _lora(target_modules=["embed_tokens", "lm_head", "q_proj"], r=4, lora_alpha=8)),
        "qwen2_lora": (qwen2, _lora(target_modules=[*ATTN, "gate_proj", "down_proj"])),
    }
    for i, (name, (base, cfg)) in enumerate(adapters.items()):
        z[name] = _adapter(base, root / f"ad-{name}", cfg, seed=20 + i)
    return z


@pytest.fixture(scope="module")
def base_gguf(zoo: dict[str, Any]) -> dict[str, Path]:
    """``export_gguf`` with no adapter: the base alone, f32."""
    return {kind: export_gguf(zoo[kind], [], zoo["root"] / f"gguf-{kind}", type="f32").gguf_file for kind in ("llama", "qwen2")}


@pytest.fixture(scope="module")
def exported(zoo: dict[str, Any]) -> dict[str, GgufAdapterResult]:
    out = {}
    for name in ("plain", "rslora", "pattern", "embed"):
        out[name] = export_gguf_adapter(zoo["llama"], zoo[name], zoo["root"] / f"out-{name}", type="f32")
    out["qwen2_lora"] = export_gguf_adapter(zoo["qwen2"], zoo["qwen2_lora"], zoo["root"] / "out-qwen2", type="f32")
    return out


def _peft_logits(base: Path, adapter: Path | None, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits[0]


def _llama_logits(base_gguf: Path, loras: list[tuple[Path, float]], ids: torch.Tensor) -> torch.Tensor:
    from _llama import need_llama_cpp

    need_llama_cpp()
    from lorasave.runtimes.llama_cpp.lib import LlamaCppModel

    with LlamaCppModel(base_gguf, loras=loras) as m:
        return torch.from_numpy(np.asarray(m.logits([int(i) for i in ids[0]]), dtype=np.float32))


def _fields(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}, {t.name: t for t in reader.tensors}


def _permute_rows(b: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp ``LlamaModel.permute`` on the rows of ``b`` (out, r), written out independently."""
    out, r = b.shape
    return b.reshape(n_head, 2, out // n_head // 2, r).transpose(1, 2).reshape(out, r)


# ----------------------------------------------------------------------- file contents


def test_metadata_names_shapes(zoo: dict[str, Any], exported: dict[str, GgufAdapterResult]) -> None:
    res = exported["plain"]
    # named as convert_lora_to_gguf.py names it: from the adapter folder (ad-plain), the type, then LoRA
    assert res.gguf_file == res.output / "Ad-Plain-F32-LoRA.gguf"
    kv, tensors = _fields(res.gguf_file)
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora" and kv["general.architecture"] == "llama"
    assert kv["adapter.lora.alpha"] == pytest.approx(16.0) and kv["general.name"] == "Ad Plain"
    assert not [k for k in kv if k.startswith(("llama.", "tokenizer."))]  # as convert_lora_to_gguf.py: no hparams, no vocab
    ab = M.adapter_weights(zoo["plain"])
    expect = {}
    for module, (a, b) in ab.items():
        layer, proj = module.split(".")[2], module.split(".")[-1]
        name = f"blk.{layer}.{GGUF_NAMES[proj]}.weight"
        expect[name + ".lora_a"] = tuple(a.shape[::-1])  # ggml ne: [in, r]
        expect[name + ".lora_b"] = tuple(b.shape[::-1])  # ggml ne: [r, out]
    assert {n: tuple(int(x) for x in t.shape) for n, t in tensors.items()} == expect
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())
    manifest = json.loads((res.output / "lorasave.json").read_text())
    assert manifest["command"] == "gguf-adapter" and manifest["files"][res.gguf_file.name]["bytes"] == res.total_bytes
    assert res.n_modules == len(ab) == 14 and res.folded == {}
    card = (res.output / "README.md").read_text()
    assert set(manifest["files"]) == {res.gguf_file.name, "README.md"} and f"--lora {res.gguf_file.name}" in card and "LoRA adapter" in card


def test_tensor_values_permute_and_fold(zoo: dict[str, Any], exported: dict[str, GgufAdapterResult]) -> None:
    """A as saved; B permuted (attn_q/attn_k, n_head_kv for k) and scaled so alpha_file/r·B' = PEFT scaling·B."""
    for name in ("plain", "rslora", "pattern"):
        scalings = M.peft_scalings(zoo["llama"], zoo[name])  # PEFT's own per-module scaling
        kv, tensors = _fields(exported[name].gguf_file)
        alpha = kv["adapter.lora.alpha"]
        for module, (a, b) in M.adapter_weights(zoo[name]).items():
            layer, proj = module.split(".")[2], module.split(".")[-1]
            g = f"blk.{layer}.{GGUF_NAMES[proj]}.weight"
            r = a.shape[0]
            want_b = b * (scalings[module] * r / alpha)
            if proj in ("q_proj", "k_proj"):
                want_b = _permute_rows(want_b, N_HEAD if proj == "q_proj" else N_KV)
            np.testing.assert_array_equal(np.asarray(tensors[g + ".lora_a"].data), a.numpy(), err_msg=g)
            np.testing.assert_allclose(np.asarray(tensors[g + ".lora_b"].data), want_b.numpy(), rtol=1e-6, atol=1e-7, err_msg=g)
    assert set(exported["pattern"].folded) == {"blk.0.attn_v.weight", "blk.1.attn_v.weight", "blk.1.attn_output.weight"}
    # rsLoRA r=16, alpha=8: PEFT scales by 8/4, llama.cpp by 8/16, so every B carries sqrt(16) = 4
    assert set(exported["rslora"].folded.values()) == {4.0} and len(exported["rslora"].folded) == 8


@pytest.mark.parametrize("type", ["f16", "q8_0"])
def test_types(zoo: dict[str, Any], type: str) -> None:
    res = export_gguf_adapter(zoo["llama"], zoo["plain"], zoo["root"] / f"types-{type}", type=type)
    _, tensors = _fields(res.gguf_file)
    for name, t in tensors.items():
        ne0 = int(t.shape[0])
        want = gguf.GGMLQuantizationType.F16 if type == "f16" or ne0 % 32 else gguf.GGMLQuantizationType.Q8_0
        assert t.tensor_type == want, name  # lora_b rows are r = 8: the converter's F16 fallback
    if type == "q8_0":
        assert res.tensor_types == {"Q8_0": 14, "F16": 14} and any("F16" in n for n in res.notes)


# -------------------------------------------------------------------------- llama.cpp


def _check_close(got: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-3 * ref.abs().max().item(), f"max abs diff {diff} vs max |logit| {ref.abs().max().item()}"
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    return diff


@pytest.mark.parametrize("name", ["plain", "rslora", "pattern", "embed", "qwen2_lora"])
def test_llama_cpp_matches_peft(zoo: dict[str, Any], base_gguf: dict[str, Path], exported: dict[str, GgufAdapterResult], name: str) -> None:
    kind = "qwen2" if name == "qwen2_lora" else "llama"
    ids = zoo["ids"]
    ref = _peft_logits(zoo[kind], zoo[name], ids)
    base_ref = _peft_logits(zoo[kind], None, ids)
    moved = (ref - base_ref).abs().max().item()
    assert moved > 50 * 1e-3 * ref.abs().max().item()  # the adapter matters far beyond the tolerance
    got = _llama_logits(base_gguf[kind], [(exported[name].gguf_file, 1.0)], ids)
    _check_close(got, ref)


def test_llama_cpp_scale_zero_is_base(zoo: dict[str, Any], base_gguf: dict[str, Path], exported: dict[str, GgufAdapterResult]) -> None:
    ids = zoo["ids"]
    plain = _llama_logits(base_gguf["llama"], [], ids)
    _check_close(plain, _peft_logits(zoo["llama"], None, ids))
    zero = _llama_logits(base_gguf["llama"], [(exported["plain"].gguf_file, 0.0)], ids)
    assert (zero - plain).abs().max().item() <= 1e-5 * plain.abs().max().item()


# --------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def refused(zoo: dict[str, Any]) -> dict[str, Path]:
    """Untrained adapters the format cannot express (the refusal does not look at values)."""
    llama, qwen2, root = zoo["llama"], zoo["qwen2"], zoo["root"]
    cfgs: dict[str, tuple[Path, Any]] = {
        "dora": (llama, _lora(target_modules=["q_proj"], use_dora=True)),
        "modules_to_save": (llama, _lora(target_modules=["q_proj"], modules_to_save=["lm_head"])),
        "tokens": (llama, _lora(target_modules=["q_proj"], trainable_token_indices=[3, 5])),
        "lora_bias": (llama, _lora(target_modules=["q_proj"], lora_bias=True)),
        "loha": (llama, LoHaConfig(r=4, alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM")),
        "ia3": (llama, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM")),
        "tied_embed": (qwen2, _lora(target_modules=["embed_tokens", "q_proj"])),
    }
    return {name: _adapter(base, root / f"refused-{name}", cfg, 0, train=False) for name, (base, cfg) in cfgs.items()}


@pytest.mark.parametrize(
    "name,match",
    [
        ("dora", "DoRA"),
        ("modules_to_save", "lm_head"),
        ("tokens", "trainable_token_indices"),
        ("lora_bias", "lora_bias"),
        ("loha", "LOHA"),
        ("ia3", "IA3"),
        ("tied_embed", "ties"),
    ],
)
def test_refusals(zoo: dict[str, Any], refused: dict[str, Path], name: str, match: str) -> None:
    base = zoo["qwen2"] if name == "tied_embed" else zoo["llama"]
    out = zoo["root"] / f"refused-out-{name}"
    with pytest.raises(UnsupportedAdapterError, match=match) as info:
        export_gguf_adapter(base, refused[name], out)
    msg = str(info.value)
    assert "\n" not in msg and "lorasave gguf BASE ADAPTER" in msg
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_refuses_several_adapters_bad_type_and_wrong_base(zoo: dict[str, Any]) -> None:
    out = zoo["root"] / "refused-multi"
    with pytest.raises(UnsupportedAdapterError, match="lorasave gguf BASE ADAPTER"):
        export_gguf_adapter(zoo["llama"], [zoo["plain"], zoo["rslora"]], out)
    with pytest.raises(InvalidOptionError, match="q4_k_m"):
        export_gguf_adapter(zoo["llama"], zoo["plain"], out, type="q4_k_m")
    with pytest.raises(AdapterMismatchError):  # the error merge gives: Qwen2's gate_proj (80 wide) does not fit Llama's (128)
        export_gguf_adapter(zoo["llama"], zoo["qwen2_lora"], out)
    assert not out.exists()


def test_cli_refusal_one_line(zoo: dict[str, Any], refused: dict[str, Path]) -> None:
    out = zoo["root"] / "cli-dora"
    proc = subprocess.run(
        [sys.executable, "-m", "lorasave", "gguf-adapter", str(zoo["llama"]), str(refused["dora"]), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "DoRA" in lines[0] and "lorasave gguf BASE ADAPTER" in lines[0], proc.stderr
    assert not out.exists()


def test_cli_writes_same_file(zoo: dict[str, Any], exported: dict[str, GgufAdapterResult]) -> None:
    out = zoo["root"] / "out-plain-cli"
    args = [str(zoo["llama"]), str(zoo["plain"]), "-o", str(out), "--type", "f32", "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "lorasave", "gguf-adapter", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["n_modules"] == 14 and Path(doc["gguf_file"]).read_bytes() == exported["plain"].gguf_file.read_bytes()
