"""A corpus of malformed inputs: each must end in one lorasave error, one line, naming the file and the fix.

Every case copies the bundled example (``examples/tiny-llama`` + ``examples/tiny-llama-lora``) into
a tmp dir, breaks one thing, runs it in-process and checks:

- a ``LorasaveError`` subclass is raised (the expected one), nothing else;
- ``str(err)`` is one line, names the offending file or folder, and carries a hint of the fix;
- no output folder, and no staging folder beside it, is left behind.

A few cases also go through ``python -m lorasave`` to check the CLI's single ``error:`` line.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorasave
from lorasave import errors as E
from lorasave.verify.inspect import inspect_path
from lorasave.verify.run import verify

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BASE_SRC = EXAMPLES / "tiny-llama"
ADAPTER_SRC = EXAMPLES / "tiny-llama-lora"
PREFIX = "base_model.model."


# ------------------------------------------------------------------ safetensors surgery


def st_split(path: Path) -> tuple[dict[str, Any], bytes]:
    """Header object and data buffer of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def st_join(path: Path, header: Any, data: bytes) -> None:
    """Write a header object (any JSON value) and a data buffer, padded as safetensors does."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def st_raw(path: Path, n: int, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", n) + header + data)


def by_offset(header: dict[str, Any]) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def edit_header(path: Path, fn: Callable[[dict[str, Any]], None]) -> None:
    header, data = st_split(path)
    fn(header)
    st_join(path, header, data)


def edit_tensors(path: Path, fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]) -> None:
    tensors = load_file(path)
    new = fn(tensors)
    save_file(new if new is not None else tensors, path, metadata={"format": "pt"})


def edit_json(path: Path, fn: Callable[[dict[str, Any]], None]) -> None:
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj, indent=2))


# ------------------------------------------------------------------ the cases


@dataclass
class Env:
    """Copies of the example and where the output would go."""

    tmp: Path
    base: Path
    adapter: Path
    out: Path

    @property
    def base_st(self) -> Path:
        return self.base / "model.safetensors"

    @property
    def ad_st(self) -> Path:
        return self.adapter / "adapter_model.safetensors"

    @property
    def ad_cfg(self) -> Path:
        return self.adapter / "adapter_config.json"

    def merge(self, **kw: Any) -> Callable[[], object]:
        return lambda: lorasave.merge(self.base, self.adapter, self.out, **kw)

    def shard(self, index: dict[str, Any] | str) -> None:
        """Give the base an index file (the single file stays as the only shard unless the index says otherwise)."""
        text = index if isinstance(index, str) else json.dumps(index)
        (self.base / "model.safetensors.index.json").write_text(text)

    def weight_map(self) -> dict[str, str]:
        header, _ = st_split(self.base_st)
        return {k: "model.safetensors" for k in header if k != "__metadata__"}


@dataclass
class Case:
    """One malformed input.

    Attributes:
        id: test id.
        setup: breaks the copies, returns the call to make and the path the message must name.
        exc: the LorasaveError subclass expected.
        hint: a substring of the message that says how to fix it (or what to do).
    """

    id: str
    setup: Callable[[Env], tuple[Callable[[], object], Path | str]]
    exc: type[E.LorasaveError]
    hint: str


CASES: list[Case] = []


def case(id: str, exc: type[E.LorasaveError], hint: str) -> Callable[[Callable[[Env], tuple[Callable[[], object], Path | str]]], None]:
    def deco(fn: Callable[[Env], tuple[Callable[[], object], Path | str]]) -> None:
        CASES.append(Case(id, fn, exc, hint))

    return deco


# --- base safetensors file


@case("st-truncated", E.CheckpointFormatError, "re-download")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    raw = env.base_st.read_bytes()
    env.base_st.write_bytes(raw[: len(raw) // 2])
    return env.merge(), env.base_st


@case("st-shorter-than-8-bytes", E.CheckpointFormatError, "re-download")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    env.base_st.write_bytes(b"\x10\x00\x00")
    return env.merge(), env.base_st


@case("st-header-longer-than-file", E.CheckpointFormatError, "truncated")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    raw = env.base_st.read_bytes()
    env.base_st.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    return env.merge(), env.base_st


@case("st-header-length-absurd", E.CheckpointFormatError, "exceeds the 100 MB limit")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    raw = env.base_st.read_bytes()
    env.base_st.write_bytes(struct.pack("<Q", 2**63 + 5) + raw[8:])
    return env.merge(), env.base_st


@case("st-header-not-json", E.CheckpointFormatError, "re-download")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    st_raw(env.base_st, 16, b"{not json at all", b"")
    return env.merge(), env.base_st


@case("st-header-not-utf8", E.CheckpointFormatError, "re-download")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    st_raw(env.base_st, 8, b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8")
    return env.merge(), env.base_st


@case("st-header-not-object", E.CheckpointFormatError, "re-download")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    st_join(env.base_st, [1, 2, 3], b"")
    return env.merge(), env.base_st


@case("st-metadata-not-strings", E.CheckpointFormatError, "re-download")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    edit_header(env.base_st, lambda h: h.update({"__metadata__": {"format": 1}}))
    return env.merge(), env.base_st


@case("st-entry-not-object", E.CheckpointFormatError, "re-download")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    edit_header(env.base_st, lambda h: h.update({"lm_head.weight": "BF16"}))
    return env.merge(), env.base_st


@case("st-overlapping-offsets", E.CheckpointFormatError, "re-download")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    def fn(h: dict[str, Any]) -> None:
        first, second = by_offset(h)[:2]
        h[second]["dtype"] = h[first]["dtype"]
        h[second]["shape"] = h[first]["shape"]
        h[second]["data_offsets"] = list(h[first]["data_offsets"])  # same bytes twice, a later hole

    edit_header(env.base_st, fn)
    return env.merge(), env.base_st


@case("st-offsets-out-of-range", E.CheckpointFormatError, "truncated")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    def fn(h: dict[str, Any]) -> None:
        last = by_offset(h)[-1]
        b, e = h[last]["data_offsets"]
        h[last]["data_offsets"] = [b + 1024, e + 1024]

    edit_header(env.base_st, fn)
    return env.merge(), env.base_st


@case("st-offsets-reversed", E.CheckpointFormatError, "re-download")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    def fn(h: dict[str, Any]) -> None:
        first = by_offset(h)[0]
        h[first]["data_offsets"] = h[first]["data_offsets"][::-1]

    edit_header(env.base_st, fn)
    return env.merge(), env.base_st


@case("st-gap-between-tensors", E.CheckpointFormatError, "re-download")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    header, data = st_split(env.base_st)
    for k in by_offset(header):
        header[k]["data_offsets"] = [o + 64 for o in header[k]["data_offsets"]]
    st_join(env.base_st, header, b"\0" * 64 + data)
    return env.merge(), env.base_st


@case("st-dtype-vs-byte-count", E.CheckpointFormatError, "re-download")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    edit_header(env.base_st, lambda h: h["lm_head.weight"].update(dtype="F32"))
    return env.merge(), env.base_st


@case("st-unknown-dtype", E.CheckpointFormatError, "re-download")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    edit_header(env.base_st, lambda h: h["lm_head.weight"].update(dtype="Q4_K"))
    return env.merge(), env.base_st


@case("st-negative-shape", E.CheckpointFormatError, "re-download")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    edit_header(env.base_st, lambda h: h["lm_head.weight"].update(shape=[-256, -64]))
    return env.merge(), env.base_st


@case("st-data-past-last-tensor", E.CheckpointFormatError, "re-download")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    with open(env.base_st, "ab") as f:
        f.write(b"\0" * 16)
    return env.merge(), env.base_st


@case("adapter-st-truncated", E.CheckpointFormatError, "re-download")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    raw = env.ad_st.read_bytes()
    env.ad_st.write_bytes(raw[:-100])
    return env.merge(), env.ad_st


# --- index


@case("index-missing-shard", E.CheckpointFormatError, "download it again")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    wm = env.weight_map()
    wm["lm_head.weight"] = "model-00002-of-00002.safetensors"
    env.shard({"metadata": {}, "weight_map": wm})
    return env.merge(), env.base / "model.safetensors.index.json"


for _entry in ("..", "/etc/passwd", "sub/model.safetensors", "../tiny-llama-lora/adapter_model.safetensors", "."):

    @case(f"index-entry-{_entry.replace('/', '_')}", E.UnsafePathError, "refusing to read it")
    def _(env: Env, _entry: str = _entry) -> tuple[Callable[[], object], Path]:
        (env.base / "sub").mkdir()
        shutil.copy(env.base_st, env.base / "sub" / "model.safetensors")
        wm = env.weight_map()
        wm["lm_head.weight"] = _entry
        env.shard({"weight_map": wm})
        return env.merge(), env.base / "model.safetensors.index.json"


@case("index-entry-not-string", E.UnsafePathError, "refusing to read it")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    wm: dict[str, Any] = env.weight_map()
    wm["lm_head.weight"] = ["model.safetensors"]
    env.shard({"weight_map": wm})
    return env.merge(), env.base / "model.safetensors.index.json"


@case("index-not-json", E.CheckpointFormatError, "fix or re-download")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    env.shard('{"weight_map": {"lm_head.weight": "model.safetensors",')
    return env.merge(), env.base / "model.safetensors.index.json"


@case("index-without-weight-map", E.CheckpointFormatError, "re-download the index")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    env.shard({"metadata": {"total_size": 1}})
    return env.merge(), env.base / "model.safetensors.index.json"


@case("index-weight-map-list", E.CheckpointFormatError, "re-download the index")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    env.shard({"weight_map": ["model.safetensors"]})
    return env.merge(), env.base / "model.safetensors.index.json"


@case("index-tensor-absent-from-shard", E.CheckpointFormatError, "re-download the index and its shards")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    wm = env.weight_map()
    wm["model.layers.9.mlp.up_proj.weight"] = "model.safetensors"
    env.shard({"weight_map": wm})
    return env.merge(), env.base / "model.safetensors.index.json"


# --- config.json


@case("config-missing", E.CheckpointFormatError, "Hugging Face model folder")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    (env.base / "config.json").unlink()
    return env.merge(), env.base


@case("config-invalid-json", E.CheckpointFormatError, "fix or re-download")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    (env.base / "config.json").write_text('{"model_type": "llama",,}')
    return env.merge(), env.base / "config.json"


@case("config-not-object", E.CheckpointFormatError, "fix or re-download the file")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    (env.base / "config.json").write_text("[]")
    return env.merge(), env.base / "config.json"


@case("config-architectures-not-list", E.CheckpointFormatError, "fix or re-download the file")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    edit_json(env.base / "config.json", lambda c: c.update(architectures=5))
    return env.merge(), env.base / "config.json"


@case("base-missing", E.SourceNotFoundError, "does not exist")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    shutil.rmtree(env.base)
    return env.merge(), env.base


@case("base-only-pickle", E.PickleRefusedError, "convert them to safetensors")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    env.base_st.rename(env.base / "pytorch_model.bin")
    return env.merge(), env.base


@case("base-and-adapter-swapped", E.CheckpointFormatError, "put the base first")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    return (lambda: lorasave.merge(env.adapter, env.base, env.out)), env.adapter


@case("quantized-gptq", E.UnsupportedModelError, "merge into the original 16-bit checkpoint")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    edit_json(env.base / "config.json", lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128}))
    return env.merge(), env.base


# --- adapter config and files


@case("adapter-config-missing", E.NotAnAdapterError, "PeftModel.save_pretrained")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    env.ad_cfg.unlink()
    return env.merge(), env.adapter


@case("adapter-config-invalid-json", E.CheckpointFormatError, "fix or re-download")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    env.ad_cfg.write_text('{"peft_type": "LORA", "r": 8')
    return env.merge(), env.ad_cfg


@case("adapter-weights-missing", E.CheckpointFormatError, "copy or save them again")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    env.ad_st.unlink()
    return env.merge(), env.adapter


@case("adapter-only-bin", E.PickleRefusedError, "--allow-pickle")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    torch.save(load_file(env.ad_st), env.adapter / "adapter_model.bin")
    env.ad_st.unlink()
    return env.merge(), env.adapter


@case("adapter-bin-garbage-allowed", E.CheckpointFormatError, "cannot be loaded safely")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    (env.adapter / "adapter_model.bin").write_bytes(b"not a pickle")
    env.ad_st.unlink()
    return env.merge(allow_pickle=True), env.adapter / "adapter_model.bin"


@case("adapter-shapes-do-not-fit", E.AdapterMismatchError, "another model")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    def fn(t: dict[str, torch.Tensor]) -> None:
        for k in list(t):
            if k.endswith("q_proj.lora_A.weight"):
                t[k] = torch.zeros(8, 48)

    edit_tensors(env.ad_st, fn)
    return env.merge(), env.adapter


@case("adapter-factors-do-not-multiply", E.AdapterMismatchError, "expected (r, in) and (out, r)")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    def fn(t: dict[str, torch.Tensor]) -> None:
        k = next(k for k in t if k.endswith("q_proj.lora_B.weight"))
        t[k] = torch.zeros(64, 4)

    edit_tensors(env.ad_st, fn)
    return env.merge(), env.ad_st


@case("adapter-target-missing-in-base", E.AdapterMismatchError, "trained on another model")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    edit_tensors(env.ad_st, lambda t: {k.replace("layers.1.", "layers.7."): v for k, v in t.items()})
    return env.merge(), env.adapter


@case("adapter-for-gpt2", E.AdapterMismatchError, "trained on another model")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    r = 8
    t = {f"{PREFIX}transformer.h.{i}.attn.c_attn.lora_A.weight": torch.zeros(r, 64) for i in range(2)}
    t |= {f"{PREFIX}transformer.h.{i}.attn.c_attn.lora_B.weight": torch.zeros(192, r) for i in range(2)}
    save_file(t, env.ad_st)
    edit_json(env.ad_cfg, lambda c: c.update(target_modules=["c_attn"], fan_in_fan_out=True, base_model_name_or_path="gpt2"))
    return env.merge(), env.adapter


@case("adapter-r-zero", E.AdapterMismatchError, "positive integer")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    edit_json(env.ad_cfg, lambda c: c.update(r=0))
    return env.merge(), env.ad_cfg


@case("adapter-r-string", E.AdapterMismatchError, "positive integer")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    edit_json(env.ad_cfg, lambda c: c.update(r="8"))
    return env.merge(), env.ad_cfg


@case("adapter-r-disagrees-with-file", E.AdapterMismatchError, "does not belong to these weights")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    edit_json(env.ad_cfg, lambda c: c.update(r=4))
    return env.merge(), env.ad_st


@case("adapter-lora-alpha-string", E.AdapterMismatchError, "must be a non-zero number")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    edit_json(env.ad_cfg, lambda c: c.update(lora_alpha="16"))
    return env.merge(), env.ad_cfg


@case("adapter-lora-alpha-zero", E.AdapterMismatchError, "must be a non-zero number")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    edit_json(env.ad_cfg, lambda c: c.update(lora_alpha=0))
    return env.merge(), env.ad_cfg


@case("adapter-rank-pattern-not-object", E.AdapterMismatchError, "JSON object")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    edit_json(env.ad_cfg, lambda c: c.update(rank_pattern=["q_proj"]))
    return env.merge(), env.ad_cfg


@case("adapter-alpha-pattern-bad-regex", E.AdapterMismatchError, "regular expression")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    edit_json(env.ad_cfg, lambda c: c.update(alpha_pattern={"q_proj[": 32}))
    return env.merge(), env.ad_cfg


# --- issue 11 (regex): hostile patterns in adapter_config.json (tests/test_trust_regex.py has more)


@case("adapter-rank-pattern-catastrophic-lookahead", E.PatternTimeoutError, "simplify the pattern")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    # a lookahead has no RE2 form, so Python's re runs it in a child process and is stopped after 2 s
    edit_json(env.ad_cfg, lambda c: c.update(rank_pattern={r"(?=[\w.])([\w.]+)+!": 4}))
    return env.merge(), env.ad_cfg


@case("adapter-alpha-pattern-too-long", E.PatternError, "limited to 8192 characters")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    edit_json(env.ad_cfg, lambda c: c.update(alpha_pattern={"q_proj|" * 1500 + "v_proj": 32}))
    return env.merge(), env.ad_cfg


# --- end of issue 11 (regex)


@case("adapter-key-without-prefix", E.CheckpointFormatError, "not a PEFT adapter file")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    edit_tensors(env.ad_st, lambda t: {k.removeprefix(PREFIX): v for k, v in t.items()})
    return env.merge(), env.ad_st


@case("adapter-unknown-peft-type", E.UnsupportedAdapterError, "lorasave merges LORA")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    edit_json(env.ad_cfg, lambda c: c.update(peft_type="SUPER_LORA"))
    return env.merge(), env.ad_cfg


@case("adapter-peft-type-missing", E.UnsupportedAdapterError, "lorasave merges LORA")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    edit_json(env.ad_cfg, lambda c: c.pop("peft_type"))
    return env.merge(), env.ad_cfg


@case("adapter-prompt-tuning", E.UnsupportedAdapterError, "cannot be merged")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    env.ad_cfg.write_text(json.dumps({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 8, "token_dim": 64}))
    save_file({"prompt_embeddings": torch.zeros(8, 64)}, env.ad_st)
    return env.merge(), env.ad_cfg


@case("adapter-nan", E.NonFiniteResultError, "the adapter weights are broken")
def _(env: Env) -> tuple[Callable[[], object], str]:
    def fn(t: dict[str, torch.Tensor]) -> None:
        t[f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"][3, 2] = float("nan")

    edit_tensors(env.ad_st, fn)
    return env.merge(), "model.layers.0.self_attn.q_proj.weight"


@case("adapter-inf", E.NonFiniteResultError, "the adapter weights are broken")
def _(env: Env) -> tuple[Callable[[], object], str]:
    def fn(t: dict[str, torch.Tensor]) -> None:
        t[f"{PREFIX}model.layers.1.mlp.down_proj.lora_A.weight"][0, 5] = float("inf")

    edit_tensors(env.ad_st, fn)
    return env.merge(), "model.layers.1.mlp.down_proj.weight"


@case("adapter-missing", E.SourceNotFoundError, "does not exist")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    shutil.rmtree(env.adapter)
    return env.merge(), env.adapter


# --- OUT


@case("out-inside-base", E.UnsafePathError, "choose an output folder outside the sources")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    env.out = env.base / "merged"
    return env.merge(), env.base


@case("out-inside-adapter", E.UnsafePathError, "choose an output folder outside the sources")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    env.out = env.adapter / "merged"
    return env.merge(), env.adapter


@case("out-is-base", E.UnsafePathError, "choose an output folder outside the sources")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    env.out = env.base
    return env.merge(overwrite=True), env.base


@case("out-exists", E.OutputExistsError, "--overwrite")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    env.out.mkdir()
    (env.out / "keep.txt").write_text("mine")
    return env.merge(), env.out


@case("out-overwrite-foreign-folder", E.OutputExistsError, "remove it yourself or choose another folder")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    env.out.mkdir()
    (env.out / "keep.txt").write_text("mine")
    return env.merge(overwrite=True), env.out


@case("out-no-disk-space", E.InsufficientDiskError, "free some space or write elsewhere")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    real = shutil.disk_usage

    def tiny(path: Any) -> Any:
        return real(path)._replace(free=1000)

    env.monkeypatch.setattr(shutil, "disk_usage", tiny)  # type: ignore[attr-defined]
    return env.merge(), env.out.parent


# --- other entry points


@case("inspect-truncated-safetensors", E.CheckpointFormatError, "re-download")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    raw = env.ad_st.read_bytes()
    env.ad_st.write_bytes(raw[:50])
    return (lambda: inspect_path(env.ad_st)), env.ad_st


@case("inspect-garbage-gguf", E.CheckpointFormatError, "re-download or re-convert it")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    p = env.tmp / "model.gguf"
    p.write_bytes(b"GGUF" + b"\xff" * 60)
    return (lambda: inspect_path(p)), p


@case("verify-malformed-gguf", E.CheckpointFormatError, "re-download or re-convert it")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    import hashlib

    from lorasave.formats.gguf.export import export_gguf

    res = export_gguf(env.base, env.adapter, env.out, type="f16", modelfile=False)
    data = bytearray(res.gguf_file.read_bytes())
    data[8:16] = (10**9).to_bytes(8, "little")  # tensor count far past the file; lorasave.json re-recorded to match
    res.gguf_file.write_bytes(bytes(data))
    manifest = json.loads((res.output / "lorasave.json").read_text())
    manifest["files"][res.gguf_file.name] = {"sha256": hashlib.sha256(bytes(data)).hexdigest(), "bytes": len(data)}
    (res.output / "lorasave.json").write_text(json.dumps(manifest))
    return (lambda: verify(res.output)), res.gguf_file


@case("verify-manifest-invalid-json", E.CheckpointFormatError, "run the merge again")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    d = env.tmp / "fake-out"
    d.mkdir()
    (d / "lorasave.json").write_text("{oops")
    return (lambda: verify(d)), d / "lorasave.json"


@case("verify-manifest-not-object", E.CheckpointFormatError, "run the merge again")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    d = env.tmp / "fake-out"
    d.mkdir()
    (d / "lorasave.json").write_text('{"files": ["model.safetensors"]}')
    return (lambda: verify(d)), d / "lorasave.json"


@case("verify-no-manifest", E.SourceNotFoundError, "verify checks outputs lorasave wrote")
def _(env: Env) -> tuple[Callable[[], object], Path]:
    d = env.tmp / "plain"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return (lambda: verify(d)), d


# --- hostile (issue 11) ---
# JSON bombs (nested 100,000 deep, a 10,000-digit integer) in every JSON file a merge or a GGUF
# export reads, shapes no file can hold, dtypes lorasave cannot read or merge into, FP8 with scales.

DEEP_JSON = "[" * 100_000 + "]" * 100_000
BIG_INT_JSON = "7" * 10_000
BOMB_REASONS = {"deep": "nested deeper than 100 levels", "bigint": "an integer with more than"}


def with_member(text: str, member: str) -> str:
    """A JSON object's text with one more member spliced in as raw text."""
    return text.rstrip()[:-1] + f', "hostile": {member}}}'


def _bomb_config(env: Env, member: str) -> Path:
    p = env.base / "config.json"
    p.write_text(with_member(p.read_text(), member))
    return p


def _bomb_index(env: Env, member: str) -> Path:
    env.shard(with_member(json.dumps({"weight_map": env.weight_map()}), member))
    return env.base / "model.safetensors.index.json"


def _bomb_adapter_config(env: Env, member: str) -> Path:
    env.ad_cfg.write_text(with_member(env.ad_cfg.read_text(), member))
    return env.ad_cfg


def _bomb_st_header(env: Env, member: str) -> Path:
    header, data = st_split(env.base_st)
    text = with_member(json.dumps(header), member).encode()
    st_raw(env.base_st, len(text) + (-len(text) % 8), text + b" " * (-len(text) % 8), data)
    return env.base_st


def _bomb_adapter_st_header(env: Env, member: str) -> Path:
    header, data = st_split(env.ad_st)
    text = with_member(json.dumps(header), member).encode()
    st_raw(env.ad_st, len(text) + (-len(text) % 8), text + b" " * (-len(text) % 8), data)
    return env.ad_st


def _bomb_tokenizer(env: Env, member: str) -> Path:
    p = env.base / "tokenizer.json"
    p.write_text(with_member(p.read_text(), member))
    return p


def _gguf(env: Env) -> Callable[[], object]:
    from lorasave.formats.gguf.export import export_gguf

    return lambda: export_gguf(env.base, [env.adapter], env.out)


_BOMB_PLACES: dict[str, Callable[[Env, str], Path]] = {
    "config": _bomb_config,
    "index": _bomb_index,
    "adapter-config": _bomb_adapter_config,
    "st-header": _bomb_st_header,
    "adapter-st-header": _bomb_adapter_st_header,
    "tokenizer": _bomb_tokenizer,
}

for _place, _edit in _BOMB_PLACES.items():
    for _bomb, _member in (("deep", DEEP_JSON), ("bigint", BIG_INT_JSON)):

        @case(f"hostile-json-{_bomb}-{_place}", E.CheckpointFormatError, BOMB_REASONS[_bomb])
        def _(env: Env, _edit: Callable[[Env, str], Path] = _edit, _member: str = _member, _place: str = _place) -> tuple[Callable[[], object], Path]:
            path = _edit(env, _member)
            return (_gguf(env) if _place == "tokenizer" else env.merge()), path


for _bomb, _member in (("deep", DEEP_JSON), ("bigint", BIG_INT_JSON)):

    @case(f"hostile-json-{_bomb}-manifest", E.CheckpointFormatError, "run the merge again")
    def _(env: Env, _member: str = _member) -> tuple[Callable[[], object], Path]:
        d = env.tmp / "fake-out"
        d.mkdir()
        (d / "lorasave.json").write_text('{"files": {}, "hostile": ' + _member + "}")
        return (lambda: verify(d)), d / "lorasave.json"


def _add_entry(path: Path, dtype: str, shape: list[int], nbytes: int = 0, name: str = "zz.hostile") -> None:
    header, data = st_split(path)
    header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + nbytes]}
    st_join(path, header, data + b"\0" * nbytes)


for _label, _shape in (("2**63x0", [2**63, 0]), ("0x2**62", [0, 2**62]), ("2**40x2**40x0", [2**40, 2**40, 0])):

    @case(f"hostile-shape-{_label}", E.CheckpointFormatError, "re-download or re-save it")
    def _(env: Env, _shape: list[int] = _shape) -> tuple[Callable[[], object], Path]:
        _add_entry(env.base_st, "BF16", _shape)
        return env.merge(), env.base_st


for _dtype, _nbytes in (("F4", 32), ("F6_E2M3", 48), ("F6_E3M2", 48)):

    @case(f"hostile-sub-byte-{_dtype}", E.UnsupportedDtypeError, "merge into the original 16-bit checkpoint")
    def _(env: Env, _dtype: str = _dtype, _nbytes: int = _nbytes) -> tuple[Callable[[], object], Path]:
        _add_entry(env.base_st, _dtype, [64], _nbytes, name="model.extra.weight")
        return env.merge(), env.base_st


for _tdtype in (torch.int32, torch.int8, torch.bool, torch.complex64, torch.float8_e5m2):

    @case(f"hostile-targeted-{str(_tdtype).removeprefix('torch.')}", E.UnsupportedDtypeError, "will not merge into it")
    def _(env: Env, _tdtype: torch.dtype = _tdtype) -> tuple[Callable[[], object], Path]:
        name = "model.layers.1.mlp.down_proj.weight"

        def fn(t: dict[str, torch.Tensor]) -> None:
            t[name] = (t[name].float() > 0) if _tdtype is torch.bool else (t[name].float() * 50).to(_tdtype)

        edit_tensors(env.base_st, fn)
        return env.merge(), env.base_st


for _fdtype, _suffix in ((torch.float8_e4m3fn, "_scale_inv"), (torch.float8_e5m2, "_scale")):

    @case(f"hostile-fp8{_suffix}", E.Fp8WeightsError, "never merges into raw FP8 values")
    def _(env: Env, _fdtype: torch.dtype = _fdtype, _suffix: str = _suffix) -> tuple[Callable[[], object], Path]:
        def fn(t: dict[str, torch.Tensor]) -> None:
            for k in [k for k in t if k.endswith("_proj.weight")]:
                t[k] = t[k].float().to(_fdtype)
                t[k + _suffix] = torch.ones(1)

        edit_tensors(env.base_st, fn)
        return env.merge(), env.base_st


# ------------------------------------------------------------------ running them


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    base = shutil.copytree(BASE_SRC, tmp_path / "tiny-llama")
    adapter = shutil.copytree(ADAPTER_SRC, tmp_path / "tiny-llama-lora")
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    e = Env(tmp_path, Path(base), Path(adapter), out_parent / "merged")
    e.monkeypatch = monkeypatch  # type: ignore[attr-defined]
    return e


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.lorasave-"))


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_malformed_input(c: Case, env: Env) -> None:
    call, named = c.setup(env)
    out_existed = env.out.exists()
    before = sorted(p.name for p in env.out.iterdir()) if env.out.is_dir() else None
    with pytest.raises(Exception) as info:
        call()
    err = info.value
    assert isinstance(err, E.LorasaveError), f"{type(err).__name__} escaped: {err}"
    assert isinstance(err, c.exc), f"expected {c.exc.__name__}, got {type(err).__name__}: {err}"
    msg = str(err)
    print(f"CORPUS {c.id} | {type(err).__name__} | {msg}")
    assert "\n" not in msg and msg.strip() == msg and msg, f"not one line: {msg!r}"
    assert str(named) in msg, f"{named} not named in: {msg}"
    assert c.hint in msg, f"no hint {c.hint!r} in: {msg}"
    assert "Traceback" not in msg
    # nothing written: no OUT (or OUT unchanged), no staging folder beside it
    if out_existed:
        assert sorted(p.name for p in env.out.iterdir()) == before
    else:
        assert not env.out.exists()
    assert _leftovers(env.out) == []
    # the sources were not modified into something else (no file appeared in them)
    assert not any(p.name.startswith(".") and "lorasave" in p.name for p in env.base.parent.rglob("*"))


def test_corpus_size() -> None:
    assert len(CASES) >= 30


# ------------------------------------------------------------------ behaviours that are not errors


def test_unknown_model_type_merges_with_note(env: Env) -> None:
    """A model_type transformers does not know: merged in the checkpoint's own order, with a note saying so."""
    edit_json(env.base / "config.json", lambda c: c.update(model_type="tinyllama-custom", architectures=["TinyLlamaCustomForCausalLM"]))
    res = lorasave.merge(env.base, env.adapter, env.out)
    assert res.n_merged == 14
    assert any("no built-in model_type 'tinyllama-custom'" in n for n in res.notes), res.notes


def test_auto_map_on_builtin_type_ignored(env: Env) -> None:
    """An auto_map pointing at remote code is never imported: the built-in class is used, and a note says so."""
    (env.base / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    edit_json(
        env.base / "config.json",
        lambda c: c.update(auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM", "AutoConfig": "modeling_evil.EvilConfig"}),
    )
    res = lorasave.merge(env.base, env.adapter, env.out)
    assert res.n_merged == 14
    assert any("auto_map" in n for n in res.notes), res.notes


# ------------------------------------------------------------------ the CLI


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    envv = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "lorasave", *map(str, args)], capture_output=True, text=True, env=envv, timeout=120)


CLI_CASES = ["st-header-not-json", "index-entry-..", "adapter-r-zero", "adapter-config-invalid-json", "out-exists"]
CLI_CASES += ["hostile-json-deep-config", "hostile-json-bigint-adapter-config", "hostile-shape-2**63x0", "hostile-sub-byte-F4"]
CLI_CASES += ["hostile-targeted-int32", "hostile-fp8_scale_inv"]


@pytest.mark.parametrize("cid", CLI_CASES)
def test_cli_one_error_line(cid: str, env: Env) -> None:
    c = next(c for c in CASES if c.id == cid)
    _, named = c.setup(env)
    proc = _cli("merge", env.base, env.adapter, "-o", env.out)
    assert proc.returncode == getattr(c.exc, "exit_code", 1) != 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert str(named) in lines[0] and c.hint in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    if cid == "st-header-not-json":
        dbg = _cli("--debug", "merge", env.base, env.adapter, "-o", env.out)
        assert dbg.returncode == proc.returncode
        assert "Traceback (most recent call last)" in dbg.stderr
        assert dbg.stderr.rstrip().splitlines()[-1] == lines[0]
