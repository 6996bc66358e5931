"""Model cards: valid front matter, Hub ids only, license copied (never invented), no null values."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from huggingface_hub import ModelCard

import lorasave

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "examples" / "tiny-llama"
LORA = REPO / "examples" / "tiny-llama-lora"


def _front_matter(folder: Path) -> dict:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_merged_card_without_license_or_hub_id(tmp_path: Path) -> None:
    res = lorasave.merge(BASE, LORA, tmp_path / "out")
    meta = _front_matter(res.output)
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert "license" not in meta and "base_model" not in meta  # no card in the base, "tiny-llama" is not a Hub id
    assert all(v is not None for v in meta.values())
    card = ModelCard.load(res.output / "README.md")
    assert "lorasave" in card.data.tags
    assert "README.md" in res.files


def test_license_copied_and_base_model_is_a_hub_id(tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    lora = tmp_path / "lora"
    shutil.copytree(LORA, lora)
    cfg = (lora / "adapter_config.json").read_text().replace('"tiny-llama"', '"acme/tiny-llama"')
    (lora / "adapter_config.json").write_text(cfg)
    res = lorasave.merge(base, lora, tmp_path / "out")
    meta = _front_matter(res.output)
    assert meta["license"] == "apache-2.0"
    assert meta["base_model"] == "acme/tiny-llama"
    assert str(tmp_path) not in (res.output / "README.md").read_text().split("---\n")[1]


def test_adapter_card(tmp_path: Path) -> None:
    res = lorasave.save_adapter(LORA, tmp_path / "ad")
    meta = _front_matter(res.output)
    assert meta["library_name"] == "peft"
    assert "adapter" in meta["tags"]
