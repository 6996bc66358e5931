"""lorasave's on-disk cache: never returns a stale source hash, and a cached architecture equals a fresh one."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from lorasave.pipeline.manifest import sha256_source
from lorasave.sources import cache
from lorasave.sources.architecture import ArchitectureInfo, build_architecture, inspect_architecture


def test_source_hash_follows_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORASAVE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    assert sha256_source(f) == hashlib.sha256(b"a" * 1000).hexdigest()
    assert list((tmp_path / "cache" / "sha256").iterdir())  # stored
    # same size, same mtime, different content: ctime still moves, so the hash is recomputed
    st = os.stat(f)
    f.write_bytes(b"b" * 1000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sha256_source(f) == hashlib.sha256(b"b" * 1000).hexdigest()


def test_cache_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORASAVE_CACHE", "off")
    assert cache.cache_dir() is None
    cache.put("x", 1, "k")
    assert cache.get("x", "k") is None


def test_cached_architecture_equals_fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORASAVE_CACHE", str(tmp_path / "cache"))
    cfg = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 2,
        "vocab_size": 100,
    }
    fresh = build_architecture(cfg)
    first = inspect_architecture(cfg)  # computes and stores
    second = inspect_architecture(cfg)  # from the cache
    assert json.dumps(first.to_json(), sort_keys=True) == json.dumps(fresh.to_json(), sort_keys=True)
    assert json.dumps(second.to_json(), sort_keys=True) == json.dumps(fresh.to_json(), sort_keys=True)
    assert ArchitectureInfo.from_json(fresh.to_json()).kind_of("transformer.h.0.attn.c_attn") == fresh.kind_of("transformer.h.0.attn.c_attn")
    assert fresh.save_order and "lm_head.weight" not in fresh.save_order  # tied to wte, dropped as save_pretrained does
