"""On-disk layout of lorasave's output: shards, index, config, manifest, side files.

The reference layout is what transformers 5 itself writes when the merged model is
loaded with ``from_pretrained`` and saved with ``save_pretrained`` at the same
``max_shard_size`` (the classic "load, merge with PEFT, save" workflow also goes
through a loaded model, so it produces the same layout).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import _models as M
import lorasave

INDEX = "model.safetensors.index.json"
LAYOUT_CASES = [
    "llama_fp32",
    "llama_sharded_base",
    "llama_alllinear",
    "llama_bf16",
    "llama_to_fp16",
    "qwen2",
    "gpt2",
    "llama_deep",
]


def _weight_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.suffix == ".safetensors" or p.name == INDEX}


@pytest.fixture(scope="session")
def _resaved_cache() -> dict[str, Path]:
    return {}


@pytest.fixture
def resaved(
    get_merged: Callable[[str], M.Merged],
    _resaved_cache: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str], tuple[M.Merged, Path]]:
    """lorasave output -> transformers from_pretrained -> save_pretrained (same shard size)."""

    def get(name: str) -> tuple[M.Merged, Path]:
        m = get_merged(name)
        if name not in _resaved_cache:
            ref = tmp_path_factory.mktemp(f"resaved_{name}")
            model = AutoModelForCausalLM.from_pretrained(m.out, dtype="auto")
            model.save_pretrained(ref, max_shard_size=m.case.max_shard_size)
            _resaved_cache[name] = ref
        return m, _resaved_cache[name]

    return get


@pytest.mark.parametrize("name", LAYOUT_CASES)
def test_weight_file_names_match_transformers(resaved: Callable, name: str) -> None:
    m, ref = resaved(name)
    assert _weight_files(m.out) == _weight_files(ref)


@pytest.mark.parametrize("name", LAYOUT_CASES)
def test_index_matches_transformers(resaved: Callable, name: str) -> None:
    m, ref = resaved(name)
    if not (ref / INDEX).exists():
        assert not (m.out / INDEX).exists()
        return
    got, want = M.read_json(m.out / INDEX), M.read_json(ref / INDEX)
    assert got["weight_map"] == want["weight_map"]
    assert got["metadata"]["total_size"] == want["metadata"]["total_size"]
    assert got["metadata"] == want["metadata"]  # includes total_parameters
    assert set(got) == set(want)


@pytest.mark.parametrize("name", LAYOUT_CASES)
def test_index_file_bytes_match_transformers(resaved: Callable, name: str) -> None:
    """transformers writes json.dumps(index, indent=2, sort_keys=True) + newline."""
    m, ref = resaved(name)
    if (ref / INDEX).exists():
        assert (m.out / INDEX).read_bytes() == (ref / INDEX).read_bytes()


@pytest.mark.parametrize("name", LAYOUT_CASES)
def test_shard_tensors_match_transformers(resaved: Callable, name: str) -> None:
    m, ref = resaved(name)
    for shard in sorted(ref.glob("*.safetensors")):
        want = M.read_file_tensors(shard)
        got = M.read_file_tensors(m.out / shard.name)
        assert list(got) == list(want), shard.name
        for k, t in want.items():
            assert got[k].dtype == t.dtype, k
            assert torch.equal(got[k], t), k


@pytest.mark.parametrize("name", LAYOUT_CASES)
def test_shard_bytes_match_transformers(resaved: Callable, name: str) -> None:
    m, ref = resaved(name)
    for shard in sorted(ref.glob("*.safetensors")):
        assert (m.out / shard.name).read_bytes() == shard.read_bytes(), shard.name


@pytest.mark.parametrize("name", ["llama_fp32", "llama_alllinear", "qwen2", "gpt2", "llama_deep"])
def test_layout_matches_peft_merge_and_save_workflow(get_merged: Callable[[str], M.Merged], name: str, tmp_path: Path) -> None:
    """The classic workflow: from_pretrained(base) -> PEFT merge_and_unload -> save_pretrained.

    Only the layout is compared (PEFT's merged values are not part of this test).
    """
    from peft import PeftModel

    m = get_merged(name)
    assert m.case.dtype == "auto"
    model = AutoModelForCausalLM.from_pretrained(m.base, dtype="auto")
    merged = PeftModel.from_pretrained(model, m.adapters[0]).merge_and_unload()
    merged.save_pretrained(tmp_path, max_shard_size=m.case.max_shard_size)
    assert _weight_files(m.out) == _weight_files(tmp_path)
    if (tmp_path / INDEX).exists():
        assert M.read_json(m.out / INDEX) == M.read_json(tmp_path / INDEX)


@pytest.mark.parametrize("name", LAYOUT_CASES)
def test_shard_bytes_equal_save_file(get_merged: Callable[[str], M.Merged], name: str, tmp_path: Path) -> None:
    m = get_merged(name)
    for shard in sorted(m.out.glob("*.safetensors")):
        assert M.file_metadata(shard) == {"format": "pt"}, shard.name
        expect = tmp_path / shard.name
        save_file(M.read_file_tensors(shard), str(expect), metadata={"format": "pt"})
        assert shard.read_bytes() == expect.read_bytes(), shard.name


def test_single_file_when_it_fits(get_merged: Callable[[str], M.Merged]) -> None:
    m = get_merged("llama_sharded_base")  # sharded input, 5GB limit -> one file
    assert _weight_files(m.out) == {"model.safetensors"}


def test_small_shard_size_gives_several_shards(get_merged: Callable[[str], M.Merged]) -> None:
    m = get_merged("llama_deep")
    index = M.read_json(m.out / INDEX)
    shards = set(index["weight_map"].values())
    assert len(shards) >= 3
    assert shards == {p.name for p in m.out.glob("model-*-of-*.safetensors")}
    assert set(index["weight_map"]) == set(M.read_tensors(m.out))


def test_max_shard_size_int_and_string_agree(llama_base: Path, llama_plain: Path, tmp_path: Path) -> None:
    a = lorasave.merge(llama_base, llama_plain, tmp_path / "a", max_shard_size="50KB").output
    b = lorasave.merge(llama_base, llama_plain, tmp_path / "b", max_shard_size=50_000).output
    assert _weight_files(Path(a)) == _weight_files(Path(b))
    assert len(_weight_files(Path(a))) > 2
    for f in _weight_files(Path(a)):
        assert (Path(a) / f).read_bytes() == (Path(b) / f).read_bytes(), f


# ------------------------------------------------------------------------ config


@pytest.mark.parametrize("name", sorted(M.CASES))
def test_config_dtype_and_tensor_dtypes(get_merged: Callable[[str], M.Merged], name: str) -> None:
    m = get_merged(name)
    want = str(m.case.out_dtype).removeprefix("torch.")
    cfg = M.read_json(m.out / "config.json")
    assert cfg["dtype"] == want
    assert {t.dtype for t in M.read_tensors(m.out).values()} == {m.case.out_dtype}
    base_cfg = M.read_json(m.base / "config.json")
    ignore = {"dtype", "torch_dtype", "transformers_version"}
    assert {k: v for k, v in cfg.items() if k not in ignore} == {k: v for k, v in base_cfg.items() if k not in ignore}


@pytest.mark.parametrize(
    ("name", "base_dtype"),
    [("llama_fp32", "float32"), ("llama_bf16", "bfloat16"), ("qwen2", "float32")],
)
def test_auto_dtype_is_base_dtype(get_merged: Callable[[str], M.Merged], name: str, base_dtype: str) -> None:
    m = get_merged(name)
    assert m.case.dtype == "auto"
    assert M.read_json(m.base / "config.json")["dtype"] == base_dtype
    assert M.read_json(m.out / "config.json")["dtype"] == base_dtype
    assert m.result.dtype == base_dtype


# -------------------------------------------------------------------- side files


def test_generation_config_carried(get_merged: Callable[[str], M.Merged]) -> None:
    for name in ("llama_fp32", "gpt2"):
        m = get_merged(name)
        assert M.read_json(m.out / "generation_config.json") == M.read_json(m.base / "generation_config.json")


def test_no_generation_config_when_base_has_none(get_merged: Callable[[str], M.Merged]) -> None:
    m = get_merged("qwen2")
    assert not (m.base / "generation_config.json").exists()
    assert not (m.out / "generation_config.json").exists()


def test_base_tokenizer_carried_when_adapter_has_none(get_merged: Callable[[str], M.Merged]) -> None:
    m = get_merged("llama_fp32")
    assert not (m.adapters[0] / "tokenizer.json").exists()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (m.out / f).read_bytes() == (m.base / f).read_bytes(), f


def test_adapter_tokenizer_wins(get_merged: Callable[[str], M.Merged]) -> None:
    m = get_merged("llama_tokenizer")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (m.out / f).read_bytes() == (m.adapters[0] / f).read_bytes(), f
    tok = AutoTokenizer.from_pretrained(m.out)
    for word in M.EXTRA_WORDS:
        assert word in tok.get_vocab()
    base_tok = AutoTokenizer.from_pretrained(m.base)
    assert M.EXTRA_WORDS[0] not in base_tok.get_vocab()


def test_no_tokenizer_when_nobody_has_one(get_merged: Callable[[str], M.Merged]) -> None:
    m = get_merged("qwen2")
    assert not list(m.out.glob("tokenizer*"))


def test_tokenizer_option_overrides(llama_base: Path, llama_plain: Path, adapter_with_tokenizer: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    lorasave.merge(llama_base, llama_plain, out, tokenizer=adapter_with_tokenizer)
    assert (out / "tokenizer.json").read_bytes() == (adapter_with_tokenizer / "tokenizer.json").read_bytes()


def test_no_adapter_files_in_output(get_merged: Callable[[str], M.Merged]) -> None:
    m = get_merged("llama_tokenizer")
    names = {p.name for p in m.out.iterdir()}
    assert not names & {"adapter_config.json", "adapter_model.safetensors"}
    assert all(p.is_file() for p in m.out.iterdir()), "no subfolders expected"


# ---------------------------------------------------------------------- manifest


@pytest.mark.parametrize("name", ["llama_fp32", "llama_tokenizer", "gpt2", "llama_deep"])
def test_manifest(get_merged: Callable[[str], M.Merged], name: str) -> None:
    m = get_merged(name)
    man = M.read_json(m.out / "lorasave.json")
    for key in ("lorasave_version", "sources", "settings", "files"):
        assert key in man, key
    assert isinstance(man["lorasave_version"], str) and man["lorasave_version"]
    version = getattr(lorasave, "__version__", None)
    if version is not None:
        assert man["lorasave_version"] == version
    assert man["sources"], "sources must describe the base and adapter(s)"
    assert isinstance(man["settings"], dict)
    files = man["files"]
    on_disk = {p.name for p in m.out.iterdir() if p.is_file()} - {"lorasave.json"}
    assert set(files) == on_disk
    for fname, info in files.items():
        path = m.out / fname
        assert info["sha256"] == M.sha256(path), fname
        assert info["bytes"] == path.stat().st_size, fname
    # the manifest must be valid JSON text on its own (no NaN etc.)
    json.loads((m.out / "lorasave.json").read_text(encoding="utf-8"), parse_constant=_reject)


def _reject(value: str) -> None:
    raise ValueError(f"non-standard JSON constant {value}")
