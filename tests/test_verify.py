"""``lorasave verify``: passes a correct output, names the tensor behind a flipped byte or a wrong scaling."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lorasave
from lorasave.formats.safetensors.header import read_header
from lorasave.verify.run import verify

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "examples" / "tiny-llama"
LORA = REPO / "examples" / "tiny-llama-lora"
TARGET = "model.layers.1.self_attn.v_proj.weight"


@pytest.fixture
def merged(tmp_path: Path) -> Path:
    return lorasave.merge(BASE, LORA, tmp_path / "out", max_shard_size="100KB").output


def _rehash(out: Path, file: Path) -> None:
    """Record ``file``'s current sha256 and size in lorasave.json: a wrong output whose manifest matches it."""
    import hashlib

    path = out / "lorasave.json"
    manifest = json.loads(path.read_text())
    manifest["files"][file.name] = {**manifest["files"][file.name], "sha256": hashlib.sha256(file.read_bytes()).hexdigest(), "bytes": file.stat().st_size}
    path.write_text(json.dumps(manifest))


def _shard_of(out: Path, name: str) -> Path:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    return out / index["weight_map"][name]


def test_correct_output_verifies(merged: Path) -> None:
    report = verify(merged)
    assert report.ok, report.failures
    assert report.tensors_probed == 14 and report.tensors_exact == 7
    assert 0 < report.max_probe_error <= 1.0


@pytest.mark.parametrize("name", [TARGET, "model.norm.weight"])
def test_flipped_byte_named(merged: Path, name: str) -> None:
    shard = _shard_of(merged, name)
    entry = read_header(shard).tensors[name]
    data = bytearray(shard.read_bytes())
    data[entry.offset + 2 * 5 + 1] ^= 0x7F  # the high byte (sign, exponent) of the 6th bf16 element
    shard.write_bytes(bytes(data))
    files = verify(merged, level="files")
    assert not files.ok and files.failures[0][0] == shard.name
    stopped = verify(merged)  # a file that is not what lorasave wrote is not probed
    assert [n for n, _ in stopped.failures] == [shard.name] and stopped.tensors_total == 0, stopped
    _rehash(merged, shard)
    tensors = verify(merged)
    assert any(n == name for n, _ in tensors.failures), tensors.failures


def test_wrong_scaling_named(merged: Path, tmp_path: Path) -> None:
    """A merge computed with another scaling (here: the adapter's alpha changed) fails the probe, per tensor."""
    wrong = tmp_path / "wrong-lora"
    shutil.copytree(LORA, wrong)
    cfg = json.loads((wrong / "adapter_config.json").read_text())
    cfg["lora_alpha"] = cfg["lora_alpha"] * 1.5
    (wrong / "adapter_config.json").write_text(json.dumps(cfg))
    report = verify(merged, adapters=[wrong])
    failed = {n for n, _ in report.failures}
    assert TARGET in failed and len(failed) == 14
    assert all("rounding bound" in why for _, why in report.failures)


def test_cli_exit_codes(merged: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "lorasave", "verify", str(merged)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("verified")
    (merged / "config.json").write_text("{}")
    bad = subprocess.run([sys.executable, "-m", "lorasave", "verify", str(merged), "--level", "files"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "config.json" in bad.stdout


def test_merge_with_verify_records_it(tmp_path: Path) -> None:
    res = lorasave.merge(BASE, LORA, tmp_path / "v", verify=True)
    assert res.verification and res.verification["ok"]
    assert res.summary().endswith("verified")
    manifest = json.loads((res.output / "lorasave.json").read_text())
    assert manifest["result"]["verification"]["ok"] is True
    assert "passed before the output was written" in (res.output / "README.md").read_text()
    assert verify(res.output).ok  # the card rewrite kept the manifest's sha256 right


# ------------------------------------------------------------ more recipes, GGUF, logits


@pytest.fixture(scope="session")
def vz(zoo: Path) -> object:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _parity as P

    return P.Zoo(zoo / "verify")


def _wrong_alpha(adapter: Path, tmp_path: Path) -> Path:
    wrong = tmp_path / "wrong"
    shutil.copytree(adapter, wrong)
    cfg = json.loads((wrong / "adapter_config.json").read_text())
    cfg["lora_alpha"] = cfg["lora_alpha"] * 1.5
    (wrong / "adapter_config.json").write_text(json.dumps(cfg))
    return wrong


@pytest.mark.parametrize("variant", ["dora_llama", "dora_gpt2", "dora_embedding"])
def test_dora_probed(vz: object, variant: str, tmp_path: Path) -> None:
    out = vz.merge(variant)  # type: ignore[attr-defined]
    report = verify(out)
    assert report.ok and report.tensors_probed > 0 and not report.not_probed, (report.failures, report.not_probed)
    bad = verify(out, adapters=[_wrong_alpha(vz.adapter(variant), tmp_path)])  # type: ignore[attr-defined]
    assert len(bad.failures) == report.tensors_probed and all(why.startswith("dora") for _, why in bad.failures)


def test_ia3_and_modules_to_save_probed(vz: object, tmp_path: Path) -> None:
    ia3 = Path(shutil.copytree(vz.merge("ia3"), tmp_path / "ia3"))  # type: ignore[attr-defined]
    report = verify(ia3)
    assert report.ok and report.tensors_probed == 6 and not report.not_probed, (report.failures, report.not_probed)
    name = "model.layers.0.mlp.down_proj.weight"
    shard = _shard_of(ia3, name) if (ia3 / "model.safetensors.index.json").exists() else ia3 / "model.safetensors"
    entry = read_header(shard).tensors[name]
    data = bytearray(shard.read_bytes())
    data[entry.offset + 4 * 3 + 2] ^= 0x01  # one low mantissa bit of a float32 element
    shard.write_bytes(bytes(data))
    _rehash(ia3, shard)
    assert [n for n, _ in verify(ia3).failures if not n.endswith(".safetensors")] == [name]
    mts = Path(shutil.copytree(vz.merge("modules_to_save_lm_head"), tmp_path / "mts"))  # type: ignore[attr-defined]
    report = verify(mts)
    assert report.ok and "lm_head.weight" not in report.not_probed and report.tensors_exact > 0
    shard = mts / "model.safetensors"
    entry = read_header(shard).tensors["lm_head.weight"]
    data = bytearray(shard.read_bytes())
    data[entry.offset] ^= 0x01
    shard.write_bytes(bytes(data))
    _rehash(mts, shard)
    assert [n for n, _ in verify(mts).failures if not n.endswith(".safetensors")] == ["lm_head.weight"]


def test_bnb_base_probed(zoo: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peft import LoraConfig

    import _models as M
    import _qlora as Q

    src = tmp_path / "fp32"
    Q.build_llama(0).save_pretrained(src)
    model = Q.load_quantized(src, Q.bnb_4bit("nf4", True))
    model.save_pretrained(tmp_path / "q")
    peft_model = M.train_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"), seed=3, steps=3)
    peft_model.save_pretrained(tmp_path / "lora")
    out = lorasave.merge(tmp_path / "q", tmp_path / "lora", tmp_path / "out", dtype="float32").output
    report = verify(out)
    assert report.ok and report.tensors_probed == 4 and not report.not_probed, (report.failures, report.not_probed)
    assert not verify(out, adapters=[_wrong_alpha(tmp_path / "lora", tmp_path)]).ok


@pytest.mark.parametrize("type", ["f16", "q8_0", "q4_0", "q5_1"])
def test_gguf_verified(type: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf

    from lorasave.formats.gguf import export as gguf_export

    res = gguf_export.export_gguf(BASE, LORA, tmp_path / "g", type=type)
    report = verify(res.output)
    assert report.ok and not report.not_probed and report.tensors_total == 21, (report.failures, report.not_probed)
    if type == "f16":  # float: the 14 merged tensors probed, the rest equal to the base
        assert report.tensors_probed == 14 and report.tensors_exact == 7, report
    else:  # quantized: every tensor bit-equal to gguf-py's encoding of the merge (F32 norms: the base's)
        assert report.tensors_exact == 21 and report.tensors_probed == 0, report
    reader = gguf.GGUFReader(res.gguf_file)
    t = next(t for t in reader.tensors if t.name == "blk.1.attn_v.weight")
    data = bytearray(res.gguf_file.read_bytes())
    data[t.data_offset + 1] ^= 0x7F  # high byte of an F16 value / of a Q8_0, Q4_0 or Q5_1 block's scale
    res.gguf_file.write_bytes(bytes(data))
    _rehash(res.output, res.gguf_file)
    bad = verify(res.output)
    assert [n for n, _ in bad.failures][-1] == TARGET and "blk.1.attn_v.weight" in bad.failures[-1][1]
    monkeypatch.setattr(gguf_export, "permute_qk", lambda w, *a: w)
    raw = gguf_export.export_gguf(BASE, LORA, tmp_path / "raw", type=type)
    failed = {n for n, _ in verify(raw.output).failures}
    assert failed and all(n.endswith(("q_proj.weight", "k_proj.weight")) for n in failed), failed


def test_logits_level(merged: Path, tmp_path: Path) -> None:
    report = verify(merged, level="logits")
    assert report.ok and report.top1_agreement is not None and report.top1_agreement >= 0.99, report
    assert report.logits_max_diff is not None and report.logits_max_diff > 0
    bad = verify(merged, level="logits", adapters=[_wrong_alpha(LORA, tmp_path)])
    assert bad.failures and bad.failures[0][0] == "logits"
    from lorasave.formats.gguf.export import export_gguf

    g = verify(export_gguf(BASE, LORA, tmp_path / "g", type="f16").output, level="logits")
    assert g.ok and g.top1_agreement is not None, g


def test_gguf_logits_level_runs_in_llama_cpp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GGUF outputs are run by llama.cpp when its runtime is installed, else by transformers' loader."""
    from _llama import need_llama_cpp
    from lorasave.formats.gguf.export import export_gguf

    need_llama_cpp()
    out = export_gguf(BASE, LORA, tmp_path / "g", type="f32").output
    report = verify(out, level="logits")
    assert report.ok and report.logits_runtime == "llama.cpp" and "in llama.cpp" in report.summary(), report
    assert report.top1_agreement == 1.0 and report.logits_max_diff is not None and report.logits_max_diff <= 1e-3 * (report.logits_scale or 0)
    bad = verify(out, level="logits", adapters=[_wrong_alpha(LORA, tmp_path)])
    assert bad.failures and bad.failures[0][0] == "logits" and bad.logits_runtime == "llama.cpp"
    monkeypatch.setenv("LORASAVE_LLAMA_CPP_DIR", str(tmp_path / "no-runtime"))
    fallback = verify(out, level="logits")
    assert fallback.ok and fallback.logits_runtime == "transformers", fallback


def test_gguf_export_with_verify(tmp_path: Path) -> None:
    """--verify on the GGUF save: probed before the rename, recorded in the result and the manifest."""
    from lorasave.formats.gguf.export import export_gguf

    res = export_gguf(BASE, [LORA], tmp_path / "g", type="q8_0", verify=True)
    assert res.verification and res.verification["ok"] and res.summary().endswith("verified")
    manifest = json.loads((res.output / "lorasave.json").read_text())
    assert manifest["result"]["verification"]["ok"] is True
    assert verify(res.output).ok


def test_decisive_top1_counts_only_near_ties_as_agreeing() -> None:
    import torch

    from lorasave.verify.run import decisive_top1

    ref = torch.tensor([[[1.0, 0.9, 0.0], [0.0, 2.0, 0.5]]])
    got = torch.tensor([[[0.8, 0.95, 0.0], [0.0, 2.0, 0.5]]])  # position 0 flips; the reference leads by 0.1
    assert decisive_top1(ref, got, 0.01) == 0.5  # 0.1 > 2·0.01: a real disagreement
    assert decisive_top1(ref, got, 0.06) == 1.0  # 0.1 <= 2·0.06: within the allowed error


def test_missing_optional_package_is_one_line(merged: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--level logits needs peft (the reference): without it, one line naming the extra, exit 2."""
    from click.testing import CliRunner

    from lorasave.cli.main import main

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ModuleNotFoundError
    res = CliRunner().invoke(main, ["verify", str(merged), "--level", "logits"])
    assert res.exit_code == 2, res.output
    assert res.output.strip() == "error: this command needs the peft package; install it with: pip install 'lorasave[verify]'"


def test_gguf_without_adapter_verifies(tmp_path: Path) -> None:
    """A base converted with no adapter: every tensor equals the base; logits equal the base model's."""
    from lorasave.formats.gguf.export import export_gguf

    out = export_gguf(BASE, [], tmp_path / "g", type="f32").output
    report = verify(out)
    assert report.ok and report.tensors_probed == 0 and report.tensors_exact > 0, report
    logits = verify(out, level="logits")
    assert logits.ok and logits.top1_agreement == 1.0, logits


def test_gguf_adapter_logits_in_llama_cpp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GGUF LoRA adapter is checked on an f32 GGUF of its base in llama.cpp against the PeftModel;
    the helper base file is removed; without the runtime the error names the install command."""
    from _llama import need_llama_cpp
    from lorasave.errors import LlamaCppNotInstalledError
    from lorasave.formats.gguf.adapter import export_gguf_adapter

    need_llama_cpp()
    out = export_gguf_adapter(BASE, LORA, tmp_path / "a", type="f32").output
    report = verify(out, level="logits")
    assert report.ok and report.logits_runtime == "llama.cpp" and report.top1_agreement == 1.0, report
    assert report.logits_max_diff is not None and report.logits_max_diff <= 1e-3 * (report.logits_scale or 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no helper folder left
    bad = verify(out, level="logits", adapters=[_wrong_alpha(LORA, tmp_path)])
    assert bad.failures and bad.failures[0][0] == "logits"
    monkeypatch.setenv("LORASAVE_LLAMA_CPP_DIR", str(tmp_path / "no-runtime"))
    with pytest.raises(LlamaCppNotInstalledError, match=r"lorasave install-llama-cpp"):
        verify(out, level="logits")
