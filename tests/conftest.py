"""Session-wide fixtures: tiny bases, trained LoRA adapters and cached merge outputs.

All artefacts are built once per test session under a pytest tmp dir. Tests must never
modify the shared fixture folders (the safety tests copy them when they need to).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig

from lorasave.runtimes.llama_cpp.converter import default_dir as converter_default_dir
from lorasave.runtimes.llama_cpp.install import default_dir as llama_cpp_default_dir
from lorasave.runtimes.llama_cpp.lib import request_amx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _models as M

# AMX tile state for the whole test process, before any test starts Ray in-process: once Ray's driver
# has set a small alternate signal stack the kernel refuses it, and llama.cpp's AMX kernels (its
# Sapphire Rapids CPU variant) then die with SIGILL on the first tile load (seen in a full run).
request_amx()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the llama.cpp runtime and its converter stay where `lorasave install-llama-cpp [--converter]` put them (under the
# real cache), before the cache moves:
os.environ.setdefault("LORASAVE_LLAMA_CPP_DIR", str(llama_cpp_default_dir()))
os.environ.setdefault("LORASAVE_LLAMA_CPP_CONVERTER_DIR", str(converter_default_dir()))
# lorasave's cache (architecture facts, source hashes) goes to a fresh folder per session,
# so no test depends on what an earlier run left in ~/.cache
os.environ["LORASAVE_CACHE"] = tempfile.mkdtemp(prefix="lorasave-test-cache-")
torch.set_num_threads(2)


def _lora(**kw: Any) -> LoraConfig:
    kw.setdefault("r", 8)
    kw.setdefault("lora_alpha", 16)
    kw.setdefault("lora_dropout", 0.0)
    kw.setdefault("task_type", "CAUSAL_LM")
    return LoraConfig(**kw)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zoo")


# ------------------------------------------------------------------------- bases


@pytest.fixture(scope="session")
def llama_base(zoo: Path) -> Path:
    """fp32 Llama, single model.safetensors, with tokenizer + generation_config."""
    path = M.save_model(M.build_llama(0), zoo / "llama_base")
    M.build_tokenizer().save_pretrained(path)
    assert (path / "generation_config.json").is_file()
    return path


@pytest.fixture(scope="session")
def llama_base_sharded(zoo: Path) -> Path:
    """Same weights as ``llama_base`` but written as several shards + index."""
    path = M.save_model(M.build_llama(0), zoo / "llama_base_sharded", max_shard_size="30KB")
    M.build_tokenizer().save_pretrained(path)
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("model-*-of-*.safetensors"))) >= 3
    return path


@pytest.fixture(scope="session")
def llama_base_bf16(zoo: Path) -> Path:
    path = M.save_model(M.build_llama(3).to(torch.bfloat16), zoo / "llama_base_bf16")
    assert M.read_json(path / "config.json")["dtype"] == "bfloat16"
    return path


@pytest.fixture(scope="session")
def llama_wide_base(zoo: Path) -> Path:
    """A Llama with a different hidden size: LoRA shapes from ``llama_base`` do not fit."""
    return M.save_model(M.build_llama(0, hidden=48), zoo / "llama_wide_base")


@pytest.fixture(scope="session")
def llama_deep_base(zoo: Path) -> Path:
    """12 thin layers, saved in several shards."""
    return M.save_model(M.build_llama(4, hidden=16, layers=12), zoo / "llama_deep", "20KB")


@pytest.fixture(scope="session")
def qwen2_base(zoo: Path) -> Path:
    """Qwen2 (q/k/v bias), deliberately without generation_config.json and tokenizer."""
    path = M.save_model(M.build_qwen2(), zoo / "qwen2_base")
    (path / "generation_config.json").unlink(missing_ok=True)
    return path


@pytest.fixture(scope="session")
def gpt2_base(zoo: Path) -> Path:
    """GPT-2: Conv1D layers (weights stored as (in, out)) and tied lm_head."""
    path = M.save_model(M.build_gpt2(), zoo / "gpt2_base")
    M.build_tokenizer().save_pretrained(path)
    return path


# ----------------------------------------------------------------------- adapters


@pytest.fixture(scope="session")
def llama_plain(zoo: Path, llama_base: Path) -> Path:
    return M.make_adapter(llama_base, zoo / "llama_plain", _lora(target_modules=["q_proj", "v_proj"]), seed=10)


@pytest.fixture(scope="session")
def llama_rslora(zoo: Path, llama_base: Path) -> Path:
    cfg = _lora(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_rslora=True)
    return M.make_adapter(llama_base, zoo / "llama_rslora", cfg, seed=11)


@pytest.fixture(scope="session")
def llama_pattern(zoo: Path, llama_base: Path) -> Path:
    cfg = _lora(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
        rank_pattern={"q_proj": 4, "layers.1.self_attn.o_proj": 2},
        # 24/8 = 3 and 12/2 = 6 are not powers of two, so the order of the float
        # operations in the merge matters (a power-of-two scaling would hide it).
        alpha_pattern={"v_proj": 24, "layers.1.self_attn.o_proj": 12},
    )
    return M.make_adapter(llama_base, zoo / "llama_pattern", cfg, seed=12)


@pytest.fixture(scope="session")
def llama_alllinear(zoo: Path, llama_base: Path) -> Path:
    cfg = _lora(target_modules="all-linear", r=4, lora_alpha=8)
    return M.make_adapter(llama_base, zoo / "llama_alllinear", cfg, seed=13)


@pytest.fixture(scope="session")
def llama_deep_adapter(zoo: Path, llama_deep_base: Path) -> Path:
    cfg = _lora(target_modules=["q_proj", "down_proj"], r=4, lora_alpha=4)
    return M.make_adapter(llama_deep_base, zoo / "llama_deep_adapter", cfg, seed=19)


@pytest.fixture(scope="session")
def llama_bf16_adapter(zoo: Path, llama_base_bf16: Path) -> Path:
    """Trained on the bf16 base; PEFT autocasts LoRA weights to fp32 and saves them so."""
    cfg = _lora(target_modules=["q_proj", "v_proj", "gate_proj"])
    return M.make_adapter(llama_base_bf16, zoo / "llama_bf16_adapter", cfg, seed=14, dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def qwen2_adapter(zoo: Path, qwen2_base: Path) -> Path:
    cfg = _lora(target_modules=["q_proj", "k_proj", "v_proj"])
    return M.make_adapter(qwen2_base, zoo / "qwen2_adapter", cfg, seed=15)


@pytest.fixture(scope="session")
def gpt2_adapter(zoo: Path, gpt2_base: Path) -> Path:
    cfg = _lora(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    return M.make_adapter(gpt2_base, zoo / "gpt2_adapter", cfg, seed=16)


@pytest.fixture(scope="session")
def adapter_with_tokenizer(zoo: Path, llama_plain: Path) -> Path:
    """``llama_plain`` plus a tokenizer that differs from the base's (extra words)."""
    path = zoo / "adapter_with_tokenizer"
    shutil.copytree(llama_plain, path)
    M.build_tokenizer(M.EXTRA_WORDS).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def adapter_named_foo(zoo: Path, llama_base: Path) -> Path:
    """PEFT writes non-default adapter names into a subfolder: <dir>/foo/adapter_*."""
    path = M.make_adapter(
        llama_base,
        zoo / "adapter_named_foo",
        _lora(target_modules=["q_proj"]),
        seed=17,
        adapter_name="foo",
    )
    assert (path / "foo" / "adapter_config.json").is_file()
    assert not (path / "adapter_config.json").exists()
    return path


@pytest.fixture(scope="session")
def adapter_pickle(zoo: Path, llama_base: Path) -> Path:
    """Adapter saved the legacy way (adapter_model.bin, a pickle)."""
    path = M.make_adapter(
        llama_base,
        zoo / "adapter_pickle",
        _lora(target_modules=["q_proj", "v_proj"]),
        seed=18,
        safe_serialization=False,
    )
    assert (path / "adapter_model.bin").is_file()
    assert not (path / "adapter_model.safetensors").exists()
    return path


# ---------------------------------------------------------------- cached merges


@pytest.fixture(scope="session")
def _merge_cache(tmp_path_factory: pytest.TempPathFactory) -> dict[str, M.Merged]:
    return {}


@pytest.fixture
def get_merged(request: pytest.FixtureRequest, _merge_cache: dict[str, M.Merged], tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], M.Merged]:
    """Run (once per session) the merge described by ``M.CASES[name]`` and return it."""

    def get(name: str) -> M.Merged:
        if name not in _merge_cache:
            import lorasave

            case = M.CASES[name]
            base = request.getfixturevalue(case.base)
            adapters = [request.getfixturevalue(a) for a in case.adapters]
            out = tmp_path_factory.mktemp(f"merged_{name}") / "out"
            res = lorasave.merge(
                base,
                adapters if len(adapters) > 1 else adapters[0],
                out,
                dtype=case.dtype,
                max_shard_size=case.max_shard_size,
            )
            _merge_cache[name] = M.Merged(name, case, base, adapters, out, res)
        return _merge_cache[name]

    return get
