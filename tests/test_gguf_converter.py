"""The GGUF fallback through llama.cpp's own converter (issue 15): architectures lorasave does not write
natively, converted by the pinned runtime's ``convert_hf_to_gguf.py`` in its own environment.

Three architectures outside ``arch.ARCHITECTURES`` that the runtime loads (Granite 4 hybrid: Mamba2 +
attention + MoE with a shared expert; Ernie 4.5; Arcee: ReLU² MLP), each a tiny model with a trained
LoRA: the f32 GGUF runs in llama.cpp and matches transformers on the float32 merge
(``_gguf_check.check_logits``), q8_0 reported, a llama-quantize type (q4_k_m) written from the f32
conversion. Their tokenizer is a SentencePiece ``tokenizer.model``: the converter reads byte-level
BPE tokenizers only when it knows their pre-tokenizer's hash (real ones), which no tiny tokenizer has.

Needs the converter (``lorasave install-llama-cpp --converter``): skipped without it, failed when
env CI is set (CI installs it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
from peft import LoraConfig

from _gguf_check import GgufCase, build_case, check_logits
from _llama import need_llama_cpp
from _models import build_spm_tokenizer
from lorasave.errors import LlamaCppConverterNotInstalledError, UnsupportedModelError
from lorasave.formats.gguf.arch import ARCHITECTURES
from lorasave.runtimes.llama_cpp import converter

LORA = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def need_converter() -> None:
    """Skip when llama.cpp's converter is not installed; fail instead when env CI is set (CI installs it)."""
    need_llama_cpp()
    if converter.is_installed():
        return
    msg = f"llama.cpp's converter is not installed in {converter.default_dir()}; install it with: {converter.INSTALL_COMMAND}"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def _granite_hybrid() -> Any:
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    cfg = GraniteMoeHybridConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=64,
        shared_intermediate_size=96,
        num_hidden_layers=2,
        layer_types=["mamba", "attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        mamba_n_heads=8,
        mamba_d_head=16,
        mamba_d_state=16,
        mamba_n_groups=1,
        mamba_expand=2,
        mamba_d_conv=4,
        mamba_chunk_size=32,
        position_embedding_type="nope",  # as Granite 4.0-H; the converter writes hybrid Granite without RoPE
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return GraniteMoeHybridForCausalLM(cfg)


def _ernie() -> Any:
    from transformers import Ernie4_5Config, Ernie4_5ForCausalLM

    cfg = Ernie4_5Config(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return Ernie4_5ForCausalLM(cfg)


def _arcee() -> Any:
    from transformers import ArceeConfig, ArceeForCausalLM

    cfg = ArceeConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return ArceeForCausalLM(cfg)


BUILDERS = {"granitemoehybrid": _granite_hybrid, "ernie4_5": _ernie, "arcee": _arcee}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> GgufCase:
    need_converter()
    model_type = request.param
    assert model_type not in ARCHITECTURES  # else this would not test the fallback
    root = tmp_path_factory.mktemp(model_type)
    tok = build_spm_tokenizer(root / "tok", "LlamaTokenizer")
    torch.manual_seed(0)
    model = BUILDERS[model_type]().float()
    assert model.config.model_type == model_type
    # the Mamba2 layers run transformers' reference PyTorch scan on CPU: fewer pretraining steps there
    case = build_case(root, model_type, model, tok, LORA, pretrain_steps=12 if model_type == "granitemoehybrid" else 30)
    # the base keeps tokenizer.model (the converter reads it) beside transformers' files
    assert (case.base / "tokenizer.model").is_file() or (root / "tok" / "tokenizer.model").is_file()
    if not (case.base / "tokenizer.model").is_file():
        (case.base / "tokenizer.model").write_bytes((root / "tok" / "tokenizer.model").read_bytes())
    return case


def test_fallback_logits_match_transformers(case: GgufCase) -> None:
    check_logits(case, "f32")
    if case.kind == "arcee":  # each conversion starts the converter's Python (torch, transformers): one q8_0 is enough
        check_logits(case, "q8_0")
    result = case.export("f32")
    manifest = json.loads((result.output / "lorasave.json").read_text())
    conv = manifest["result"]["converter"]
    assert conv["llama_cpp"] == "v0.5.0" and conv["merged_dtype"] == "float32"
    # only the deliverables are left: the merged checkpoint and the intermediates are gone
    assert sorted(p.name for p in result.output.iterdir()) == sorted(result.files)
    assert not [p for p in result.output.iterdir() if p.suffix in (".safetensors", ".json") and p.name != "lorasave.json"]
    assert any("llama.cpp's own converter" in n for n in result.notes)
    assert "written by llama.cpp's convert_hf_to_gguf.py (v0.5.0)" in result.summary()
    # named as the native export names a file (the base folder's names, handed to the converter as --metadata),
    # not after the staging folder the converter reads
    fields = gguf.GGUFReader(result.gguf_file).fields
    assert fields["general.name"].contents() == "Base" and "general.finetune" not in fields
    assert result.gguf_file.name == f"Base-{fields['general.size_label'].contents()}-F32.gguf"


def test_fallback_llama_quantize_type(case: GgufCase) -> None:
    if case.kind != "arcee":
        pytest.skip("one architecture is enough for the quantize step")
    line = check_logits(case, "q4_k_m")
    result = case.export("q4_k_m")
    # rows of 64 are no multiple of Q4_K's 256: llama_model_quantize's fallbacks (Q5_0, Q8_0...) are used
    assert set(result.tensor_types) - {"F32", "F16"}, (result.tensor_types, line)
    assert not list(result.output.glob(".*")), "the f32 intermediate was removed"


def test_converter_guard_refuses_remote_code(tmp_path: Path) -> None:
    """The prelude the converter runs under makes transformers' remote-code loader raise."""
    need_converter()
    conv = converter.find_converter()
    code = converter.GUARD_SETUP + "\nfrom transformers import AutoTokenizer\nAutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    import subprocess

    proc = subprocess.run(
        [str(conv.python), "-c", code, str(conv.source), str(folder)], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert proc.returncode != 0
    assert "may not import code from the checkpoint" in proc.stderr, proc.stderr[-2000:]
    assert "remote code ran" not in proc.stderr + proc.stdout


def test_unknown_to_both_is_one_line(tmp_path: Path) -> None:
    """A model_type neither lorasave nor the converter knows: one line naming both lists, nothing written."""
    need_converter()
    from _models import build_llama, make_adapter, save_model
    from lorasave.formats.gguf.export import export_gguf

    base = save_model(build_llama(), tmp_path / "base")
    lora = make_adapter(base, tmp_path / "lora", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), seed=0)
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(model_type="mystery", architectures=["MysteryForCausalLM"])
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as err:
        export_gguf(base, lora, tmp_path / "out", type="f16")
    msg = str(err.value)
    assert "\n" not in msg and "'mystery'" in msg and "llama, " in msg and "GraniteMoeHybridForCausalLM" in msg
    assert not (tmp_path / "out").exists()


def test_not_installed_says_how(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the converter: one line naming the install command, before anything is written."""
    monkeypatch.setenv(converter.ENV_DIR, str(tmp_path / "none"))
    with pytest.raises(LlamaCppConverterNotInstalledError, match="lorasave install-llama-cpp --converter"):
        converter.find_converter()


def test_converter_refusal_rule(tmp_path: Path) -> None:
    """A config the converter would write as another model (hybrid Granite with RoPE) is refused in one line."""
    from lorasave.formats.gguf.fallback import CONVERTER_REFUSALS, converter_config

    rule = CONVERTER_REFUSALS["granitemoehybrid"]
    assert rule({"layer_types": ["mamba", "attention"], "position_embedding_type": "nope"}) is None
    assert "without RoPE" in (rule({"layer_types": ["linear_attention", "full_attention"], "position_embedding_type": "rope"}) or "")
    cfg = converter_config({"model_type": "granitemoehybrid", "layer_types": ["linear_attention", "full_attention"], "auto_map": {"x": "y"}})
    assert cfg == {"model_type": "granitemoehybrid", "layer_types": ["mamba", "attention"]}
