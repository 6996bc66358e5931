"""``lorasave batch``: jobs sharing a base in one pass, each output what its single command writes.

Every weight file, config, tokenizer file and card must be byte-identical to the single command's
(run afterwards into the same paths), and ``lorasave.json`` equal but for timings and its creation
time; a failing job is reported and does not stop the others.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lorasave.cli.main import main
from lorasave.pipeline import run as pipeline_run
from lorasave.runtimes.llama_cpp import lib as llama_cpp

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BASE, LORA = EXAMPLES / "tiny-llama", EXAMPLES / "tiny-llama-lora"


def _second_adapter(dst: Path) -> Path:
    """The example adapter with lora_B doubled (another checkpoint of the same run, in effect)."""
    shutil.copytree(LORA, dst)
    f = dst / "adapter_model.safetensors"
    tensors = {k: (v * 2 if "lora_B" in k else v).contiguous() for k, v in load_file(f).items()}
    save_file(tensors, f, metadata={"format": "pt"})
    return dst


def _manifest(p: Path) -> dict[str, Any]:
    doc = json.loads((p / "lorasave.json").read_text())
    doc.pop("created")
    doc["result"].pop("timings", None)  # gguf records them; merge does not
    if "verification" in doc["result"]:
        doc["result"]["verification"].pop("summary", None)
    return doc


def _tree(p: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(p.iterdir()) if f.name != "lorasave.json"}


@pytest.fixture()
def jobs(tmp_path: Path) -> Path:
    _second_adapter(tmp_path / "runs" / "checkpoint-1000")
    shutil.copytree(LORA, tmp_path / "runs" / "checkpoint-500")
    types = ["q8_0", "q4_k_m"] if llama_cpp.available() else ["q8_0", "q4_0"]
    doc = f"""
base: {BASE}
jobs:
  - adapters: [runs/checkpoint-500]
    outputs:
      - {{format: safetensors, path: out/ck500, dtype: bfloat16, max_shard_size: 200KB}}
      - {{format: gguf, types: [{", ".join(types)}], path: out/ck500-gguf}}
  - adapters: [runs/checkpoint-1000]
    outputs: [{{format: safetensors, path: out/ck1000}}]
  - adapters: [runs/missing]
    outputs: [{{format: safetensors, path: out/missing}}]
"""
    (tmp_path / "jobs.yaml").write_text(doc)
    return tmp_path / "jobs.yaml"


def test_batch_one_pass_outputs_equal_single_commands(jobs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = jobs.parent
    passes: list[int] = []
    real = pipeline_run.execute_pass

    def counting(pass_jobs: Any, *a: Any, **kw: Any) -> None:
        passes.append(len(pass_jobs))
        real(pass_jobs, *a, **kw)

    monkeypatch.setattr(pipeline_run, "execute_pass", counting)
    r = CliRunner().invoke(main, ["batch", str(jobs), "--json"])
    assert r.exit_code == 1, r.output  # one job failed: non-zero, the others written
    doc = json.loads(r.output)
    assert [(o["job"], o["ok"]) for o in doc["outputs"]] == [(1, True), (1, True), (2, True), (3, False)]  # jobs numbered from 1, as in the summary
    assert "runs/missing" in doc["outputs"][3]["error"] and not (root / "out" / "missing").exists()
    assert passes == [2], "the two jobs that share the base: one pass, one job each (a job's outputs share its merge)"
    gguf_types = json.loads((root / "out" / "ck500-gguf" / "lorasave.json").read_text())["settings"]["type"]

    shutil.move(root / "out", root / "batch-out")
    base, ck500, ck1000 = str(BASE), str(root / "runs" / "checkpoint-500"), str(root / "runs" / "checkpoint-1000")
    for args in (
        ["merge", base, ck500, "-o", str(root / "out" / "ck500"), "--dtype", "bfloat16", "--max-shard-size", "200KB"],
        ["gguf", base, ck500, "-o", str(root / "out" / "ck500-gguf"), "--type", gguf_types],
        ["merge", base, ck1000, "-o", str(root / "out" / "ck1000")],
    ):
        s = CliRunner().invoke(main, [*args, "--quiet"])
        assert s.exit_code == 0, s.output
    for name in ("ck500", "ck500-gguf", "ck1000"):
        single, batched = root / "out" / name, root / "batch-out" / name
        assert _tree(batched) == _tree(single), name
        assert _manifest(batched) == _manifest(single), name
    assert _tree(root / "batch-out" / "ck500") != _tree(root / "batch-out" / "ck1000")


def test_batch_max_jobs_per_pass_and_json_jobs(jobs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = jobs.parent
    passes: list[int] = []
    real = pipeline_run.execute_pass
    monkeypatch.setattr(pipeline_run, "execute_pass", lambda j, *a, **kw: (passes.append(len(j)), real(j, *a, **kw))[1])
    doc = {
        "base": str(BASE),
        "jobs": [
            {"adapters": ["runs/checkpoint-500"], "outputs": [{"format": "safetensors", "path": "json-out/a"}]},
            {"adapters": ["runs/checkpoint-1000"], "weights": [0.5], "outputs": [{"format": "safetensors", "path": "json-out/b"}]},
        ],
    }
    (root / "jobs.json").write_text(json.dumps(doc))
    r = CliRunner().invoke(main, ["batch", str(root / "jobs.json"), "--max-jobs-per-pass", "1", "--threads", "2"])
    assert r.exit_code == 0, r.output
    assert passes == [1, 1] and "2 of 2 outputs written in 2 pass(es)" in r.output
    assert json.loads((root / "json-out" / "b" / "lorasave.json").read_text())["settings"]["weights"] == [0.5]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("jobs: [", "is not YAML or JSON"),
        ("base: x\n", "needs a top-level 'jobs:' list"),
        ("jobs: [{adapters: [a], outputs: [{format: safetensors, path: o}], dtype: bf16}]", "job 1: unknown key(s) dtype"),
        ("base: x\njobs: [{adapters: [a], outputs: [{format: onnx, path: o}]}]", "format 'onnx' is not one of safetensors, gguf"),
        ("jobs: [{adapters: [a], outputs: [{format: gguf, path: o}]}]", "job 1 names no base"),
        ("base: x\njobs: [{adapters: [a], outputs: [{path: o}]}]", "job 1, output 1: format must be a non-empty string"),
        ("!!python/object/apply:os.system ['true']", "is not YAML or JSON"),
        ("jobs: " + "[" * 5000 + "]" * 5000, "nests deeper than 100 levels"),
        (
            "a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b]\n"
            "base: x\njobs: [{adapters: *c, outputs: [{format: safetensors, path: o}]}]",
            "uses a YAML alias (*a, line 2)",
        ),
        (
            "base: x\njobs: [{adapters: [a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, "
            "a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a], outputs: [{format: gguf, path: o}]}]",
            "job 1 has 65 adapters; at most 64",
        ),
    ],
)
def test_bad_jobs_files_one_line(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "jobs.yaml").write_text(text)
    r = CliRunner().invoke(main, ["batch", str(tmp_path / "jobs.yaml")])
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_failing_output_fails_only_itself(jobs: Path) -> None:
    """An output whose planning fails (a tokenizer folder that is not there) is reported; its job's other output is written."""
    root = jobs.parent
    doc = f"""
base: {BASE}
jobs:
  - adapters: [runs/checkpoint-500]
    outputs:
      - {{format: gguf, path: o/bad, tokenizer: no-such-tokenizer}}
      - {{format: safetensors, path: o/good}}
"""
    (root / "j.yaml").write_text(doc)
    r = CliRunner().invoke(main, ["batch", str(root / "j.yaml")])
    assert r.exit_code == 1
    assert "job 1 gguf" in r.output and "FAILED" in r.output and "no-such-tokenizer" in r.output and "1 of 2 outputs written" in r.output
    assert (root / "o" / "good" / "lorasave.json").is_file() and not (root / "o" / "bad").exists()


def test_jobs_file_checked_before_any_pass(jobs: Path) -> None:
    """A typo in an output option or a GGUF type fails the whole file at once (exit 2), before any output is written."""
    root = jobs.parent
    for bad, message in (
        ("{format: safetensors, path: o/b, dtpye: bfloat16}", "job 2, output 1: a safetensors output takes no option dtpye"),
        ("{format: gguf, path: o/b, types: [q4_k_n]}", "job 2, output 1: type: GGUF type 'q4_k_n' is not supported"),
        ("{format: gguf, path: o/b, types: [q4_k_m], output_tensor_type: q7_k}", "job 2, output 1: output_tensor_type: GGML type 'q7_k' is not supported"),
        ("{format: gguf, path: o/b, types: [q4_k_m], pure: 'yes'}", "job 2, output 1: pure must be true or false"),
        ("{format: safetensors, path: o/b, max_shard_size: lots}", "job 2, output 1: max_shard_size:"),
    ):
        (root / "j.yaml").write_text(
            f"base: {BASE}\njobs:\n  - adapters: [runs/checkpoint-500]\n    outputs: [{{format: safetensors, path: o/a}}]\n"
            f"  - adapters: [runs/checkpoint-500]\n    outputs: [{bad}]\n"
        )
        r = CliRunner().invoke(main, ["batch", str(root / "j.yaml"), "--max-jobs-per-pass", "1"])
        assert r.exit_code == 2 and message in r.output, r.output
        assert not (root / "o").exists()


def test_quiet_batch_still_names_failures_and_paths_are_never_cwd_relative(jobs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = jobs.parent
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(LORA, elsewhere / "runs" / "only-here")
    (root / "j.yaml").write_text(f"base: {BASE}\njobs:\n  - adapters: [runs/only-here]\n    outputs: [{{format: safetensors, path: o/a}}]\n")
    monkeypatch.chdir(elsewhere)  # runs/only-here exists relative to the current folder, not beside j.yaml
    r = CliRunner().invoke(main, ["batch", str(root / "j.yaml"), "-q"])
    assert r.exit_code == 1
    assert r.output.startswith("error: job 1 safetensors") and str(root / "runs" / "only-here") in r.output, r.output
    assert not (root / "o" / "a").exists()


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ("[{format: safetensors, path: o/x}, {format: gguf, path: o/x}]", "is also, or lies inside, job 2 safetensors output"),
        ("[{format: safetensors, path: o/x}, {format: safetensors, path: o/x/inner}]", "is also, or lies inside"),
        ("[{format: safetensors, path: runs/checkpoint-1000/merged}]", "overlaps the source folder"),
        ("[{format: safetensors, path: runs/checkpoint-1000}]", "overlaps the source folder"),
        ("[{format: safetensors, path: o/y, overwrite: true}]", "overwrite is not an output option; give it to the batch command (--overwrite)"),
        ("[{format: gguf, path: o/y, verify: 'no'}]", "verify must be true or false, not 'no'"),
        ("[{format: safetensors, path: o/y, dtype: [" + ", ".join(["bfloat16"] * 400) + "]}]", "characters)"),
    ],
)
def test_outputs_checked_against_each_other_and_every_source(jobs: Path, outputs: str, message: str) -> None:
    """Two outputs at one path (or one inside another), an output in any job's source folder, batch options
    in an output, a string for a true/false option: refused before anything runs; long values cut short."""
    root = jobs.parent
    (root / "j.yaml").write_text(
        f"base: {BASE}\njobs:\n  - adapters: [runs/checkpoint-1000]\n    outputs: [{{format: safetensors, path: o/first}}]\n"
        f"  - adapters: [runs/checkpoint-500]\n    outputs: {outputs}\n"
    )
    r = CliRunner().invoke(main, ["batch", str(root / "j.yaml"), "--overwrite"])
    unsafe = "overlaps" in message or "lies inside" in message  # UnsafePathError: exit 1, option errors: 2
    assert r.exit_code == (1 if unsafe else 2) and message in r.output and len(r.output) < 1200, r.output
    assert not (root / "o").exists() and sorted(p.name for p in (root / "runs" / "checkpoint-1000").iterdir()) == sorted(p.name for p in LORA.iterdir())


def test_jobs_file_that_is_a_folder(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["batch", str(tmp_path)])
    assert r.exit_code == 2 and "is a folder; give the YAML or JSON file" in r.output


def test_free_space_is_shared_by_the_outputs_of_a_pass(jobs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outputs of one pass on one file system share its free space: with room for about two, the first two are
    written and the third is refused before anything is written (not all three failing when the disk fills)."""
    from collections import namedtuple

    from lorasave.pipeline import output as pipeline_output

    root = jobs.parent
    single = CliRunner().invoke(main, ["merge", str(BASE), str(LORA), "-o", str(root / "probe"), "--json"])
    size = sum(p.stat().st_size for p in (root / "probe").iterdir())
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(pipeline_output.shutil, "disk_usage", lambda p: usage(10**12, 0, int(size * 2.5)))
    outs = ", ".join(f"{{format: safetensors, path: o/{k}}}" for k in "abc")
    (root / "j.yaml").write_text(f"base: {BASE}\njobs:\n  - adapters: [runs/checkpoint-500]\n    outputs: [{outs}]\n")
    r = CliRunner().invoke(main, ["batch", str(root / "j.yaml")])
    assert single.exit_code == 0 and r.exit_code == 1, r.output
    assert "needed by the outputs before it in this pass" in r.output and "2 of 3 outputs written" in r.output, r.output
    assert (root / "o" / "a" / "lorasave.json").is_file() and (root / "o" / "b" / "lorasave.json").is_file() and not (root / "o" / "c").exists()
