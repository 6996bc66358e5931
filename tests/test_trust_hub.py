"""Issue 11, points 8 (a hostile Hub), 9 (tokens), 13 (verify finds its sources) and 15 (small promises).

The Hub is the local stand-in of ``tests/hub_server.py`` (127.0.0.1 only): it can answer HTML
pages, hang, and echo the ``Authorization`` header back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click.testing
import pytest
import torch

import lorasave
import test_hub
from hub_server import WRITE_TOKEN, HubStandIn
from lorasave.errors import HubError, InvalidOptionError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SRC = Path(__file__).resolve().parent.parent / "src"
hub = test_hub.hub  # the Hub stand-in fixture
merged = test_hub.merged  # a sharded merge of the bundled example


def _cli(*args: str | Path) -> click.testing.Result:
    from lorasave.cli import main as cli

    return click.testing.CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)


def _subprocess_env(hub: HubStandIn, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_TOKEN=WRITE_TOKEN,
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_OFFLINE="0",
        PYTHONPATH=os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]),
        **extra,
    )
    return env


# ----------------------------------------------------------------------------- point 9: tokens


def test_scrubber() -> None:
    from lorasave.util.redact import RedactFilter, scrub

    tok = "hf_" + "Ab1" * 6
    assert scrub(f"sent {tok} twice {tok}") == "sent *** twice ***"
    assert scrub("Authorization: Bearer s3cr3t-value, next") == "Authorization: ***, next"
    assert scrub('{"authorization": "Bearer abc.def"}') == '{"authorization": "***"}'
    assert scrub("headers={'Authorization': 'Basic dXNlcjpwYXNz'}") == "headers={'Authorization': '***'}"
    assert scrub("a plain token-less line, hf_short, path/to/hf_cache") == "a plain token-less line, hf_short, path/to/hf_cache"
    assert scrub("custom secret xyz-42 here", ["xyz-42"]) == "custom secret *** here"
    # a log record: message, arguments and traceback are scrubbed before any formatter
    try:
        raise RuntimeError(f"boom {tok}")
    except RuntimeError:
        record = logging.LogRecord("lorasave", logging.ERROR, __file__, 1, "token %s", (tok,), sys.exc_info())
    assert RedactFilter().filter(record)
    text = logging.Formatter().format(record)
    assert tok not in text and "token ***" in text and "RuntimeError: boom ***" in text


def test_token_echoed_by_the_hub_is_scrubbed(hub: HubStandIn, merged: Path, tmp_path: Path) -> None:
    """Before: the one line was scrubbed, but --debug printed the token (traceback and huggingface_hub's log)."""
    hub.echo_authorization = True
    for debug in ([], ["--debug"]):
        hub.fail("POST", r"^/api/repos/create$", 500, message="database on fire")
        proc = subprocess.run(
            [sys.executable, "-m", "lorasave", *debug, "push", str(merged), "echoed"],
            env=_subprocess_env(hub, tmp_path),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 4, proc.stderr
        assert "database on fire" in proc.stderr and "Authorization: ***" in proc.stderr
        assert WRITE_TOKEN not in proc.stderr + proc.stdout, f"token printed with {debug}:\n{proc.stderr}"
        assert ("Traceback" in proc.stderr) == bool(debug)


def test_tokens_scrubbed_from_log_lines_and_internal_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Before: a log line and an internal error quoting a token printed it as is."""
    stray = "hf_" + "Zz9" * 8  # a token lorasave was never told about
    monkeypatch.setenv("HF_TOKEN", "hf_" + "Qq7" * 8)

    def leaky(*args: object, **kwargs: object) -> None:
        logging.getLogger("lorasave.api").info("using token %s and %s", os.environ["HF_TOKEN"], stray)
        raise RuntimeError(f"request failed with Authorization: Bearer {os.environ['HF_TOKEN']} ({stray})")

    monkeypatch.setattr(lorasave.api, "merge", leaky)
    for debug in ([], ["--debug"]):
        r = _cli(*debug, "merge", EXAMPLES / "tiny-llama", EXAMPLES / "tiny-llama-lora", "-o", tmp_path / "out")
        assert r.exit_code == 70
        text = r.stdout + r.stderr
        assert os.environ["HF_TOKEN"] not in text and stray not in text, text
        assert "using token *** and ***" in text and "Authorization: ***" in text
        assert ("Traceback" in text) == bool(debug)


# ----------------------------------------------------------------------------- point 8: a hostile Hub


@pytest.mark.parametrize("status", [404, 403, 502])
def test_hub_answering_an_html_error_page(hub: HubStandIn, merged: Path, status: int) -> None:
    """Before: a proxy's HTML 404 read as "repo not found: check the repo id", 403 as "the token may not write"."""
    hub.fail("POST", r"^/api/repos/create$", status, html=True, message="Proxy error")
    with pytest.raises(HubError) as ei:
        lorasave.push(merged, "html")
    msg = str(ei.value)
    assert type(ei.value) is HubError and ei.value.status == status and "\n" not in msg
    assert "HTML page" in msg and str(status) in msg and "POST /api/repos/create" in msg and "HF_ENDPOINT" in msg
    assert "creating the repository" in msg and "<html" not in msg.lower()


def test_200_html_where_json_expected(hub: HubStandIn, merged: Path) -> None:
    """Before: JSONDecodeError, `lorasave push` exit 70 "internal error"."""
    hub.fail("POST", r"^/api/repos/create$", 200, html=True, message="Welcome to the company portal")
    with pytest.raises(HubError) as ei:
        lorasave.push(merged, "portal")
    assert ei.value.status == 200 and "HTML page (200 OK)" in str(ei.value) and "POST /api/repos/create" in str(ei.value)
    hub.fail("POST", r"^/api/repos/create$", 200, html=True)
    r = _cli("push", merged, "portal")
    assert r.exit_code == 4 and len(r.stderr.splitlines()) == 1 and "internal error" not in r.stderr, r.stderr


def test_hub_that_hangs_times_out(hub: HubStandIn, merged: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the push waited forever (here: the test's own 60 s guard fired)."""
    monkeypatch.setenv("LORASAVE_HUB_TIMEOUT", "1.5")
    hub.hang("POST", r"^/api/repos/create$")
    t0 = time.monotonic()
    with pytest.raises(HubError) as ei:
        _push_with_guard(merged, "hanging", 60)
    took = time.monotonic() - t0
    msg = str(ei.value)
    assert took < 30, took
    assert "within 1.5 s" in msg and "creating the repository" in msg and "POST /api/repos/create" in msg and "LORASAVE_HUB_TIMEOUT" in msg
    # huggingface_hub's client is restored: the next push works
    monkeypatch.delenv("LORASAVE_HUB_TIMEOUT")
    assert lorasave.push(merged, "after-hang").files


def _push_with_guard(folder: Path, repo: str, seconds: float) -> None:
    """``push`` in a thread: a hang fails the test instead of blocking the suite."""
    import threading

    box: dict[str, BaseException | None] = {"err": None}

    def go() -> None:
        try:
            lorasave.push(folder, repo)
        except BaseException as e:  # handed to the test thread
            box["err"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        pytest.fail(f"push still waiting for the Hub after {seconds} s")
    if box["err"] is not None:
        raise box["err"]


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan", "inf"])
def test_timeout_setting_is_validated(hub: HubStandIn, merged: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """Before: LORASAVE_HUB_TIMEOUT did not exist; any value was ignored and the push went on (exit 0)."""
    monkeypatch.setenv("LORASAVE_HUB_TIMEOUT", value)
    with pytest.raises(InvalidOptionError, match="LORASAVE_HUB_TIMEOUT"):
        lorasave.push(merged, "timeout")
    r = _cli("push", merged, "timeout")
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1 and "LORASAVE_HUB_TIMEOUT" in r.stderr
    assert not hub.requests  # refused before any request


# ----------------------------------------------------------------------------- point 13: verify finds its sources


@pytest.fixture
def live_out(llama_base: Path, tmp_path: Path) -> tuple[Path, object]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.float32)
    torch.manual_seed(3)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    out = tmp_path / "live-merged"
    lorasave.save_pretrained_merged(peft, out)
    return out, peft


def test_verify_live_merge_without_base(live_out: tuple[Path, object], llama_base: Path, tmp_path: Path) -> None:
    """Before: exit 2 "lorasave.json names no base path; pass --base"."""
    from lorasave.verify.run import verify

    out, peft = live_out
    manifest = json.loads((out / "lorasave.json").read_text())
    assert manifest["sources"]["base"]["path"] == str(llama_base.resolve())
    r = _cli("verify", out)
    assert r.exit_code == 0, r.stderr
    rep = verify(out)
    assert rep.ok and rep.tensors_exact > 0 and rep.not_probed  # merged tensors: the live adapter is not on disk
    assert all("--adapter" in why for why in rep.not_probed.values())
    # with the adapter saved, everything is probed
    peft.save_pretrained(tmp_path / "saved-adapter")  # type: ignore[attr-defined]
    rep = verify(out, adapters=[tmp_path / "saved-adapter"])
    assert rep.ok and rep.tensors_probed == len(manifest["result"]["merged"]) and not rep.not_probed
    rep = verify(out, level="logits")
    assert rep.ok and rep.skipped and "--adapter" in rep.skipped


def test_verify_names_lorasave_json_when_sources_moved(llama_base: Path, llama_plain: Path, tmp_path: Path) -> None:
    """Before: "base folder /x does not exist" with no word of lorasave.json or --base."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(llama_base, base)
    shutil.copytree(llama_plain, adapter)
    out = tmp_path / "out"
    lorasave.merge(base, adapter, out)
    shutil.rmtree(base)
    r = _cli("verify", out)
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1
    assert "lorasave.json" in r.stderr and "--base" in r.stderr and str(base) in r.stderr
    r = _cli("verify", out, "--base", llama_base)
    assert r.exit_code == 0, r.stderr
    shutil.rmtree(adapter)
    r = _cli("verify", out, "--base", llama_base)
    assert r.exit_code == 2 and "lorasave.json" in r.stderr and "--adapter" in r.stderr and str(adapter) in r.stderr
    assert _cli("verify", out, "--base", llama_base, "--adapter", llama_plain).exit_code == 0


def test_verify_logits_of_an_adapter_output(llama_base: Path, llama_plain: Path, tmp_path: Path) -> None:
    """Before: "logits: nothing to compare for a 'adapter' output" (and "names no base path" without --base)."""
    from lorasave.verify.run import verify

    out = tmp_path / "adapter-bf16"
    lorasave.save_adapter(llama_plain, out, dtype="bfloat16")
    rep = verify(out, level="logits", base=llama_base)
    assert rep.ok and rep.skipped is None and rep.top1_agreement is not None and rep.logits_max_diff is not None
    assert rep.logits_max_diff > 0  # bf16 factors: not the very same model
    # a broken saved adapter fails the comparison
    from safetensors.torch import load_file, save_file

    f = out / "adapter_model.safetensors"
    tensors = {k: (v * 50 if "lora_B" in k else v) for k, v in load_file(f).items()}
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    save_file(tensors, broken / "adapter_model.safetensors", metadata={"format": "pt"})
    rep = verify(broken, level="logits", base=llama_base)
    assert not rep.ok


# ----------------------------------------------------------------------------- point 15: small promises


def test_live_push_to_hub_points_to_lorasave_push(llama_base: Path, tmp_path: Path) -> None:
    """Before: save_pretrained_merged(push_to_hub=True) was a TypeError, and attach()'s method saved locally and returned success."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.float32), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(InvalidOptionError, match="lorasave push") as ei:
        lorasave.save_pretrained_merged(peft, tmp_path / "a", push_to_hub=True)
    assert "nothing was written" in str(ei.value)
    lorasave.attach(peft)
    with pytest.raises(InvalidOptionError, match="lorasave push"):
        peft.save_pretrained_merged(tmp_path / "b", None, "merged_16bit", push_to_hub=True, token="hf_x")  # type: ignore[operator]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("command", ["gguf", "onnx"])
def test_hint_names_the_command_run(command: str, tmp_path: Path) -> None:
    """Before: `lorasave gguf ADAPTER BASE` said "put the base first: lorasave merge BASE ADAPTER"."""
    r = _cli(command, EXAMPLES / "tiny-llama-lora", EXAMPLES / "tiny-llama", "-o", tmp_path / "out")
    assert r.exit_code != 0 and len(r.stderr.splitlines()) == 1
    assert f"put the base first: lorasave {command} BASE ADAPTER" in r.stderr, r.stderr
