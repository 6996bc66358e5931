"""Issue 11, points 2, 3 and 5: names stay inside OUT, one symlink rule for everything read from a
source folder, free space counts carried files, a full disk is named as OUT's file system."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import click.testing
import gguf
import pytest

import lorasave
import test_hub
from hub_server import USER, HubStandIn
from lorasave import errors
from lorasave.errors import InsufficientDiskError, InvalidOptionError, UnsafePathError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BASE = EXAMPLES / "tiny-llama"
LORA = EXAMPLES / "tiny-llama-lora"
hub = test_hub.hub  # the local Hub stand-in fixture


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _link_outside(folder: Path, name: str, elsewhere: Path) -> Path:
    """Move ``folder/name`` to ``elsewhere/name`` and leave a symlink to it behind (absolute target)."""
    elsewhere.mkdir(parents=True, exist_ok=True)
    target = elsewhere / name
    shutil.move(folder / name, target)
    (folder / name).symlink_to(target)
    return target


def _hf_cache(root: Path, src: Path, repo: str = "models--org--tiny") -> Path:
    """``src``'s files laid out as the Hugging Face cache does: snapshots/<rev>/x -> ../../blobs/<sha256>."""
    snap = root / repo / "snapshots" / ("a" * 40)
    blobs = root / repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for p in sorted(src.iterdir()):
        sha = hashlib.sha256(p.read_bytes()).hexdigest()
        shutil.copyfile(p, blobs / sha)
        (snap / p.name).symlink_to(Path("..") / ".." / "blobs" / sha)
    return snap


def _files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


# ----------------------------------------------------------------------------- 2. names stay inside OUT

BAD_NAMES = ["../x", "/abs/x", "a/b"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_typed_name_refused_by_cli(tmp_path: Path, bad: str) -> None:
    """Before: `--name ../x` and `--name /abs/x` exit 0 writing x-f32.gguf outside OUT; `a/b` exit 1 'No such file'."""
    work = tmp_path / "work"
    work.mkdir()
    name = bad.replace("/abs", str(tmp_path / "abs")) if bad.startswith("/abs") else bad
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "lorasave", "gguf", str(BASE), str(LORA), "-o", str(work / "out"), "--type", "f32", "--name", name]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: name ") and "Traceback" not in proc.stderr, proc.stderr
    assert _files_under(tmp_path) == {"work"}, "nothing may be written, inside OUT or out of it"


@pytest.mark.parametrize("bad", [*BAD_NAMES, "..", "x\x00y"])
def test_typed_name_refused_by_api(tmp_path: Path, bad: str) -> None:
    """Before: export_gguf_adapter(name='../x') wrote ../x-lora-f16.gguf beside OUT and returned."""
    name = bad.replace("/abs", str(tmp_path / "abs")) if bad.startswith("/abs") else bad
    with pytest.raises(InvalidOptionError, match="cannot be a file name inside the output folder"):
        lorasave.export_gguf_adapter(BASE, LORA, tmp_path / "work" / "out", type="f16", name=name)
    with pytest.raises(InvalidOptionError, match="cannot be a file name inside the output folder"):
        lorasave.export_gguf(BASE, LORA, tmp_path / "work" / "out2", type="f32", name=name)
    assert _files_under(tmp_path) == set()


def test_derived_names_sanitised(tmp_path: Path) -> None:
    """Before: no lorasave.util.names; an OUT named 'tiny\\nFROM evil' gave a GGUF file name with a newline
    (the name goes into the Modelfile's FROM line)."""
    from lorasave.util.names import check_file_name, safe_file_name

    assert safe_file_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB--SmolLM2-135M"
    assert safe_file_name("..") == "model" and safe_file_name("/etc/passwd") == "--etc--passwd"
    for derived in ("org/model", "../../x", "a\\b", "x\ny", "..", "\x00"):
        assert check_file_name(safe_file_name(derived)) == safe_file_name(derived)
    # GGUF file names come from the model now (llama.cpp's converter's names): a card's name is derived, so sanitised
    base = _copy(BASE, tmp_path / "base")
    (base / "README.md").write_text('---\nname: "../../x\\nFROM evil"\n---\n', encoding="utf-8")
    res = lorasave.export_gguf(base, LORA, tmp_path / "tiny\nFROM evil", type="f32")
    assert res.gguf_file.parent == res.output
    assert gguf.GGUFReader(res.gguf_file).fields["general.name"].contents() == "../../x\nFROM evil"  # data in the file, as written
    assert res.gguf_file.name == "x_FROM-evil-107K-F32.gguf" and check_file_name(res.gguf_file.name)
    (base / "README.md").write_text('---\nbasename: "a/../b"\n---\n', encoding="utf-8")
    res = lorasave.export_gguf(base, LORA, tmp_path / "out1", type="f32")
    assert res.gguf_file.name == "a-..-b-107K-F32.gguf"  # the basename wins, as in gguf.naming_convention
    res = lorasave.export_gguf(base, LORA, tmp_path / "out2", type="f32", name="my model")
    assert res.gguf_file.name == "my-model-F32.gguf"


# ----------------------------------------------------------------------------- 3. the symlink rule


def test_license_link_outside_not_carried(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before: a LICENSE linking to a private file outside BASE was copied into OUT."""
    base = _copy(BASE, tmp_path / "base")
    secret = tmp_path / "home" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("PRIVATE KEY")
    (base / "LICENSE").symlink_to(secret)
    (base / "NOTICE.txt").write_text("notice")
    (base / "USE_POLICY.md").symlink_to("NOTICE.txt")  # a link that stays inside: followed
    caplog.set_level(logging.INFO, logger="lorasave")
    res = lorasave.merge(base, LORA, tmp_path / "out")
    assert not (res.output / "LICENSE").exists()
    assert (res.output / "USE_POLICY.md").read_text() == "notice" and (res.output / "NOTICE.txt").is_file()
    notes = [r.getMessage() for r in caplog.records if "LICENSE not carried" in r.getMessage()]
    assert len(notes) == 1 and str(secret) in notes[0], caplog.text
    assert b"PRIVATE KEY" not in b"".join(p.read_bytes() for p in res.output.iterdir())


def test_tokenizer_link_outside_refused(tmp_path: Path) -> None:
    """Before: tokenizer.json linking outside BASE was read and copied into OUT (exit 0)."""
    base = _copy(BASE, tmp_path / "base")
    _link_outside(base, "tokenizer.json", tmp_path / "elsewhere")
    with pytest.raises(UnsafePathError, match=r"tokenizer.json links to .*outside the folder"):
        lorasave.merge(base, LORA, tmp_path / "out")
    with pytest.raises(UnsafePathError, match=r"tokenizer\.json links to"):
        lorasave.export_gguf(base, LORA, tmp_path / "out-gguf", type="f32")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out-gguf").exists()


@pytest.mark.parametrize(
    ("which", "name"),
    [("base", "config.json"), ("base", "model.safetensors"), ("adapter", "adapter_config.json"), ("adapter", "adapter_model.safetensors")],
)
def test_weight_and_config_links_outside_refused(tmp_path: Path, which: str, name: str) -> None:
    """Before: a shard, config or adapter file linking to another model's file outside the folder was read and merged."""
    base = _copy(BASE, tmp_path / "base")
    lora = _copy(LORA, tmp_path / "lora")
    _link_outside(base if which == "base" else lora, name, tmp_path / "other-model")
    with pytest.raises(UnsafePathError, match=rf"{name} links to .*outside the folder"):
        lorasave.merge(base, lora, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_index_shard_link_outside_refused(tmp_path: Path) -> None:
    """Before: a shard named by model.safetensors.index.json that links outside BASE was read."""
    sharded = lorasave.merge(BASE, LORA, tmp_path / "sharded", max_shard_size="50KB").output
    (sharded / "lorasave.json").unlink()
    shard = sorted(sharded.glob("model-*-of-*.safetensors"))[1].name
    _link_outside(sharded, shard, tmp_path / "elsewhere")
    with pytest.raises(UnsafePathError, match=rf"{shard} links to .*outside the folder"):
        lorasave.merge(sharded, LORA, tmp_path / "out")


def test_hf_cache_layout_followed_links_leaving_it_not(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """snapshots/<rev>/x -> ../../blobs/<sha> is followed; a NOTICE linking out of the cache repo is not.
    Before: the NOTICE outside the cache repo was copied."""
    src = _copy(BASE, tmp_path / "src")
    (src / "LICENSE").write_text("Apache-2.0")
    snap = _hf_cache(tmp_path / "hub", src)
    (tmp_path / "hub" / "models--org--other" / "blobs").mkdir(parents=True)
    other_blob = tmp_path / "hub" / "models--org--other" / "blobs" / "x"
    other_blob.write_text("another repo's file")
    (snap / "NOTICE").symlink_to(Path("..") / ".." / ".." / "models--org--other" / "blobs" / "x")
    caplog.set_level(logging.INFO, logger="lorasave")
    res = lorasave.merge(snap, LORA, tmp_path / "out")
    plain = lorasave.merge(BASE, LORA, tmp_path / "plain")
    assert (res.output / "LICENSE").read_text() == "Apache-2.0"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "model.safetensors"):
        assert (res.output / name).read_bytes() == (plain.output / name).read_bytes(), name
    assert not (res.output / "NOTICE").exists()
    assert "NOTICE not carried" in caplog.text


def test_push_follows_the_same_rule(hub: HubStandIn, tmp_path: Path) -> None:
    """A folder laid out as a Hugging Face cache snapshot is pushed (blobs are in the same repo); a link
    leaving it is refused. Before: every cache link was refused as 'outside the folder'."""
    merged = lorasave.merge(BASE, LORA, tmp_path / "merged").output
    snap = _hf_cache(tmp_path / "hub-cache", merged)
    res = lorasave.push(snap, "from-cache")
    got = hub.files(f"{USER}/from-cache")
    for p in merged.iterdir():
        assert got[p.name] == p.read_bytes(), p.name
    assert res.repo_id == f"{USER}/from-cache"
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the Hub")
    (snap / "notes.txt").symlink_to(secret)
    n = len(hub.requests)
    with pytest.raises(UnsafePathError, match=r"notes\.txt links to .*outside the folder"):
        lorasave.push(snap, "from-cache")
    assert len(hub.requests) == n


@pytest.mark.parametrize("entry", ["/etc/passwd", "../elsewhere.bin", "sub/../../x"])
def test_verify_refuses_entries_outside(tmp_path: Path, entry: str) -> None:
    """Before: verify read /etc/passwd (or ../x) as listed and reported a size mismatch about it."""
    from lorasave.verify.run import verify

    out = lorasave.merge(BASE, LORA, tmp_path / "out").output
    (tmp_path / "elsewhere.bin").write_bytes(b"x")
    manifest = json.loads((out / "lorasave.json").read_text())
    manifest["files"][entry] = {"sha256": "0" * 64, "bytes": 1}
    (out / "lorasave.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsafePathError, match=r"lorasave.json lists .*(absolute|'\.\.')"):
        verify(out, level="files")


# ----------------------------------------------------------------------------- 5. disk space

_Usage = namedtuple("_Usage", "total used free")


def test_free_space_counts_carried_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: an 8 MB LICENSE was not counted: with 4 MB free the merge started (and copied it)."""
    base = _copy(BASE, tmp_path / "base")
    with open(base / "LICENSE", "wb") as f:
        f.truncate(8 << 20)
    monkeypatch.setattr("lorasave.pipeline.output.shutil.disk_usage", lambda _p: _Usage(1 << 40, 0, 4 << 20))
    with pytest.raises(InsufficientDiskError, match="carried from the sources") as info:
        lorasave.merge(base, LORA, tmp_path / "out")
    assert info.value.needed_bytes > 8 << 20
    assert not (tmp_path / "out").exists()
    lorasave.merge(BASE, LORA, tmp_path / "small")  # the same free space is plenty without the license


def test_onnx_checks_free_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: export_onnx had no free-space check: it merged and exported with 1 MB free."""
    pytest.importorskip("onnxscript")
    monkeypatch.setattr("lorasave.pipeline.output.shutil.disk_usage", lambda _p: _Usage(1 << 40, 0, 1 << 20))
    with pytest.raises(InsufficientDiskError, match="free"):
        lorasave.export_onnx(BASE, LORA, tmp_path / "onnx", verify=False)
    assert not (tmp_path / "onnx").exists()


def _assert_names_out_fs(err: BaseException, out: Path) -> None:
    from lorasave.pipeline.output import filesystem_of

    msg = str(err)
    assert isinstance(err, errors.DiskFullError), repr(err)
    assert filesystem_of(out.parent) in msg and str(out) in msg and "full" in msg, msg
    assert str(BASE) not in msg and "\n" not in msg


def test_enospc_in_shard_writer_names_out_filesystem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: a bare OSError 'No space left on device' (CLI: no file system named)."""
    from lorasave.formats.safetensors.writer import SafetensorsShardWriter

    real = SafetensorsShardWriter._emit

    def full(self: SafetensorsShardWriter, data: memoryview) -> None:
        if self.bytes_written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, data)

    monkeypatch.setattr(SafetensorsShardWriter, "_emit", full)
    out = tmp_path / "out"
    with pytest.raises(getattr(errors, "DiskFullError", InsufficientDiskError)) as info:
        lorasave.merge(BASE, LORA, out)
    _assert_names_out_fs(info.value, out)
    assert isinstance(info.value, InsufficientDiskError) and isinstance(info.value.__cause__, OSError)
    assert _files_under(tmp_path) == set(), "no output, no staging folder, no lock left"


def test_enospc_while_carrying_names_out_not_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the CLI printed 'error: No space left on device: <BASE>/tokenizer.json', naming the source file."""
    from lorasave.cli.main import main

    def full(src: os.PathLike[str], dst: os.PathLike[str], **_kw: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))

    monkeypatch.setattr("lorasave.pipeline.output.shutil.copyfile", full)
    out = tmp_path / "out"
    with pytest.raises(getattr(errors, "DiskFullError", InsufficientDiskError)) as info:
        lorasave.merge(BASE, LORA, out)
    _assert_names_out_fs(info.value, out)
    res = click.testing.CliRunner().invoke(main, ["merge", str(BASE), str(LORA), "-o", str(out)])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: writing "), res.stderr
    assert str(BASE) not in lines[0]
    assert not out.exists()
