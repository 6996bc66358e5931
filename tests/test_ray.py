"""``lorasave batch --ray``: passes as tasks on a real local Ray cluster, outputs equal to local runs.

The fixture starts a head node (``ray start --head --num-cpus 2`` with a small object store) and
always stops it (``ray stop`` in a finalizer, like a shell trap). The second test kills the task's
worker mid-pass (the task writes its pid, then waits; the test kills that pid) and checks that Ray
retried the pass and that no partial output ever appeared under a final name.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from lorasave.cli.main import main

ray = pytest.importorskip("ray") if not os.environ.get("CI") else __import__("ray")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BASE, LORA = EXAMPLES / "tiny-llama", EXAMPLES / "tiny-llama-lora"
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
    start = [RAY, "start", "--head", "--num-cpus", "2", "--object-store-memory", str(100 * 10**6), "--include-dashboard=false", "--disable-usage-stats"]
    r = subprocess.run(start, env=env, capture_output=True, text=True, timeout=300)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        yield "auto"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def _jobs(root: Path) -> Path:
    shutil.copytree(LORA, root / "runs" / "ck1")
    doc = {
        "base": str(BASE),
        "jobs": [
            {
                "adapters": ["runs/ck1"],
                "outputs": [
                    {"format": "safetensors", "path": "out/st", "max_shard_size": "200KB"},
                    {"format": "gguf", "types": ["q8_0", "f16"], "path": "out/gguf"},
                ],
            },
            {"adapters": ["runs/ck1"], "weights": [0.5], "outputs": [{"format": "safetensors", "path": "out/half"}]},
        ],
    }
    (root / "jobs.yaml").write_text(json.dumps(doc))
    return root / "jobs.yaml"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "lorasave.json"}


def test_batch_on_ray_equals_local(cluster: str, tmp_path: Path) -> None:
    jobs = _jobs(tmp_path)
    r = CliRunner().invoke(main, ["batch", str(jobs), "--ray", cluster, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)  # the document is stdout; stderr may carry Ray's own messages (r.output mixes both)
    assert doc["ok"] and len(doc["outputs"]) == 3
    shutil.move(tmp_path / "out", tmp_path / "ray-out")
    r = CliRunner().invoke(main, ["batch", str(jobs), "--quiet"])
    assert r.exit_code == 0, r.output
    for name in ("st", "gguf", "half"):
        assert _files(tmp_path / "ray-out" / name) == _files(tmp_path / "out" / name), name
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "ray-out" / "st")])
    assert r.exit_code == 0, r.output


def test_killed_task_is_retried_without_partial_output(cluster: str, tmp_path: Path) -> None:
    from lorasave.batch import from_record, load_jobs, pass_records, passes
    from lorasave.pipeline.ray import run_passes_on_ray

    jobs = _jobs(tmp_path)
    groups = passes(load_jobs(jobs))
    pid_file = tmp_path / "task.pid"
    out: list[Any] = []
    driver = threading.Thread(target=lambda: out.append(run_passes_on_ray(pass_records, groups, cluster, max_retries=1, pid_file=str(pid_file))))
    driver.start()
    deadline = time.monotonic() + 240
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid_file.exists(), "the task never started"
    first = int(pid_file.read_text())
    staged = [p.name for p in (tmp_path / "out").iterdir()]
    assert staged and all(".lorasave-tmp-" in n or ".lorasave-lock-" in n for n in staged), staged  # mid-pass: staged, nothing final
    os.kill(first, signal.SIGKILL)
    driver.join(timeout=300)
    assert not driver.is_alive() and out, "the retried pass did not finish"
    outcomes = [from_record(r) for r in out[0][0]]
    assert all(o.ok for o in outcomes), [str(o.error) for o in outcomes]
    assert int(pid_file.read_text()) != first, "the second attempt ran in another worker"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gguf", "half", "st"], "the dead attempt's staging folders were swept"
    shutil.move(tmp_path / "out", tmp_path / "ray-out")
    r = CliRunner().invoke(main, ["batch", str(jobs), "--quiet"])
    assert r.exit_code == 0, r.output
    for name in ("st", "gguf", "half"):
        assert _files(tmp_path / "ray-out" / name) == _files(tmp_path / "out" / name), name


def test_one_merge_split_over_ray_tasks_equals_local(cluster: str, tmp_path: Path) -> None:
    """merge --ray: the shards written by several tasks into the driver's staging folder; the driver
    writes index, config, card and manifest; every file byte-identical to a local merge, and it verifies."""
    args = ["merge", str(BASE), str(LORA), "--max-shard-size", "200KB", "--dtype", "float32", "--verify", "--json"]
    r = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "ray" / "m"), "--ray", cluster])
    assert r.exit_code == 0, r.output
    r2 = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "local" / "m")])
    assert r2.exit_code == 0, r2.output
    ray_files, local_files = _files(tmp_path / "ray" / "m"), _files(tmp_path / "local" / "m")
    assert sum(n.endswith(".safetensors") for n in ray_files) >= 3, sorted(ray_files)
    assert ray_files == local_files
    doc = json.loads((tmp_path / "ray" / "m" / "lorasave.json").read_text())
    assert doc["result"]["verification"]["ok"] and doc["files"] == json.loads((tmp_path / "local" / "m" / "lorasave.json").read_text())["files"]


def test_ray_errors_are_one_line(cluster: str, tmp_path: Path) -> None:
    """Nothing listening at the address: one line at once (Ray itself retries for minutes). An output that fails
    in a task (NaN merge, relative paths planned again on the worker): its own one-line error, no remote traceback.
    --threads beyond any node's CPUs: capped, not a task that waits forever."""
    from safetensors.torch import load_file, save_file

    t0 = time.monotonic()
    r = CliRunner().invoke(main, ["batch", str(_jobs(tmp_path)), "--ray", "127.0.0.1:1"])
    assert r.exit_code == 1 and "no Ray cluster at 127.0.0.1:1" in r.output and time.monotonic() - t0 < 30, r.output
    nan = tmp_path / "nan"
    shutil.copytree(LORA, nan)
    f = nan / "adapter_model.safetensors"
    tensors = load_file(f)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = tensors[key].clone().fill_(float("nan"))
    save_file(tensors, f, metadata={"format": "pt"})
    r = CliRunner().invoke(main, ["merge", str(BASE), str(nan), "-o", str(tmp_path / "m"), "--max-shard-size", "100KB", "--ray", cluster])
    errors = [line for line in r.output.splitlines() if not line.startswith("note:")]
    assert r.exit_code == 1 and len(errors) == 1 and "NaN or Inf" in errors[0] and "Traceback" not in r.output, r.output
    assert not (tmp_path / "m").exists()
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        r = CliRunner().invoke(main, ["merge", os.path.relpath(BASE), os.path.relpath(LORA), "-o", "rel", "--max-shard-size", "100KB", "--ray", cluster])
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0 and (tmp_path / "rel" / "lorasave.json").is_file(), r.output
    r = CliRunner().invoke(main, ["batch", str(tmp_path / "jobs.yaml"), "--ray", cluster, "--threads", "4", "--overwrite", "--quiet"])
    assert r.exit_code == 0, r.output
