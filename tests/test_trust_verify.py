"""Issue 11, points 11, 12 and 8 (GGUF given to verify): one honest verify verdict.

Every level says what it checked, with the numbers of ``--json``; a level that checked nothing
exits 5; adapter and GGUF adapter outputs are compared with their source; quantized GGUF tensors
are bit-equal to the reference quantizer; quantized logits are reported, not judged; a malformed
GGUF or a file that differs from lorasave.json stops the check with one line.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lorasave
from lorasave.verify.run import verify

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "examples" / "tiny-llama"
LORA = REPO / "examples" / "tiny-llama-lora"


from test_verify import _rehash  # noqa: E402


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lorasave", *args], capture_output=True, text=True, timeout=300)


def _wrong_alpha(adapter: Path, tmp_path: Path) -> Path:
    wrong = tmp_path / "wrong"
    shutil.copytree(adapter, wrong)
    cfg = json.loads((wrong / "adapter_config.json").read_text())
    cfg["lora_alpha"] = cfg["lora_alpha"] * 1.5
    (wrong / "adapter_config.json").write_text(json.dumps(cfg))
    return wrong


@pytest.fixture
def merged(tmp_path: Path) -> Path:
    return lorasave.merge(BASE, LORA, tmp_path / "out", max_shard_size="100KB").output


# ----------------------------------------------------------------- point 11: say what was checked


@pytest.mark.parametrize("level", ["files", "tensors", "logits"])
def test_counts_printed_and_equal_to_json(merged: Path, level: str) -> None:
    text = _cli("verify", str(merged), "--level", level)
    as_json = _cli("verify", str(merged), "--level", level, "--json")
    assert text.returncode == 0 and as_json.returncode == 0, (text.stderr, as_json.stderr)
    d = json.loads(as_json.stdout)
    line = text.stdout.strip()
    assert line.startswith("verified") and line == d["summary"]
    m = re.search(r"(\d+) files: (\d+) match lorasave.json", line)
    assert m and (int(m[1]), int(m[2])) == (d["files_total"], d["files_checked"]) and d["files_checked"] > 0
    if level == "tensors":
        m = re.search(r"(\d+) tensors: (\d+) bit-equal, (\d+) probed, (\d+) not checkable", line)
        assert m, line
        assert [int(g) for g in m.groups()] == [d["tensors_total"], d["tensors_exact"], d["tensors_probed"], len(d["not_probed"])]
        assert (d["tensors_total"], d["tensors_exact"], d["tensors_probed"]) == (21, 7, 14)
    if level == "logits":
        assert d["top1_agreement"] == 1.0 and d["logits_judged"] is True and d["logits_runtime"] == "transformers"
        assert f"top-1 agreement {d['top1_agreement']:.3f}" in line


def test_failure_names_first_five_tensors_and_count(merged: Path, tmp_path: Path) -> None:
    res = _cli("verify", str(merged), "--adapter", str(_wrong_alpha(LORA, tmp_path)))
    assert res.returncode == 1
    line = res.stdout.strip()
    report = verify(merged, adapters=[_wrong_alpha(LORA, tmp_path / "again")])
    names = [n for n, _ in report.failures]
    assert len(names) == 14 and report.tensors_failed == 14
    assert line.startswith(f"FAILED {merged}: 14 failing ({', '.join(names[:5])} and 9 more)"), line
    assert "21 tensors: 7 bit-equal, 0 probed, 0 not checkable, 14 fail" in line


def test_nothing_checked_exits_5(tmp_path: Path) -> None:
    """A level that checked nothing says so and exits 5; it never prints "verified"."""
    out = lorasave.merge(BASE, LORA, tmp_path / "out").output
    manifest = json.loads((out / "lorasave.json").read_text())
    manifest["files"] = {}
    (out / "lorasave.json").write_text(json.dumps(manifest))
    res = _cli("verify", str(out), "--level", "files")
    assert res.returncode == 5 and "verified" not in res.stdout + res.stderr, (res.stdout, res.stderr)
    assert res.stderr.strip().startswith("error: nothing checked at the files level") and len(res.stderr.strip().splitlines()) == 1
    js = _cli("verify", str(out), "--level", "files", "--json")
    assert js.returncode == 5 and json.loads(js.stdout)["checked"] is False
    weighted = lorasave.merge(BASE, LORA, tmp_path / "w", weights=[2.0]).output  # the logits level skips weighted combinations
    res = _cli("verify", str(weighted), "--level", "logits")
    assert res.returncode == 5 and "nothing checked at the logits level" in res.stderr and "weighted" in res.stderr, res.stderr


def test_adapter_output_compared_with_source(tmp_path: Path) -> None:
    out = lorasave.save_adapter(LORA, tmp_path / "a", dtype="bfloat16").output
    report = verify(out)
    assert report.ok and report.checked and report.tensors_exact == report.tensors_total > 0, report
    st = out / "adapter_model.safetensors"
    from lorasave.formats.safetensors.header import read_header

    entry = next(iter(read_header(st).tensors.values()))
    data = bytearray(st.read_bytes())
    data[entry.offset + 1] ^= 0x40
    st.write_bytes(bytes(data))
    _rehash(out, st)
    bad = verify(out)
    assert [n for n, _ in bad.failures] == [entry.name], bad.failures


def test_gguf_lora_adapter_probed(tmp_path: Path) -> None:
    """lora_a/lora_b are probed against the source after undoing the Q/K permutation and the folded scale."""
    from lorasave.formats.gguf.adapter import export_gguf_adapter

    out = export_gguf_adapter(BASE, LORA, tmp_path / "a", type="f32").output
    report = verify(out)
    assert report.ok and report.tensors_probed == 28 and report.tensors_total == 28, report
    assert not verify(out, adapters=[_wrong_alpha(LORA, tmp_path)]).ok
    from lorasave.formats.gguf import adapter as gguf_adapter

    real = gguf_adapter.permute_qk
    gguf_adapter.permute_qk = lambda w, *a: w  # B rows not permuted: Q/K pairs must fail
    try:
        raw = export_gguf_adapter(BASE, LORA, tmp_path / "raw", type="f32").output
    finally:
        gguf_adapter.permute_qk = real
    failed = {n for n, _ in verify(raw).failures}
    assert failed and all(n.endswith(("q_proj.weight", "k_proj.weight")) for n in failed), failed


# ----------------------------------------------------------------- point 12: quantized GGUF verdicts


@pytest.mark.parametrize("type", ["q8_0", "q4_0"])
def test_quantized_gguf_bit_equal_to_reference_quantizer(type: str, tmp_path: Path) -> None:
    import gguf

    from lorasave.formats.gguf.export import export_gguf

    res = export_gguf(BASE, LORA, tmp_path / "g", type=type)
    manifest = json.loads((res.output / "lorasave.json").read_text())
    assert manifest["result"]["quantized_from"] == "f32"
    report = verify(res.output)
    assert report.ok and report.tensors_exact == report.tensors_total == 21 and report.tensors_probed == 0, report
    t = next(t for t in gguf.GGUFReader(res.gguf_file).tensors if t.name == "blk.0.ffn_up.weight")
    data = bytearray(res.gguf_file.read_bytes())
    data[t.data_offset + 5] ^= 0x01  # one low bit of one quantized code: within the old probe bound
    res.gguf_file.write_bytes(bytes(data))
    _rehash(res.output, res.gguf_file)
    bad = verify(res.output)
    assert [n for n, _ in bad.failures] == ["model.layers.0.mlp.up_proj.weight"], bad.failures
    assert "1 of" in bad.failures[0][1] and "reference quantizer" in bad.failures[0][1]


def test_kquant_bytes_need_the_runtime_else_not_checkable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peft import LoraConfig

    import _models as M
    from _llama import need_llama_cpp
    from lorasave.formats.gguf.export import export_gguf

    need_llama_cpp()
    base = M.save_model(M.build_llama(0, hidden=256, layers=1), tmp_path / "base")  # rows of 256: real Q4_K/Q6_K blocks
    lora = M.make_adapter(base, tmp_path / "lora", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), seed=1)
    res = export_gguf(base, lora, tmp_path / "g", type="q4_k_m", tokenizer=BASE)
    assert {"Q4_K", "Q6_K"} & set(res.tensor_types), res.tensor_types
    assert json.loads((res.output / "lorasave.json").read_text())["result"]["quantized_from"] == "f32"
    report = verify(res.output)
    assert report.ok and report.tensors_exact == report.tensors_total > 0, report
    monkeypatch.setenv("LORASAVE_LLAMA_CPP_DIR", str(tmp_path / "no-runtime"))
    without = verify(res.output)
    assert without.ok and without.not_probed, without
    assert all("llama.cpp's own quantizer" in why for why in without.not_probed.values())
    assert f"{len(without.not_probed)} not checkable" in without.summary()


def test_quantized_logits_reported_not_judged(tmp_path: Path) -> None:
    """A correct q8_0 file used to fail --level logits (a bound for float outputs); now reported."""
    from lorasave.formats.gguf.export import export_gguf

    out = export_gguf(BASE, LORA, tmp_path / "g", type="q8_0").output
    wrong = _wrong_alpha(LORA, tmp_path)
    res = _cli("verify", str(out), "--level", "logits", "--json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["ok"] and d["logits_judged"] is False and d["logits_kl"] is not None and d["top1_agreement"] is not None
    assert d["logits_runtime"] in ("llama.cpp", "transformers") and "not judged" in d["summary"] and "verified" not in d["summary"]
    assert verify(out, adapters=[wrong]).failures  # the verdict is the tensors level's


def test_readme_has_verdict_table() -> None:
    text = (REPO / "README.md").read_text()
    assert "How verify judges each output kind" in text
    table = text.split("How verify judges each output kind", 1)[1].split("\n\n", 2)[1]
    for row in ("safetensors 16/32-bit", "bnb 4-bit", "GGUF float", "GGUF quantized", "GGUF LoRA", "PEFT adapter", "ONNX"):
        assert any(line.startswith(f"| {row}") for line in table.splitlines()), row
    assert re.search(r"\b5\b[^\n]*nothing", text.split("exit code", 1)[1][:600]), "exit 5 documented"


# ----------------------------------------------------------------- point 8: malformed GGUF given to verify


def test_malformed_gguf_given_to_verify_is_one_line(tmp_path: Path) -> None:
    from lorasave.formats.gguf.export import export_gguf

    res = export_gguf(BASE, LORA, tmp_path / "g", type="f16")
    data = bytearray(res.gguf_file.read_bytes())
    data[8:16] = (10**9).to_bytes(8, "little")  # tensor count far past what the file holds
    res.gguf_file.write_bytes(bytes(data))
    _rehash(res.output, res.gguf_file)
    out = _cli("verify", str(res.output))
    assert out.returncode == 1, (out.returncode, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not a readable GGUF file" in lines[0], out.stderr


def test_hash_mismatch_stops_before_probing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorasave.formats.gguf.export import export_gguf
    from lorasave.verify import gguf as verify_gguf

    res = export_gguf(BASE, LORA, tmp_path / "g", type="q8_0")
    data = bytearray(res.gguf_file.read_bytes())
    data[8:16] = (10**9).to_bytes(8, "little")
    res.gguf_file.write_bytes(bytes(data))
    opened: list[object] = []
    monkeypatch.setattr(verify_gguf, "check_gguf", lambda *a: opened.append(a))
    report = verify(res.output)
    assert not opened and [n for n, _ in report.failures] == [res.gguf_file.name] and report.tensors_total == 0, report
    assert "not run" in (report.skipped or "")
