"""SIGKILL at seeded-random points of ``lorasave merge``, ``gguf`` and ``push`` (real subprocesses).

After every kill: nothing appears under OUT's name (or, with ``--overwrite``, the old OUT is still
there, byte-identical and verifying), BASE and ADAPTER are byte-identical, and the next run sweeps
the killed run's hidden ``.OUT.lorasave-tmp-*`` folder. A push killed midway leaves the Hub
stand-in with no corrupt file, and re-running it completes. Two concurrent merges to one OUT never
remove each other's staging folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hub_server import WRITE_TOKEN, HubStandIn
from lorasave.verify.run import verify

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_BASE = REPO / "examples" / "tiny-llama"
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SEED = int(os.environ.get("LORASAVE_KILL_SEED", "20261129"))


# --------------------------------------------------------------------------- sources


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A Llama (hidden 256, 4 layers, vocab 4096, ~16 MB bf16 in 3 shards) and a rank-16 LoRA on every Linear."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("kill-sources")
    base, adapter = root / "base", root / "adapter"
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=4096,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.save_pretrained(base, max_shard_size="6MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(EXAMPLE_BASE / name, base / name)
    assert len(list(base.glob("model-*-of-*.safetensors"))) >= 3

    r, dims = 16, {}
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in LINEAR:
            dims[name] = (mod.in_features, mod.out_features)
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name, (fan_in, fan_out) in dims.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, fan_in, generator=g) / fan_in**0.5
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(fan_out, r, generator=g) * 0.01
    adapter.mkdir()
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((REPO / "examples" / "tiny-llama-lora" / "adapter_config.json").read_text())
    config.update(r=r, lora_alpha=32, target_modules=list(LINEAR), base_model_name_or_path=str(base))
    (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return base, adapter


# --------------------------------------------------------------------------- helpers


def _tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file (and every folder, as 'dir') under ``folder``."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.update(extra)
    return env


def _staging(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.lorasave-*"))


def _cmd(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "lorasave", *map(str, args)]


def _measure(cmd: list[str], out: Path, env: dict[str, str]) -> tuple[float, float]:
    """Run ``cmd`` to completion; return when its staging folder appeared and when it was renamed to OUT (seconds)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    t_stage = t_commit = None
    while proc.poll() is None:
        staged = any("-tmp-" in p.name for p in _staging(out))
        if t_stage is None and staged:
            t_stage = time.monotonic() - t0
        if t_stage is not None and t_commit is None and not staged:
            t_commit = time.monotonic() - t0
        time.sleep(0.002)
    end = time.monotonic() - t0
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    assert t_stage is not None, "the run was too quick to see its staging folder"
    return t_stage, t_commit if t_commit is not None else end


def _kill_after(cmd: list[str], delay: float, out: Path, env: dict[str, str]) -> tuple[str, bool]:
    """Start ``cmd``, SIGKILL it after ``delay`` s; return where it was (what its staging folder held), and whether it had committed."""
    before = set(_staging(out))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    seen: set[Path] = set()
    end = time.monotonic() + delay
    while (left := end - time.monotonic()) > 0:
        seen |= {p for p in _staging(out) if "-tmp-" in p.name} - before
        time.sleep(min(left, 0.01))
    stage = [p for p in _staging(out) if "-tmp-" in p.name and p not in before]
    proc.send_signal(signal.SIGKILL)
    committed = bool(seen) and not stage
    if committed:
        where = "after the rename to OUT"
    elif not stage:
        where = "before staging"
    else:
        try:
            where = f"staging with {sorted(f.name for f in stage[-1].iterdir())}"
        except FileNotFoundError:
            where, committed = "during the rename to OUT", True
    _, err = proc.communicate(timeout=60)
    if proc.returncode != -signal.SIGKILL:  # finished just before the kill (the machine was quicker this time)
        assert proc.returncode == 0, err
        where, committed = "finished before the kill", True
    return where, committed


def _assert_sources_unchanged(base: Path, adapter: Path, before: tuple[dict[str, str], dict[str, str]]) -> None:
    assert (_tree(base), _tree(adapter)) == before, "a killed run changed BASE or ADAPTER"


def _assert_after_kill(out: Path, old: dict[str, str] | None, committed: bool) -> None:
    """Nothing new under OUT's name: absent, or the old complete output byte-identical and verifying.

    ``committed``: the kill came after the run had renamed its complete output to OUT (its staging
    folder was gone): then OUT must be that new, complete output.
    """
    if committed:
        assert verify(out, level="files").ok
        assert old is None or _tree(out) != old
    elif old is None:
        assert not out.exists() and not out.is_symlink(), f"{out} appeared after a kill"
    else:
        assert _tree(out) == old, "the old OUT changed after a killed --overwrite run"
        assert verify(out, level="files").ok


def _kill_series(kind: str, cmd: list[str], out: Path, sources: tuple[Path, Path], n: int, rng: random.Random, env: dict[str, str]) -> list[str]:
    """``n`` kills of ``cmd`` (with --overwrite), alternating an absent and an existing old OUT; each followed by a full run."""
    base, adapter = sources
    before = (_tree(base), _tree(adapter))
    t_stage, t_commit = _measure(cmd, out, env)  # leaves a complete OUT
    lo, hi = 0.9 * t_stage, t_stage + 0.9 * (t_commit - t_stage)  # mostly while the staging folder fills
    log = [f"{kind}: staging appears at {t_stage:.2f} s, renamed to OUT at {t_commit:.2f} s; kills in [{lo:.2f}, {hi:.2f}] s"]
    for i in range(n):
        old = None
        if i % 2 == 0:
            shutil.rmtree(out)
        else:
            old = _tree(out)
        delay = rng.uniform(lo, hi)
        where, committed = _kill_after(cmd, delay, out, env)
        left = [p.name.split(".lorasave-")[1] for p in _staging(out)]
        log.append(f"{kind} kill {i + 1}/{n} at {delay:.2f} s ({'old OUT present' if old else 'no OUT'}): {where}; left {left}")
        _assert_after_kill(out, old, committed)
        _assert_sources_unchanged(base, adapter, before)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        assert _staging(out) == [], f"the run after the kill left {_staging(out)}"
        assert verify(out, level="files").ok
        if old is not None:
            assert _tree(out).keys() == old.keys()
    _assert_sources_unchanged(base, adapter, before)
    print("\n".join(log))
    return log


def _warm_cache(base: Path, adapter: Path, tmp: Path) -> None:
    """Fill the lorasave cache (architecture facts, source sha256) so every measured run is a warm one."""
    import lorasave

    lorasave.merge(base, adapter, tmp / "warm")


# --------------------------------------------------------------------------- merge and gguf


def test_kill_merge(sources: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = sources
    _warm_cache(base, adapter, tmp_path)
    out = tmp_path / "merged"
    cmd = _cmd("merge", base, adapter, "-o", out, "--dtype", "bfloat16", "--max-shard-size", "6MB", "--overwrite")
    _kill_series("merge", cmd, out, sources, 10, random.Random(SEED), _env())
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 3


def test_kill_gguf(sources: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = sources
    _warm_cache(base, adapter, tmp_path)
    out = tmp_path / "gguf"
    cmd = _cmd("gguf", base, adapter, "-o", out, "--type", "q8_0", "--overwrite")
    _kill_series("gguf", cmd, out, sources, 5, random.Random(SEED + 1), _env())
    assert len(list(out.glob("*.gguf"))) == 1


# --------------------------------------------------------------------------- push


@pytest.fixture
def slow_hub(tmp_path: Path) -> Iterator[HubStandIn]:
    """The Hub stand-in, each request answered after 0.1 s (a commit after 0.6 s) so a push can be cut anywhere."""
    server = HubStandIn(tmp_path / "hub-storage")
    handle = server.handle

    def slow(req):  # type: ignore[no-untyped-def]
        time.sleep(0.6 if "/commit/" in req.path else 0.1)
        return handle(req)

    server.handle = slow  # type: ignore[method-assign]
    server.start()
    assert server._httpd is not None
    server._httpd.handle_error = lambda request, client_address: None  # type: ignore[method-assign]  # a killed client's broken pipe
    try:
        yield server
    finally:
        server.stop()


def test_kill_push(sources: tuple[Path, Path], slow_hub: HubStandIn, tmp_path: Path) -> None:
    import lorasave

    base, adapter = sources
    folder = lorasave.merge(base, adapter, tmp_path / "to-push", max_shard_size="6MB").output
    local = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    before = (_tree(base), _tree(adapter), _tree(folder))
    env = _env(HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0", HF_ENDPOINT=slow_hub.url, HF_TOKEN=WRITE_TOKEN, HF_HOME=str(tmp_path / "hf-home"))
    env.pop("HF_OIDC_RESOURCE", None)

    t0 = time.monotonic()
    proc = subprocess.run(_cmd("push", folder, "tester/kill-measure"), capture_output=True, text=True, env=env, timeout=120, check=False)
    total = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    n_req = len(slow_hub.requests)
    rng = random.Random(SEED + 2)
    log = [f"push: a run takes {total:.2f} s and {n_req} requests"]
    for i in range(5):
        repo = f"tester/kill-push-{i}"
        cmd = _cmd("push", folder, repo)
        seen = len(slow_hub.requests)
        delay = rng.uniform(0.25 * total, 0.97 * total)
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        time.sleep(delay)
        reqs = [f"{r.method} {r.path.rsplit('/', 2)[-2] if r.path.count('/') > 3 else r.path}" for r in slow_hub.requests[seen:]]
        p.send_signal(signal.SIGKILL)
        _, err = p.communicate(timeout=60)
        assert p.returncode == -signal.SIGKILL, f"the push ended by itself (rc {p.returncode}) before the kill at {delay:.2f} s: {err}"
        stored = slow_hub.files(repo) if slow_hub.repo_exists(repo) else {}
        log.append(f"push kill {i + 1}/5 at {delay:.2f} s after {len(reqs)} request(s) {reqs[-1:]}: {len(stored)} file(s) on the Hub")
        for name, data in stored.items():  # the Hub holds no half file: each stored file is the local one
            assert name == ".gitattributes" or data == local[name], name
        assert (_tree(base), _tree(adapter), _tree(folder)) == before
        rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
        assert rerun.returncode == 0, rerun.stderr
        stored = slow_hub.files(repo)
        stored.pop(".gitattributes", None)
        assert stored == local
    print("\n".join(log))


# --------------------------------------------------------------------------- concurrency


def test_concurrent_merges_to_one_out(sources: tuple[Path, Path], tmp_path: Path) -> None:
    """Two merges to one OUT, started together (then staggered, over an old OUT): neither removes the other's staging folder."""
    base, adapter = sources
    _warm_cache(base, adapter, tmp_path)
    out = tmp_path / "both"
    rng = random.Random(SEED + 3)
    for round_, extra in enumerate(([], ["--overwrite"])):
        cmd = _cmd("merge", base, adapter, "-o", out, "--max-shard-size", "6MB", *extra)
        stagger = 0.0 if round_ == 0 else rng.uniform(0.0, 1.0)
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())]
        time.sleep(stagger)
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()))
        results = [(p.wait(timeout=120), p.communicate()[1]) for p in procs]
        print(f"concurrent round {round_ + 1} (second started {stagger:.2f} s later): exit codes {[rc for rc, _ in results]}")
        for rc, err in results:
            # 0, or a clean refusal (OUT appeared meanwhile); never a vanished staging folder
            assert rc == 0 or (err.startswith("error: output") and "already exists" in err), err
            assert "internal error" not in err and "No such file" not in err and "not empty" not in err, err
        assert any(rc == 0 for rc, _ in results)
        assert verify(out, level="files").ok
        assert _staging(out) == []
