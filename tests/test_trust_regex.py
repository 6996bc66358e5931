"""Issue 11, point 8: hostile regexes, a damaged architecture cache and control characters in names.

- ``rank_pattern`` / ``alpha_pattern`` / ``target_modules`` regexes are matched as PEFT matches them
  (same results as Python's ``re``) but in bounded time: RE2 when the regex translates exactly,
  else ``re`` in a child process under a 2 s budget (``lorasave.plan.patterns``);
- a cache entry of the wrong shape is ignored and rebuilt, never an internal error;
- tensor and module names with newlines or terminal controls are escaped wherever printed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import lorasave
from lorasave.errors import AdapterMismatchError, PatternError, PatternTimeoutError
from lorasave.plan import patterns as P
from lorasave.util.printable import escape
from lorasave.verify.inspect import inspect_path
from lorasave.verify.run import verify

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BASE_SRC = EXAMPLES / "tiny-llama"
ADAPTER_SRC = EXAMPLES / "tiny-llama-lora"

#: Exponential for Python's re on any module name (no "!" in it); linear in RE2.
HOSTILE = r"([\w.]+)+!"
#: The same with a lookahead, which RE2 lacks: only re in the child can run it, and it times out.
HOSTILE_LOOKAHEAD = r"(?=[\w.])([\w.]+)+!"
#: Seconds a hung run is given before the test calls it hung (startup of torch + transformers included).
HANG = 90


def _cli(*args: str | Path, env: dict[str, str] | None = None, timeout: float = HANG) -> subprocess.CompletedProcess[str]:
    envv = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "lorasave", *map(str, args)], capture_output=True, text=True, timeout=timeout, env=envv, check=False)


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    return lines[0]


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return Path(shutil.copytree(BASE_SRC, tmp_path / "tiny-llama"))


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    return Path(shutil.copytree(ADAPTER_SRC, tmp_path / "tiny-llama-lora"))


def _edit_config(adapter: Path, **changes: Any) -> None:
    p = adapter / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


# ------------------------------------------------------------------ hostile patterns through the CLI


def test_cli_merge_hostile_rank_pattern_runs_in_re2(base: Path, adapter: Path, tmp_path: Path) -> None:
    """A backtracking bomb that RE2 can run: matched in linear time, same result as re (no match), merged."""
    _edit_config(adapter, rank_pattern={HOSTILE: 4})
    proc = _cli("merge", base, adapter, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    ref = lorasave.merge(BASE_SRC, ADAPTER_SRC, tmp_path / "ref")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (ref.output / "model.safetensors").read_bytes()


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_cli_merge_hostile_lookahead_pattern_one_line_within_budget(field: str, base: Path, adapter: Path, tmp_path: Path) -> None:
    """Lookahead has no RE2 form: re runs in a child and is stopped after the budget, with one line."""
    _edit_config(adapter, **{field: {"v_proj": 8, HOSTILE_LOOKAHEAD: 4}})
    t0 = time.monotonic()
    proc = _cli("merge", base, adapter, "-o", tmp_path / "out")
    took = time.monotonic() - t0
    line = _one_error_line(proc)
    assert proc.returncode == 1
    assert f"{field} key '(?=[\\\\w.])([\\\\w.]+)+!'" in line and "within 2 s" in line and "simplify the pattern" in line, line
    assert str(adapter / "adapter_config.json") in line
    assert took < 60, took
    assert not (tmp_path / "out").exists()


def test_api_timeout_error_names_pattern_and_budget(adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "BUDGET_S", 0.5)
    _edit_config(adapter, alpha_pattern={HOSTILE_LOOKAHEAD: 4})
    with pytest.raises(PatternTimeoutError) as info:
        lorasave.merge(BASE_SRC, adapter, tmp_path / "out")
    assert info.value.pattern == HOSTILE_LOOKAHEAD and info.value.budget_s == 0.5
    assert "\n" not in str(info.value) and "within 0.5 s" in str(info.value)


def test_alpha_pattern_too_long_refused(adapter: Path, tmp_path: Path) -> None:
    key = "|".join(["q_proj"] * 1200)  # 8399 characters, an ordinary pattern otherwise
    _edit_config(adapter, alpha_pattern={key: 4})
    with pytest.raises(PatternError) as info:
        lorasave.merge(BASE_SRC, adapter, tmp_path / "out")
    assert f"{len(key)} characters long" in str(info.value) and "8192" in str(info.value)


def test_verify_logits_refuses_hostile_target_modules(adapter: Path, tmp_path: Path) -> None:
    """PEFT fullmatches target_modules with re in-process: verify tries the regex first, under the budget."""
    _edit_config(adapter, target_modules=HOSTILE)
    out = tmp_path / "out"
    lorasave.merge(BASE_SRC, adapter, out)  # the merge reads the tensors, not target_modules
    t0 = time.monotonic()
    proc = _cli("verify", out, "--level", "logits")
    line = _one_error_line(proc)
    assert proc.returncode == 1
    assert "target_modules" in line and "within 2 s" in line and "PEFT would hang" in line, line
    assert time.monotonic() - t0 < 60


def test_check_peft_patterns_accepts_ordinary_configs() -> None:
    names = ["", "model", "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "lm_head"]
    P.check_peft_patterns(
        {
            "target_modules": r"model\.layers\.(?!1\.)\d+\.self_attn\.(q|v)_proj",
            "rank_pattern": {"q_proj": 4, r"(?<=layers\.0\.)mlp\.down_proj": 2},
            "alpha_pattern": {"layers.0.self_attn.q_proj": 8},
            "modules_to_save": ["lm_head"],
            "layers_pattern": "layers",
        },
        names,
    )
    with pytest.raises(PatternError, match="modules_to_save"):
        P.check_peft_patterns({"modules_to_save": ["lm_head("]}, names)


# ------------------------------------------------------------------ the helpers equal re and PEFT

# Names short enough that re's worst case stays small in-process.
_NAME_CHARS = "aqkvop_rj.01"
NAMES = st.one_of(
    st.sampled_from(["", "q_proj", "a.q_proj", "l.0.v_proj", "lm_head", "h.1.mlp.fc", "x.y", "Q_PROJ", "0.k", "a..b"]),
    st.text(_NAME_CHARS, max_size=10),
)
_ATOMS = [
    "a", "q", "_", "0", "proj", r"\.", ".", r"\d", r"\w", r"\W", r"\s", r"\S", r"\b", r"\B", "[a-q_]", "[^.]", "[0-9]",
    r"[\d.]", "^", "$", r"\A", r"\Z", "", "x{0}", "[.]",
]  # fmt: skip


def _regexes(lookaround: bool = True) -> st.SearchStrategy[str]:
    """Regexes over module-name characters; ``lookaround`` adds the constructs RE2 lacks."""

    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        plain = [
            st.tuples(inner, inner).map("".join),
            st.tuples(inner, inner).map(lambda t: f"(?:{t[0]}|{t[1]})"),
            inner.map(lambda s: f"({s})"),
            st.tuples(inner, st.sampled_from(["*", "+", "?", "{1,2}", "*?", "+?", "{2}", "{,2}", "{1,}"])).map(lambda t: f"(?:{t[0]}){t[1]}"),
            inner.map(lambda s: f"(?i:{s})"),
            inner.map(lambda s: f"(?-i:{s})"),
        ]
        hard = [
            inner.map(lambda s: f"(?=.*{s})"),  # no RE2 form: the child runs these
            inner.map(lambda s: f"(?!{s})"),
            inner.map(lambda s: f"(?>{s})") if sys.version_info >= (3, 11) else inner,
        ]
        return st.one_of(plain + (hard if lookaround else []))

    return st.recursive(st.sampled_from(_ATOMS), extend, max_leaves=6)


FAST = settings(max_examples=400, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(rx=_regexes(lookaround=False), names=st.lists(NAMES, min_size=1, max_size=6), mode=st.sampled_from(["match", "fullmatch"]), ic=st.booleans())
def test_re2_translation_equals_re(rx: str, names: list[str], mode: str, ic: bool) -> None:
    """Wherever a regex gets an RE2 form, RE2 on it answers exactly as re does (printable ASCII names)."""
    import re2

    rx = f"(?i){rx}" if ic else rx
    try:
        compiled = re.compile(rx)
    except re.error:
        return
    form = P.re2_form(rx, mode)  # type: ignore[arg-type]
    assert form is not None, rx  # every construct here has an RE2 form
    ours = re2.compile(form)
    for name in filter(None, names):  # empty names go to re (see patterns._re2_safe)
        assert (ours.search(name) is not None) == (getattr(compiled, mode)(name) is not None), (rx, form, name)


@SLOW
@given(
    rxs=st.lists(_regexes(), min_size=1, max_size=3),
    names=st.lists(st.one_of(NAMES, st.sampled_from(["q_proj\n", "a\x1b.q_proj", "é.q_proj", "\u212a", "ſ"])), min_size=1, max_size=5),
)
def test_match_table_equals_re(rxs: list[str], names: list[str]) -> None:
    """RE2 and the child together give re's answers, including names RE2 does not take (controls, non-ASCII)."""
    valid = []
    for rx in rxs:
        try:
            re.compile(rx)
        except re.error:
            continue
        valid.append(rx)
    rules = [P.Rule("target_modules", rx, rx, "fullmatch") for rx in valid]
    table = P.match_table(rules, names)
    assert table == [[re.fullmatch(rx, n) is not None for n in names] for rx in valid]


@SLOW
@given(keys=st.lists(_regexes(), min_size=1, max_size=3, unique=True), names=st.lists(NAMES, min_size=1, max_size=5))
def test_pattern_keys_equal_peft_get_pattern_key(keys: list[str], names: list[str]) -> None:
    from peft.utils.other import get_pattern_key

    try:
        for k in keys:
            re.compile(rf"(.*\.)?({k})$")
    except re.error:
        return
    patterns = {k: i + 1 for i, k in enumerate(keys)}
    found = P.pattern_keys("rank_pattern", patterns, names)
    for n in names:
        assert P.pattern_value(patterns, n, 99, found) == patterns.get(get_pattern_key(patterns.keys(), n), 99), (keys, n)


@SLOW
@given(target=st.one_of(_regexes(), st.lists(st.sampled_from(["q_proj", "proj", "0.k", "mlp.fc", "lm_head"]), max_size=3)), names=st.lists(NAMES, max_size=5))
def test_target_matches_equal_peft(target: str | list[str], names: list[str]) -> None:
    from peft.tuners.tuners_utils import check_target_module_exists

    if isinstance(target, str):
        try:
            re.compile(target)
        except re.error:
            return
    cfg = SimpleNamespace(
        target_modules=target, exclude_modules=None, modules_to_save=None, target_parameters=None, layers_to_transform=None, layers_pattern=None
    )
    assert P.target_matches(target, names) == [bool(check_target_module_exists(cfg, n)) for n in names]


def test_printable_escape() -> None:
    assert escape("a\nb\rc\td\x1b[31m\x00\x7f\x85\u2028\u202e") == "a\\nb\\rc\\td\\x1b[31m\\x00\\x7f\\x85\\u2028\\u202e"
    assert escape("model.layers.0.q_proj é ſ (.*\\.)?") == "model.layers.0.q_proj é ſ (.*\\.)?"


# ------------------------------------------------------------------ a damaged architecture cache

_DEEP = "[" * 100_000 + "]" * 100_000
BAD_ENTRIES: dict[str, Any] = {
    "not-json": "{oops",
    "not-utf8": b"\xff\xfe{",
    "nested-100k-deep": _DEEP,
    "10000-digit-int": '{"num_parameters": ' + "9" * 10_000 + "}",
    "list": [1, 2, 3],
    "empty-object": {},
    "model_class-int": {"model_class": 5},
    "save_order-string": {"save_order": "model.norm.weight"},
    "save_order-ints": {"save_order": [1, 2]},
    "tied_names-int": {"tied_names": 5},
    "module_kinds-list": {"module_kinds": ["linear"]},
    "module_kinds-unknown-kind": {"module_kinds": {"model.layers.0.self_attn.q_proj": "quantum"}},
    "keep_fp32-bad-regex": {"keep_fp32": ["("]},
    "num_parameters-string": {"num_parameters": "12"},
    "params3d-not-pair": {"params3d": {"model.x": 5}},
    "conv_groups-string": {"conv_groups": {"model.conv": "two"}},
    "tied_to-int": {"tied_to": {"lm_head.weight": 3}},
    "extra-field": {"surprise": 1},
    "deep-inside-field": {"note": json.loads("[" * 500 + "]" * 500)},
}


def _write_entry(path: Path, good: dict[str, Any], bad: Any) -> None:
    if isinstance(bad, bytes):
        path.write_bytes(bad)
    elif isinstance(bad, str):
        path.write_text(bad)
    elif isinstance(bad, dict) and bad:
        path.write_text(json.dumps({**good, **bad}))
    else:
        path.write_text(json.dumps(bad))


@pytest.mark.parametrize("case", list(BAD_ENTRIES))
def test_bad_architecture_cache_entry_rebuilt(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORASAVE_CACHE", str(tmp_path / "cache"))
    first = lorasave.merge(BASE_SRC, ADAPTER_SRC, tmp_path / "first")
    (entry,) = (tmp_path / "cache" / "architecture").glob("*.json")
    good = json.loads(entry.read_text())
    _write_entry(entry, good, BAD_ENTRIES[case])
    second = lorasave.merge(BASE_SRC, ADAPTER_SRC, tmp_path / "second")
    for f in ("model.safetensors", "config.json"):
        assert (second.output / f).read_bytes() == (first.output / f).read_bytes(), f
    assert json.loads(entry.read_text()) == good  # rebuilt and stored again


def test_bad_sha256_cache_entry_rehashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    monkeypatch.setenv("LORASAVE_CACHE", str(tmp_path / "cache"))
    lorasave.merge(BASE_SRC, ADAPTER_SRC, tmp_path / "first")
    for entry in (tmp_path / "cache" / "sha256").glob("*.json"):
        entry.write_text(json.dumps("not a sha256"))
    res = lorasave.merge(BASE_SRC, ADAPTER_SRC, tmp_path / "second")
    manifest = json.loads((res.output / "lorasave.json").read_text())
    want = hashlib.sha256((BASE_SRC / "model.safetensors").read_bytes()).hexdigest()
    assert manifest["sources"]["base"]["files"]["model.safetensors"] == want


# ------------------------------------------------------------------ control characters in names

EVIL = "\nerror: all good\x1b[2J"


def test_base_tensor_name_with_controls_escaped_in_note(base: Path, tmp_path: Path) -> None:
    """A base tensor unknown to the class is kept with a note naming it: the note stays one line."""
    tensors = load_file(base / "model.safetensors")
    tensors[f"extra{EVIL}.weight"] = torch.zeros(2)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    proc = _cli("merge", base, ADAPTER_SRC, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert all(ln.startswith("note: ") for ln in lines), proc.stderr
    assert any("extra\\nerror: all good\\x1b[2J.weight" in ln for ln in lines), proc.stderr
    assert "\x1b" not in proc.stderr + proc.stdout
    ins = _cli("inspect", base / "model.safetensors")
    assert ins.returncode == 0 and "\x1b" not in ins.stdout


def test_adapter_module_name_with_controls_escaped_in_error(adapter: Path, tmp_path: Path) -> None:
    """An adapter module the base lacks: the error names it, on one line, controls escaped."""
    p = adapter / "adapter_model.safetensors"
    tensors = load_file(p)
    for k in [k for k in tensors if ".layers.0.self_attn.q_proj." in k]:
        tensors[k.replace("q_proj", f"q_proj{EVIL}")] = tensors.pop(k)
    save_file(tensors, p, metadata={"format": "pt"})
    proc = _cli("merge", BASE_SRC, adapter, "-o", tmp_path / "out")
    line = _one_error_line(proc)
    assert "q_proj\\nerror: all good\\x1b[2J" in line and "\x1b" not in proc.stderr
    with pytest.raises(AdapterMismatchError) as info:
        lorasave.merge(BASE_SRC, adapter, tmp_path / "out")
    assert "\n" not in str(info.value) and info.value.module == f"model.layers.0.self_attn.q_proj{EVIL}"


def test_inspect_and_verify_summaries_escape_names(adapter: Path, tmp_path: Path) -> None:
    _edit_config(adapter, target_modules=f"q_proj{EVIL}")
    lines = inspect_path(adapter).summary().splitlines()
    assert any(ln == "  target_modules: q_proj\\nerror: all good\\x1b[2J" for ln in lines), lines
    out = tmp_path / "out"
    lorasave.merge(BASE_SRC, ADAPTER_SRC, out)
    manifest = json.loads((out / "lorasave.json").read_text())
    manifest["files"][f"gone{EVIL}.bin"] = {"bytes": 1, "sha256": "0" * 64}
    (out / "lorasave.json").write_text(json.dumps(manifest))
    report = verify(out, level="files")
    assert not report.ok
    summary = report.summary()
    assert "\n" not in summary and "gone\\nerror: all good\\x1b[2J.bin" in summary, summary
