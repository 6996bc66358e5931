"""Issue 11 point 7: chat templates are rendered with bounded work.

A template that loops (nested ``range``) or builds huge strings is stopped within the documented
budget (``lorasave.util.template_render``: 2 s, 1 MB of output, 1 GiB of memory) and the Modelfile is written
without ``TEMPLATE`` and with a note; ordinary templates render exactly as transformers'
``apply_chat_template`` renders them.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lorasave.errors import ChatTemplateBudgetError
from lorasave.util import template_render as TR
from test_ollama import ALPACA, CASES, SAMPLE, _tokenizer_dir

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

NESTED_RANGE = "{% for i in range(99999) %}{% for j in range(99999) %}{{ '' }}{% endfor %}{% endfor %}"
#: doubles a string 40 times (a terabyte); only a memory limit stops it early
DOUBLING = "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}"
#: 5 MB of text from a few bytes of template
WIDE = "{% for i in range(5) %}{{ 'x' * 1000000 }}{% endfor %}"
USER_ONLY = [{"role": "user", "content": "hello"}]


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }


def _seconds_to_start() -> float:
    """Wall time of a render call on a trivial template: the child's start and transformers import."""
    t0 = time.monotonic()
    assert TR.render_chat_template("{{ 'ok' }}", [USER_ONLY])[0].text == "ok"
    return time.monotonic() - t0


def test_nested_range_stopped_within_budget() -> None:
    start = _seconds_to_start()
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateBudgetError, match=r"longer than 2 s") as info:
        TR.render_chat_template(NESTED_RANGE, [USER_ONLY])
    elapsed = time.monotonic() - t0
    assert info.value.limit == "time"
    assert elapsed < start + TR.TIME_S + 2.0, (elapsed, start)


def test_huge_output_stopped_within_budget() -> None:
    with pytest.raises(ChatTemplateBudgetError, match=r"more than 1000 kB") as info:
        TR.render_chat_template(WIDE, [USER_ONLY])
    assert info.value.limit == "output"
    with pytest.raises(ChatTemplateBudgetError, match=r"more than 1024 MiB") as info:
        TR.render_chat_template(DOUBLING, [USER_ONLY])
    assert info.value.limit == "memory"


def _limit_memory() -> None:  # the harness' own guard, so that an unbounded render cannot take the machine
    resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))


def test_modelfile_step_with_a_string_bomb_stays_small(tmp_path: Path) -> None:
    """write_modelfile on a doubling template: a note, no TEMPLATE, and the calling process never grows by GBs."""
    tok_dir = _tokenizer_dir(tmp_path, DOUBLING)
    code = (
        "import json, resource\nfrom lorasave.formats.gguf.ollama import write_modelfile\n"
        f"res = write_modelfile({str(tmp_path)!r}, 'm.gguf', {str(tok_dir)!r})\n"
        "print(json.dumps({'notes': res.notes, 'maxrss_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=_env(tmp_path), preexec_fn=_limit_memory, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["maxrss_kb"] < 1_500_000, report
    assert len(report["notes"]) == 1 and "more than 1024 MiB" in report["notes"][0], report
    lines = (tmp_path / "Modelfile").read_text().splitlines()
    assert lines[0] == "FROM ./m.gguf" and not any(ln.startswith("TEMPLATE") for ln in lines)


def test_gguf_with_a_looping_template_finishes_with_a_note(tmp_path: Path) -> None:
    """lorasave gguf on a base whose chat template loops 10^10 times: done in seconds, Modelfile without TEMPLATE.

    Before: the Modelfile step rendered the template in the process and never finished."""
    base = tmp_path / "base"
    shutil.copytree(EXAMPLES / "tiny-llama", base)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg["chat_template"] = NESTED_RANGE
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lorasave", "gguf", str(base), str(EXAMPLES / "tiny-llama-lora"), "-o", str(out), "--type", "f32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=_env(tmp_path), check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    both = proc.stdout + proc.stderr
    assert "longer than 2 s" in both and "Traceback" not in both, both[-2000:]
    lines = (out / "Modelfile").read_text().splitlines()
    assert not any(ln.startswith("TEMPLATE") for ln in lines)


@pytest.mark.parametrize("name", [*CASES, "alpaca"])
def test_templates_render_as_transformers_does(tmp_path: Path, name: str) -> None:
    template = ALPACA if name == "alpaca" else CASES[name][0]
    tok = AutoTokenizer.from_pretrained(_tokenizer_dir(tmp_path, template), trust_remote_code=False)
    conversations = [list(SAMPLE), [m for m in SAMPLE if m["role"] != "system"], USER_ONLY]
    got = TR.render_chat_template(tok.get_chat_template(), conversations, tok.special_tokens_map)
    for conv, res in zip(conversations, got, strict=True):
        try:
            want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template refuses the conversation (raise_exception)
            assert res.text is None and res.error is not None and str(exc) in res.error
        else:
            assert res.error is None and res.text == want
