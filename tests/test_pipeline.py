"""The pass: one read and one merge feeding several writers, each output byte-identical to its own run.

Several outputs of one job in one pass receive tensors in plan order rather than each file's
order, so the safetensors writer writes each tensor at its offset and hashes the file at the end;
the bytes must still be those ``lorasave merge`` writes alone (which transformers' own
``save_pretrained`` layout tests pin down).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import lorasave
from lorasave.errors import NonFiniteResultError
from lorasave.formats.safetensors.output import SafetensorsOutput
from lorasave.pipeline.execute import PassJob, execute_pass, pass_order
from lorasave.plan.merge_plan import build_plan
from lorasave.sources.adapter import load_adapters
from lorasave.sources.architecture import inspect_architecture
from lorasave.sources.checkpoint import open_checkpoint

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BASE, LORA = EXAMPLES / "tiny-llama", EXAMPLES / "tiny-llama-lora"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _plan(dtype: torch.dtype, shard: int, weights: list[float] | None = None):  # type: ignore[no-untyped-def]
    ckpt = open_checkpoint(BASE)
    ads = load_adapters([LORA])
    return build_plan(ckpt, ads, inspect_architecture(ckpt.config), out_dtype=dtype, max_shard_size=shard, weights=weights), ads


@pytest.mark.parametrize("shard", [10**9, 200_000])
def test_two_outputs_one_pass_equal_their_single_runs(tmp_path: Path, shard: int) -> None:
    plans = {dt: _plan(dt, shard) for dt in (torch.bfloat16, torch.float32)}
    ads = plans[torch.bfloat16][1]
    outs = {dt: SafetensorsOutput(plan) for dt, (plan, _) in plans.items()}
    folders = {dt: tmp_path / f"pass-{dt}".replace("torch.", "") for dt in outs}
    for f in folders.values():
        f.mkdir()
    job = PassJob(plans[torch.bfloat16][0], ads, [(outs[dt], folders[dt]) for dt in outs])
    order = pass_order([job])  # two writers: plan order (what a GGUF writer needs), not one file's order
    assert order == list(plans[torch.bfloat16][0].tensors)
    execute_pass([job], order=order[::-1])  # reversed: every tensor lands out of file order
    assert not outs[torch.bfloat16]._in_order
    assert job.failures == {}
    for dt, out in outs.items():
        single = lorasave.merge(BASE, LORA, tmp_path / f"single-{dt}".replace("torch.", ""), dtype=dt, max_shard_size=shard)
        shards = sorted(n for n in single.files if n.endswith(".safetensors"))
        assert sorted(out.files) == shards
        for name in shards:
            assert _sha(folders[dt] / name) == _sha(single.output / name) == out.files[name]


def test_a_failing_writer_does_not_stop_the_others(tmp_path: Path) -> None:
    """A delta weighted 1e9 overflows float16 but not bfloat16: the float16 output fails alone."""
    (plan16, ads), (plan_bf, _) = _plan(torch.float16, 10**9, [1e9]), _plan(torch.bfloat16, 10**9, [1e9])
    a, b = SafetensorsOutput(plan16), SafetensorsOutput(plan_bf)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    job = PassJob(plan_bf, ads, [(a, tmp_path / "a"), (b, tmp_path / "b")])
    execute_pass([job])
    assert list(job.failures) == [0] and isinstance(job.failures[0], NonFiniteResultError)
    assert sorted(b.files) == ["model.safetensors"] and _sha(tmp_path / "b" / "model.safetensors") == b.files["model.safetensors"]
    single = lorasave.merge(BASE, LORA, tmp_path / "single", dtype="bfloat16", weights=[1e9])
    assert _sha(single.output / "model.safetensors") == b.files["model.safetensors"]


@pytest.mark.parametrize("kind", ["safetensors", "gguf"])
def test_output_bytes_do_not_depend_on_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """--threads 1, 2, 3: the same bytes; with 3 threads (2 merge workers) the merged blocks come from the pool.

    The blocks are made small (4 KiB) so that every tiny tensor has several and the pool computes
    them ahead and out of order; the block size is the same for every thread count. The machine is
    made to look like 8 cores (threads are capped at the cores minus one for the writers)."""
    from lorasave.cli.main import main
    from lorasave.merging import stream
    from lorasave.pipeline import threads

    monkeypatch.setattr(stream, "MERGE_BLOCK_BYTES", 4096)
    monkeypatch.setattr(threads, "machine_threads", lambda: 8)
    pooled: list[str] = []
    real = stream._pooled_blocks

    def spy(t, *a):  # type: ignore[no-untyped-def]
        pooled.append(t.name)
        yield from real(t, *a)

    monkeypatch.setattr(stream, "_pooled_blocks", spy)
    digests = {}
    for n in (1, 2, 3, 4):
        pooled.clear()
        out = tmp_path / str(n) / "out"
        args = (
            ["merge", str(BASE), str(LORA), "-o", str(out), "--max-shard-size", "200KB"]
            if kind == "safetensors"
            else ["gguf", str(BASE), str(LORA), "-o", str(out), "--type", "q8_0,f16"]
        )
        r = CliRunner().invoke(main, [*args, "--threads", str(n), "--quiet"])
        assert r.exit_code == 0, r.output
        assert (len(pooled) > 0) == (n > 2), (n, pooled)
        digests[n] = {p.name: _sha(p) for p in sorted(out.iterdir()) if p.name != "lorasave.json"}
    assert len(digests[1]) > 2 and digests[1] == digests[2] == digests[3] == digests[4]


def test_shard_task_rewrites_a_dead_attempts_files(tmp_path: Path) -> None:
    """A retried Ray task of a split merge first removes the partial files of its own shards (``xb`` would refuse
    them), writes only its shards, and they equal the local merge's; other shards' files are left alone."""
    from lorasave.api import plan_merge
    from lorasave.pipeline.ray import shard_task

    single = lorasave.merge(BASE, LORA, tmp_path / "single", max_shard_size=100_000)
    shards = sorted(n for n in single.files if n.endswith(".safetensors"))
    assert len(shards) >= 3
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / shards[0]).write_bytes(b"half a shard from the attempt that was killed")
    (staging / shards[1]).write_bytes(b"another task's file")
    args = (str(BASE), [str(LORA)], str(tmp_path / "out"))
    rec = shard_task(plan_merge, args, {"max_shard_size": 100_000}, [shards[0], shards[2]], str(staging), 1)
    assert sorted(rec["files"]) == [shards[0], shards[2]]
    for name in (shards[0], shards[2]):
        assert _sha(staging / name) == _sha(single.output / name) == rec["files"][name]
    assert (staging / shards[1]).read_bytes() == b"another task's file"
