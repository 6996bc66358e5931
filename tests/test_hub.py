"""lorasave.hub.push.push.push against a local Hub stand-in (tests/hub_server.py) on 127.0.0.1: no network."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import click.testing
import pytest

import lorasave
from hub_server import ORG, READ_TOKEN, USER, WRITE_TOKEN, HubStandIn
from lorasave.errors import FolderMismatchError, HubAuthError, HubError, InvalidOptionError, LorasaveError, ModelCardError, SourceNotFoundError, UnsafePathError
from lorasave.hub.push import PushResult, default_commit_message, push

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
INITIAL = {".gitattributes"}  # the stand-in, like the Hub, creates a repo with this file


def _point_hub_at(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Route huggingface_hub to ``url``: it read HF_ENDPOINT into module constants at import time."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    old = constants.ENDPOINT
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    for name, mod in list(sys.modules.items()):  # `from ..constants import ENDPOINT` copies (cli.auth, _git_credential)
        if name.startswith("huggingface_hub") and mod is not constants and getattr(mod, "ENDPOINT", None) == old:
            monkeypatch.setattr(mod, "ENDPOINT", url)
    monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(url)})


@pytest.fixture
def hub(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubStandIn]:
    """A fresh stand-in per test, huggingface_hub pointed at it, HF_TOKEN set to its write token."""
    from huggingface_hub import constants
    from huggingface_hub.utils import close_session

    server = HubStandIn(tmp_path / "hub-storage").start()
    try:
        _point_hub_at(monkeypatch, server.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets HF_HUB_OFFLINE=1 for the other tests
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))  # never the developer's login
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
        monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
        # hf_xet starts one session per process on the first upload_folder and logs under $HF_HOME/xet
        monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf-home"))
        monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
        close_session()  # no pooled connection to an earlier test's port
        yield server
    finally:
        server.stop()
        close_session()


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled tiny Llama + LoRA merged into several 50KB shards with an index."""
    out = tmp_path_factory.mktemp("push") / "tiny-merged"
    lorasave.merge(EXAMPLES / "tiny-llama", EXAMPLES / "tiny-llama-lora", out, max_shard_size="50KB")
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 3
    return out


@pytest.fixture(scope="module")
def adapter_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled PEFT adapter re-saved by lorasave in bfloat16 (with lorasave.json)."""
    out = tmp_path_factory.mktemp("push") / "tiny-adapter"
    lorasave.save_adapter(EXAMPLES / "tiny-llama-lora", out, dtype="bfloat16")
    return out


def _copy(src: Path, tmp_path: Path, name: str | None = None) -> Path:
    dst = tmp_path / (name or src.name)
    shutil.copytree(src, dst)
    return dst


def _local(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _upload_requests(hub: HubStandIn) -> list[str]:
    return [f"{r.method} {r.path}" for r in hub.requests if r.method == "POST" and r.path != "/api/validate-yaml"]


def _assert_token_nowhere(hub: HubStandIn, token: str, *texts: str) -> None:
    for p in hub.root.rglob("*"):
        if p.is_file():
            assert token.encode() not in p.read_bytes(), f"token stored in {p}"
    for c in hub.commits:
        assert token not in c.summary and token not in c.description
    for r in hub.requests:
        assert token.encode() not in r.body, f"token in the body of {r.method} {r.path}"
    for t in texts:
        assert token not in t


# ----------------------------------------------------------------------------- the main job


def test_push_sharded_merge(hub: HubStandIn, merged: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("lorasave", "huggingface_hub", "httpx2"):
        caplog.set_level(logging.DEBUG, logger=name)
    before = _local(merged)
    res = push(merged, "tiny-merged")

    assert isinstance(res, PushResult)
    assert res.repo_id == f"{USER}/tiny-merged" and res.revision == "main" and not res.unchanged
    got = hub.files(res.repo_id)
    assert set(got) - INITIAL == set(before)  # every file of the folder, nothing else
    assert {k: got[k] for k in before} == before  # byte for byte
    index = json.loads(got["model.safetensors.index.json"])
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all(s in got for s in shards)
    assert sorted(res.files) == sorted(before) and res.total_bytes == sum(map(len, before.values()))

    (commit,) = [c for c in hub.commits if c.summary != "initial commit"]
    assert commit.oid == res.commit_oid and commit.summary == res.commit_message
    assert commit.summary == f"lorasave: merged bfloat16 checkpoint of tiny-llama + tiny-llama-lora ({len(shards)} shards)"
    assert res.commit_url.endswith(res.commit_oid)
    assert not hub.is_private(res.repo_id) and res.private is False

    writes = hub.requests_matching("POST", r"^/api/(repos/create|models/.*/(preupload|commit)/)")
    assert len(writes) >= 3 and all(r.headers.get("authorization") == f"Bearer {WRITE_TOKEN}" for r in writes)
    assert "lorasave/" in writes[0].headers.get("user-agent", "")
    assert hub.unhandled == []
    assert _local(merged) == before  # nothing written into the pushed folder
    log_text = "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records)
    assert "pushing" in log_text  # lorasave logged what it did...
    _assert_token_nowhere(hub, WRITE_TOKEN, log_text, json.dumps(res.to_dict()), res.summary())
    assert capsys.readouterr().out == ""  # ...and printed nothing


def test_arrived_files_download_with_huggingface_hub(hub: HubStandIn, merged: Path, tmp_path: Path) -> None:
    from huggingface_hub import snapshot_download

    res = push(merged, "roundtrip")
    snap = Path(snapshot_download(res.repo_id, cache_dir=tmp_path / "cache"))
    assert {k: v for k, v in _local(snap).items() if k not in INITIAL} == _local(merged)


def test_second_push_succeeds_and_skips_identical_files(hub: HubStandIn, merged: Path, tmp_path: Path) -> None:
    folder = _copy(merged, tmp_path)
    first = push(folder, "again")
    n_commits = len(hub.commits)
    second = push(folder, "again")
    assert second.unchanged and second.commit_oid == first.commit_oid
    assert len(hub.commits) == n_commits  # no empty commit
    assert len(hub.requests_matching("POST", r"/commit/")) == 1
    assert "already has" in second.summary()

    (folder / "NOTES.txt").write_text("evaluation notes\n")  # not in lorasave.json: pushed unchecked
    third = push(folder, "again", commit_message="add notes")
    assert not third.unchanged
    assert hub.commits[-1].added == ["NOTES.txt"] and hub.commits[-1].summary == "add notes"
    assert hub.files(third.repo_id)["NOTES.txt"] == b"evaluation notes\n"


def test_failed_push_can_be_rerun(hub: HubStandIn, merged: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http, "time", types.SimpleNamespace(sleep=lambda s: None))  # huggingface_hub's retry backoff, skipped
    hub.fail("POST", r"/commit/", 503, times=100)  # every commit attempt fails, retries included
    with pytest.raises(HubError) as ei:
        push(merged, "flaky")
    err = ei.value
    assert err.status == 503 and "\n" not in str(err) and "re-running the push" in str(err)
    assert len(hub.requests_matching("POST", r"/commit/")) > 1  # huggingface_hub retried
    assert set(hub.files(f"{USER}/flaky")) == INITIAL  # nothing committed

    hub.clear_failures()
    res = push(merged, "flaky")
    assert {k: v for k, v in hub.files(res.repo_id).items() if k not in INITIAL} == _local(merged)


# ----------------------------------------------------------------------------- repo options


def test_private_branch_and_org_namespace(hub: HubStandIn, merged: Path) -> None:
    res = push(merged, f"{ORG}/tiny", private=True, revision="dev")
    assert res.repo_id == f"{ORG}/tiny" and res.revision == "dev" and res.private is True
    assert hub.is_private(f"{ORG}/tiny")
    assert set(hub.branches(f"{ORG}/tiny")) == {"main", "dev"}
    assert set(hub.files(f"{ORG}/tiny", "dev")) - INITIAL == set(_local(merged))
    assert set(hub.files(f"{ORG}/tiny", "main")) == INITIAL  # main untouched
    create = json.loads(hub.requests_matching("POST", r"^/api/repos/create$")[0].body)
    assert create["organization"] == ORG and create["name"] == "tiny" and create["visibility"] == "private"

    again = push(merged, f"{ORG}/tiny", private=True, revision="dev")  # branch exists: 409 tolerated
    assert again.unchanged and again.revision == "dev"


def test_public_is_the_hubs_default_and_private_is_not_silently_dropped(hub: HubStandIn, merged: Path) -> None:
    push(merged, "open")
    create = json.loads(hub.requests_matching("POST", r"^/api/repos/create$")[0].body)
    assert "visibility" not in create  # private=False leaves the visibility to the namespace's default
    n_commits, n_uploads = len(hub.commits), len(hub.requests_matching("POST", r"/(preupload|commit)/"))
    with pytest.raises(HubError, match="already exists and is public"):
        push(merged, "open", private=True, revision="wip")
    assert set(hub.branches(f"{USER}/open")) == {"main"}  # refused before the branch was created
    assert len(hub.commits) == n_commits and len(hub.requests_matching("POST", r"/(preupload|commit)/")) == n_uploads
    assert not hub.is_private(f"{USER}/open")


def test_foreign_namespace_is_refused(hub: HubStandIn, merged: Path) -> None:
    with pytest.raises(HubAuthError, match="someone-else") as ei:
        push(merged, "someone-else/tiny")
    assert ei.value.status == 403 and "\n" not in str(ei.value)
    assert not hub.repo_exists("someone-else/tiny")


def test_create_pr(hub: HubStandIn, merged: Path, tmp_path: Path) -> None:
    folder = _copy(merged, tmp_path)
    push(folder, "reviewed")
    (folder / "NOTES.txt").write_text("v2\n")
    res = push(folder, "reviewed", create_pr=True)
    assert res.pr_url and res.pr_url.endswith("/discussions/1") and res.revision == "refs/pr/1"
    assert hub.files(res.repo_id, "refs/pr/1")["NOTES.txt"] == b"v2\n"
    assert "NOTES.txt" not in hub.files(res.repo_id, "main")
    with pytest.raises(InvalidOptionError, match="against main"):
        push(folder, "reviewed", create_pr=True, revision="dev")


def test_single_commit_path_without_xet(hub: HubStandIn, merged: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # upload_folder falls back to create_commit
    res = push(merged, "no-xet")
    assert {k: v for k, v in hub.files(res.repo_id).items() if k not in INITIAL} == _local(merged)
    assert push(merged, "no-xet").unchanged


# ----------------------------------------------------------------------------- refused before uploading


def test_changed_file_is_refused_before_any_request(hub: HubStandIn, merged: Path, tmp_path: Path) -> None:
    folder = _copy(merged, tmp_path)
    shard = sorted(folder.glob("model-*-of-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(data))
    with pytest.raises(FolderMismatchError) as ei:
        push(folder, "tampered")
    assert ei.value.file == shard.name and shard.name in str(ei.value) and "sha256" in str(ei.value)
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, LorasaveError)
    assert hub.requests == []  # refused before any request, uploads included

    shard.unlink()
    with pytest.raises(FolderMismatchError, match="missing"):
        push(folder, "tampered")
    (folder / "config.json").write_text("{}")
    shutil.copyfile(merged / shard.name, shard)
    with pytest.raises(FolderMismatchError, match=r"config\.json"):
        push(folder, "tampered")
    assert hub.requests == []


def test_bad_folders_and_ids_make_no_request(hub: HubStandIn, merged: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError):
        push(tmp_path / "nope", "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceNotFoundError, match="no file"):
        push(tmp_path / "empty", "x")
    with pytest.raises(InvalidOptionError, match="repo id"):
        push(merged, "a/b/c")
    leaky = _copy(merged, tmp_path, "leaky")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the Hub")
    os.symlink(secret, leaky / "notes.txt")
    with pytest.raises(UnsafePathError, match="outside the folder"):
        push(leaky, "x")
    assert hub.requests == []


def test_model_card_is_validated(hub: HubStandIn, tmp_path: Path) -> None:
    adapter = _copy(EXAMPLES / "tiny-llama-lora", tmp_path)
    card = adapter / "README.md"
    peft_card = card.read_text()
    assert re.search(r"^base_model: ", peft_card, flags=re.M)
    # PEFT writes the base's local path when training started from a folder; the Hub wants a model id
    card.write_text(re.sub(r"^base_model: .*$", "base_model: /home/me/models/tiny-llama", peft_card, flags=re.M))
    with pytest.raises(ModelCardError, match="base_model") as ei:
        push(adapter, "card")
    assert "README.md" in str(ei.value) and "\n" not in str(ei.value)
    assert [r.path for r in hub.requests] == ["/api/validate-yaml"] and _upload_requests(hub) == []

    card.write_text(re.sub(r"^base_model: .*$", "base_model: TinyOrg/tiny-llama", peft_card, flags=re.M))
    res = push(adapter, "card")
    assert hub.files(res.repo_id)["README.md"] == card.read_bytes()
    assert res.commit_message == "lorasave: LORA adapter tiny-llama-lora (r=8)"

    card.write_text("---\nlicense: [unclosed\n---\n# card\n")
    n = len(hub.requests)
    with pytest.raises(ModelCardError, match="cannot be read"):
        push(adapter, "card")
    assert len(hub.requests) == n  # a card that does not parse is refused locally


def test_push_lorasave_adapter(hub: HubStandIn, adapter_out: Path) -> None:
    res = push(adapter_out, f"{ORG}/tiny-adapter")
    got, want = hub.files(res.repo_id), _local(adapter_out)
    assert {"adapter_config.json", "adapter_model.safetensors", "lorasave.json"} <= set(want)
    assert set(got) - INITIAL == set(want) and {k: got[k] for k in want} == want
    assert res.commit_message == "lorasave: LORA adapter tiny-llama-lora (r=8, bfloat16) for tiny-llama"


# ----------------------------------------------------------------------------- tokens and errors


def test_missing_token_is_an_auth_error(hub: HubStandIn, merged: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubAuthError) as ei:
        push(merged, "tok")
    assert str(ei.value).startswith("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    assert isinstance(ei.value, PermissionError) and ei.value.exit_code == 4
    assert hub.requests == []


def test_token_from_login_file_and_argument(hub: HubStandIn, merged: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")
    Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
    Path(constants.HF_TOKEN_PATH).write_text(WRITE_TOKEN)  # what `hf auth login` saves
    push(merged, "from-file")
    assert all(r.headers.get("authorization") == f"Bearer {WRITE_TOKEN}" for r in hub.requests_matching("POST", r"/commit/"))

    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    res = push(merged, "from-arg", token=WRITE_TOKEN)  # token= wins over HF_TOKEN
    assert hub.repo_exists(res.repo_id)


@pytest.mark.parametrize(("token", "status", "words"), [("hf_not_a_real_token_123456789", 401, "rejected the token"), (READ_TOKEN, 403, "write access")])
def test_rejected_token(hub: HubStandIn, merged: Path, monkeypatch: pytest.MonkeyPatch, token: str, status: int, words: str) -> None:
    monkeypatch.setenv("HF_TOKEN", token)
    with pytest.raises(HubAuthError, match=words) as ei:
        push(merged, "denied")
    assert ei.value.status == status and "\n" not in str(ei.value) and token not in str(ei.value)
    assert _upload_requests(hub) == ["POST /api/repos/create"]


def test_server_error_is_one_line_hub_error(hub: HubStandIn, merged: Path) -> None:
    hub.fail("POST", r"^/api/repos/create$", 500, message="database on fire")
    with pytest.raises(HubError) as ei:
        push(merged, "boom")
    err = ei.value
    assert type(err) is HubError and isinstance(err, ConnectionError) and isinstance(err, LorasaveError)
    assert err.status == 500 and "\n" not in str(err)
    assert "500" in str(err) and "database on fire" in str(err) and "/api/repos/create" in str(err)
    assert WRITE_TOKEN not in str(err)


def test_unreachable_hub_and_offline_mode(hub: HubStandIn, merged: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    _point_hub_at(monkeypatch, dead)
    with pytest.raises(HubError, match="cannot reach the Hub") as ei:
        push(merged, "away")
    assert dead in str(ei.value) and "\n" not in str(ei.value)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="offline mode"):
        push(merged, "away")


# ----------------------------------------------------------------------------- commit messages


def test_commit_message_from_manifest(tmp_path: Path) -> None:
    manifest = {
        "command": "merge",
        "sources": {"base": {"path": "/m/Llama-3-8B", "hub_id": "meta-llama/Meta-Llama-3-8B"}, "adapters": [{"path": "/runs/a"}, {"path": "/runs/b"}]},
        "settings": {"dtype": "bfloat16", "save_method": "merged_4bit", "bnb_4bit": {"quant_type": "nf4"}},
        "files": {"model.safetensors": {}, "config.json": {}},
    }
    msg = default_commit_message(tmp_path, manifest, ["model.safetensors", "config.json", "lorasave.json"])
    assert msg == "lorasave: merged nf4 4-bit checkpoint of meta-llama/Meta-Llama-3-8B + a + b (1 shard)"
    assert default_commit_message(tmp_path, None, ["x.bin", "y.txt"]) == f"lorasave: upload {tmp_path.name} (2 files)"


# ----------------------------------------------------------------------------- command line (once wired into cli.py)


def _invoke(*args: str | Path) -> click.testing.Result:
    from lorasave.cli import main as cli

    if "push" not in cli.main.commands:
        pytest.skip("`lorasave push` is not wired into cli.py yet")
    return click.testing.CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)


def test_cli_push(hub: HubStandIn, merged: Path) -> None:
    r = _invoke("push", merged, f"{ORG}/cli", "--private", "--revision", "dev", "--commit-message", "from the cli")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith("pushed ") and f"{ORG}/cli@dev" in r.stdout and len(r.stdout.splitlines()) == 1
    assert hub.is_private(f"{ORG}/cli") and hub.commits[-1].summary == "from the cli"
    assert set(hub.files(f"{ORG}/cli", "dev")) - INITIAL == set(_local(merged))
    r = _invoke("push", merged, f"{ORG}/cli", "--revision", "dev", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["unchanged"] is True
    assert WRITE_TOKEN not in r.stdout + r.stderr


def test_cli_push_errors_are_one_line(hub: HubStandIn, merged: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN")
    r = _invoke("push", merged, "x")
    assert r.exit_code == 4 and r.stdout == ""
    assert r.stderr.startswith("error: no Hugging Face token: set HF_TOKEN") and len(r.stderr.splitlines()) == 1
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    hub.fail("POST", r"^/api/repos/create$", 500)
    r = _invoke("push", merged, "x")
    assert r.exit_code == 4 and len(r.stderr.splitlines()) == 1 and "500" in r.stderr and "Traceback" not in r.stderr


def test_cli_merge_push_to_hub(hub: HubStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, adapter = EXAMPLES / "tiny-llama", EXAMPLES / "tiny-llama-lora"
    monkeypatch.delenv("HF_TOKEN")
    r = _invoke("merge", base, adapter, "-o", tmp_path / "a", "--push-to-hub", "merged-cli")
    assert r.exit_code == 4 and "no Hugging Face token" in r.stderr
    assert not (tmp_path / "a").exists()  # refused before the merge ran

    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    r = _invoke("merge", base, adapter, "-o", tmp_path / "b", "--max-shard-size", "50KB", "--push-to-hub", "merged-cli", "--private")
    assert r.exit_code == 0, r.stderr
    assert [ln.split()[0] for ln in r.stdout.splitlines()] == ["merged", "pushed"]
    assert hub.is_private(f"{USER}/merged-cli")
    assert {k: v for k, v in hub.files(f"{USER}/merged-cli").items() if k not in INITIAL} == _local(tmp_path / "b")

    r = _invoke("adapter", adapter, "-o", tmp_path / "c", "--push-to-hub", "adapter-cli", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["push"]["repo_id"] == f"{USER}/adapter-cli"
