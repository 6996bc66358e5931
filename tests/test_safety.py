"""Refusals, error types and atomicity of lorasave.merge."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import _models as M
import lorasave
from lorasave.errors import LorasaveError, OutputExistsError


def _parent_with_out(tmp_path: Path) -> tuple[Path, Path]:
    parent = tmp_path / "parent"
    parent.mkdir()
    return parent, parent / "out"


def _existing_out(tmp_path: Path) -> tuple[Path, Path]:
    """An earlier lorasave output (it has a manifest) with an extra file in it."""
    parent, out = _parent_with_out(tmp_path)
    out.mkdir()
    (out / "lorasave.json").write_text("{}")
    (out / "sentinel.txt").write_text("keep me")
    return parent, out


def test_overwrite_refuses_folders_lorasave_did_not_write(llama_base: Path, llama_plain: Path, tmp_path: Path) -> None:
    """--overwrite replaces a previous output, never an unrelated folder or a file."""
    parent, out = _parent_with_out(tmp_path)
    out.mkdir()
    (out / "thesis.tex").write_text("important")
    with pytest.raises(OutputExistsError, match="not a lorasave output"):
        lorasave.merge(llama_base, llama_plain, out, overwrite=True)
    assert (out / "thesis.tex").read_text() == "important"
    out_file = parent / "file-out"
    out_file.write_text("x")
    with pytest.raises(OutputExistsError, match="not a folder"):
        lorasave.merge(llama_base, llama_plain, out_file, overwrite=True)
    assert out_file.read_text() == "x"


def test_error_hierarchy() -> None:
    assert issubclass(LorasaveError, Exception)


def test_existing_output_refused(llama_base: Path, llama_plain: Path, tmp_path: Path) -> None:
    parent, out = _existing_out(tmp_path)
    with pytest.raises(LorasaveError) as info:
        lorasave.merge(llama_base, llama_plain, out)
    assert isinstance(info.value, FileExistsError)
    assert (out / "sentinel.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["lorasave.json", "sentinel.txt"]
    assert [p.name for p in parent.iterdir()] == ["out"]


def test_overwrite_replaces_output(llama_base: Path, llama_plain: Path, tmp_path: Path) -> None:
    parent, out = _existing_out(tmp_path)
    lorasave.merge(llama_base, llama_plain, out, overwrite=True)
    assert not (out / "sentinel.txt").exists()
    assert (out / "config.json").is_file()
    assert M.read_tensors(out).keys() == M.read_tensors(llama_base).keys()
    assert [p.name for p in parent.iterdir()] == ["out"], "no temp folders left beside OUT"


def test_inputs_unchanged_by_merge(llama_base_sharded: Path, adapter_with_tokenizer: Path, tmp_path: Path) -> None:
    before = (M.tree_hashes(llama_base_sharded), M.tree_hashes(adapter_with_tokenizer))
    lorasave.merge(llama_base_sharded, adapter_with_tokenizer, tmp_path / "out", dtype="bfloat16")
    after = (M.tree_hashes(llama_base_sharded), M.tree_hashes(adapter_with_tokenizer))
    assert before == after


def test_output_in_place_of_base_refused(llama_base: Path, llama_plain: Path, tmp_path: Path) -> None:
    """Beyond the letter of the contract: overwrite must never destroy its own input."""
    base = tmp_path / "base"
    shutil.copytree(llama_base, base)
    before = M.tree_hashes(base)
    with pytest.raises(LorasaveError):
        lorasave.merge(base, llama_plain, base, overwrite=True)
    assert M.tree_hashes(base) == before


# ------------------------------------------------------------ failing merges


def _fail_adapter_targets_missing(r: pytest.FixtureRequest) -> tuple[Path, Path, type]:
    # GPT-2 module names (transformer.h.N.attn.c_attn ...) do not exist in a Llama.
    return r.getfixturevalue("llama_base"), r.getfixturevalue("gpt2_adapter"), LorasaveError


def _fail_shape_mismatch(r: pytest.FixtureRequest) -> tuple[Path, Path, type]:
    return r.getfixturevalue("llama_wide_base"), r.getfixturevalue("llama_plain"), ValueError


def _fail_missing_base(r: pytest.FixtureRequest) -> tuple[Path, Path, type]:
    return r.getfixturevalue("tmp_path") / "no_such_base_dir", r.getfixturevalue("llama_plain"), FileNotFoundError


def _fail_missing_adapter(r: pytest.FixtureRequest) -> tuple[Path, Path, type]:
    return r.getfixturevalue("llama_base"), r.getfixturevalue("tmp_path") / "no_such_adapter", FileNotFoundError


def _fail_base_without_weights(r: pytest.FixtureRequest) -> tuple[Path, Path, type]:
    tmp = r.getfixturevalue("tmp_path") / "empty_base"
    tmp.mkdir()
    shutil.copy(r.getfixturevalue("llama_base") / "config.json", tmp / "config.json")
    return tmp, r.getfixturevalue("llama_plain"), LorasaveError


def _fail_adapter_is_a_base(r: pytest.FixtureRequest) -> tuple[Path, Path, type]:
    return r.getfixturevalue("llama_base"), r.getfixturevalue("qwen2_base"), LorasaveError


FAILURES: dict[str, Callable[[pytest.FixtureRequest], tuple[Path, Path, type]]] = {
    "adapter_targets_missing": _fail_adapter_targets_missing,
    "shape_mismatch": _fail_shape_mismatch,
    "missing_base": _fail_missing_base,
    "missing_adapter": _fail_missing_adapter,
    "base_without_weights": _fail_base_without_weights,
    "adapter_is_a_base": _fail_adapter_is_a_base,
}


@pytest.mark.parametrize("kind", sorted(FAILURES))
def test_failed_merge_leaves_nothing(request: pytest.FixtureRequest, kind: str, tmp_path: Path) -> None:
    base, adapter, exc_type = FAILURES[kind](request)
    parent, out = _parent_with_out(tmp_path)
    with pytest.raises(LorasaveError) as info:
        lorasave.merge(base, adapter, out)
    assert isinstance(info.value, exc_type), type(info.value).__mro__
    assert str(info.value).strip(), "error message must not be empty"
    assert not out.exists()
    assert list(parent.iterdir()) == [], "leftover temp files/folders beside OUT"


def test_failed_overwrite_keeps_previous_output(llama_base: Path, gpt2_adapter: Path, tmp_path: Path) -> None:
    parent, out = _existing_out(tmp_path)
    with pytest.raises(LorasaveError):
        lorasave.merge(llama_base, gpt2_adapter, out, overwrite=True)
    assert (out / "sentinel.txt").read_text() == "keep me"
    assert [p.name for p in parent.iterdir()] == ["out"]


def test_named_adapter_subfolders_listed(llama_base: Path, adapter_named_foo: Path, tmp_path: Path) -> None:
    parent, out = _parent_with_out(tmp_path)
    with pytest.raises(LorasaveError) as info:
        lorasave.merge(llama_base, adapter_named_foo, out)
    assert "foo" in str(info.value)
    assert list(parent.iterdir()) == []


def test_named_adapter_subfolder_itself_merges(llama_base: Path, adapter_named_foo: Path, tmp_path: Path) -> None:
    adapter = adapter_named_foo / "foo"
    out = tmp_path / "out"
    lorasave.merge(llama_base, adapter, out)
    scalings = M.peft_scalings(llama_base, adapter)
    base, got = M.read_tensors(llama_base), M.read_tensors(out)
    for mod, (a, b) in M.adapter_weights(adapter).items():
        want = M.expected_merge(base[f"{mod}.weight"], a, b, scalings[mod], torch.float32)
        assert torch.equal(got[f"{mod}.weight"], want), mod


@pytest.mark.parametrize("kwargs", [{"dtype": "int8"}, {"dtype": "float64x"}, {"max_shard_size": "lots"}])
def test_bad_options_are_value_errors(llama_base: Path, llama_plain: Path, tmp_path: Path, kwargs: dict[str, object]) -> None:
    parent, out = _parent_with_out(tmp_path)
    with pytest.raises(LorasaveError) as info:
        lorasave.merge(llama_base, llama_plain, out, **kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert list(parent.iterdir()) == []
