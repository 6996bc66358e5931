"""Issue 11 point 6: nothing from a model folder runs.

Every transformers load passes ``trust_remote_code=False`` (a static check over ``src/lorasave``),
and a folder whose ``tokenizer_config.json`` / ``config.json`` names its own classes in ``auto_map``
(BASE, ADAPTER, ``--tokenizer`` or OUT) never gets its module imported: the payload module writes a
marker file when imported, and each command runs with stdin a pipe answering ``y`` to the prompt
transformers shows when ``trust_remote_code`` is left unset.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "lorasave"
EXAMPLES = ROOT / "examples"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TOKENIZER_PAYLOAD = """import pathlib
pathlib.Path({marker!r}).write_text("imported by transformers")
from transformers import PreTrainedTokenizerFast


class EvilTokenizerFast(PreTrainedTokenizerFast):
    pass
"""
CONFIG_PAYLOAD = """import pathlib
pathlib.Path({marker!r}).write_text("imported by transformers")
from transformers import PretrainedConfig


class EvilConfig(PretrainedConfig):
    model_type = "evil_model"
"""


# ------------------------------------------------------------------------------------ static check


def _transformers_loads(tree: ast.AST) -> list[ast.Call]:
    """``X.from_pretrained(...)`` calls (``PeftModel``'s excepted: PEFT has no remote code) and ``AutoX(...)`` calls."""
    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "from_pretrained":
            owner = func.value.id if isinstance(func.value, ast.Name) else ast.unparse(func.value)
            if owner != "PeftModel":
                calls.append(node)
        elif isinstance(func, ast.Name) and func.id.startswith("Auto") and func.id[4:5].isupper():
            calls.append(node)
    return calls


def test_every_transformers_load_passes_trust_remote_code_false() -> None:
    found, missing = 0, []
    for path in sorted(SRC.rglob("*.py")):
        for call in _transformers_loads(ast.parse(path.read_text(encoding="utf-8"))):
            found += 1
            kw = {k.arg: k.value for k in call.keywords if k.arg}
            value = kw.get("trust_remote_code")
            if not (isinstance(value, ast.Constant) and value.value is False):
                missing.append(f"{path.relative_to(ROOT)}:{call.lineno}: {ast.unparse(call)[:100]}")
    assert found >= 3, "the static check found no transformers loads: is it still looking in the right place?"
    assert not missing, "transformers loads without trust_remote_code=False:\n" + "\n".join(missing)


# --------------------------------------------------------------------------------- payload folders


def _arm_tokenizer(folder: Path, marker: Path) -> None:
    """Make ``folder``'s tokenizer one that only its own code (``evil_tok.py``) could load."""
    (folder / "evil_tok.py").write_text(TOKENIZER_PAYLOAD.format(marker=str(marker)))
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "EvilTokenizerFast"
    cfg["auto_map"] = {"AutoTokenizer": [None, "evil_tok.EvilTokenizerFast"]}
    path.write_text(json.dumps(cfg, indent=2))


def _arm_config(folder: Path, marker: Path) -> None:
    """A ``config.json`` whose model type only its own code (``evil_cfg.py``) knows, beside a built-in tokenizer."""
    (folder / "evil_cfg.py").write_text(CONFIG_PAYLOAD.format(marker=str(marker)))
    (folder / "config.json").write_text(json.dumps({"model_type": "evil_model", "auto_map": {"AutoConfig": "evil_cfg.EvilConfig"}}))


def _tokenizer_copy(dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EXAMPLES / "tiny-llama" / name, dst / name)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHAT_TEMPLATE  # so that the gguf step also writes (and renders for) a Modelfile
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return dst


@pytest.fixture
def sources(tmp_path: Path) -> tuple[Path, Path]:
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(EXAMPLES / "tiny-llama", base)
    shutil.copytree(EXAMPLES / "tiny-llama-lora", adapter)
    _tokenizer_copy(tmp_path / "tok")
    shutil.copy(tmp_path / "tok" / "tokenizer_config.json", base / "tokenizer_config.json")
    return base, adapter


def _run(tmp_path: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """The CLI with stdin a pipe that answers "y" to any prompt; dynamic modules cached under tmp_path."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
        "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "lorasave", *map(str, args)]
    return subprocess.run(cmd, input="y\n" * 8, capture_output=True, text=True, timeout=240, env=env, check=False)


def _assert_no_code_ran(proc: subprocess.CompletedProcess[str], marker: Path) -> None:
    both = proc.stdout + proc.stderr
    assert not marker.exists(), f"the folder's module was imported (exit {proc.returncode}): {both[-2000:]}"
    assert "[y/N]" not in both and "trust_remote_code" not in both, both[-2000:]
    assert proc.returncode != 70 and "Traceback" not in both, both[-2000:]


def _assert_one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode in (1, 2) and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("where", ["base", "adapter", "tokenizer"])
def test_gguf_never_imports_a_tokenizer_module(tmp_path: Path, sources: tuple[Path, Path], where: str) -> None:
    """BASE / ADAPTER / --tokenizer with a custom tokenizer class: a one-line refusal, nothing imported."""
    base, adapter = sources
    marker = tmp_path / "MARKER"
    extra: list[str | Path] = []
    if where == "base":
        _arm_tokenizer(base, marker)
    elif where == "adapter":
        _tokenizer_copy(adapter / "tokenizer_tmp")
        for p in (adapter / "tokenizer_tmp").iterdir():
            p.rename(adapter / p.name)
        _arm_tokenizer(adapter, marker)
    else:
        _arm_tokenizer(tmp_path / "tok", marker)
        extra = ["--tokenizer", tmp_path / "tok"]
    proc = _run(tmp_path, "gguf", base, adapter, "-o", tmp_path / "out", "--type", "f32", *extra)
    _assert_no_code_ran(proc, marker)
    line = _assert_one_line_error(proc)
    assert "auto_map" in line and "code" in line
    assert not (tmp_path / "out").exists()


def test_gguf_tokenizer_folder_with_custom_config_loads_builtin(tmp_path: Path, sources: tuple[Path, Path]) -> None:
    """--tokenizer folder whose config.json names its own AutoConfig: the built-in tokenizer loads, the config's code never runs."""
    base, adapter = sources
    marker = tmp_path / "MARKER"
    _arm_config(tmp_path / "tok", marker)
    out = tmp_path / "out"
    proc = _run(tmp_path, "gguf", base, adapter, "-o", out, "--type", "f32", "--tokenizer", tmp_path / "tok")
    _assert_no_code_ran(proc, marker)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "Modelfile").is_file()


def test_verify_logits_never_imports_out_tokenizer_module(tmp_path: Path, sources: tuple[Path, Path]) -> None:
    """OUT's tokenizer names its own class: verify --level logits uses fixed ids instead, nothing imported."""
    base, adapter = sources
    marker = tmp_path / "MARKER"
    out = tmp_path / "merged"
    merged = _run(tmp_path, "merge", base, adapter, "-o", out)
    assert merged.returncode == 0, merged.stderr[-2000:]
    # armed after the merge, as a hand-edited OUT would be; the manifest is updated to match so that
    # the files level passes and the logits level runs
    _arm_tokenizer(out, marker)
    manifest = json.loads((out / "lorasave.json").read_text())
    data = (out / "tokenizer_config.json").read_bytes()
    manifest["files"]["tokenizer_config.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (out / "lorasave.json").write_text(json.dumps(manifest, indent=2))
    proc = _run(tmp_path, "verify", out, "--level", "logits")
    _assert_no_code_ran(proc, marker)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_modelfile_never_imports_a_tokenizer_module(tmp_path: Path) -> None:
    """ollama.write_modelfile on a tokenizer folder naming its own class: one-line error, nothing imported."""
    marker = tmp_path / "MARKER"
    tok = _tokenizer_copy(tmp_path / "tok")
    _arm_tokenizer(tok, marker)
    code = (
        "import sys\nfrom lorasave.formats.gguf.ollama import write_modelfile\nfrom lorasave.errors import LorasaveError\n"
        f"try:\n    write_modelfile({str(tmp_path)!r}, 'm.gguf', {str(tok)!r})\n"
        "except LorasaveError as e:\n    print('error:', e, file=sys.stderr); sys.exit(e.exit_code)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", code], input="y\n" * 8, capture_output=True, text=True, timeout=120, env=env, check=False)
    _assert_no_code_ran(proc, marker)
    _assert_one_line_error(proc)
    assert not (tmp_path / "Modelfile").exists()


def test_bitsandbytes_never_fetches_a_hub_kernel(tmp_path: Path) -> None:
    """bitsandbytes' CPU backend calls ``kernels.get_kernel`` at import on AVX-512 BF16 CPUs (code from the Hub);
    lorasave imports it with ``kernels`` hidden. A stand-in ``kernels`` records any call."""
    import subprocess
    import sys

    fake = tmp_path / "fake" / "kernels"
    fake.mkdir(parents=True)
    marker = tmp_path / "called"
    (fake / "__init__.py").write_text(f"def get_kernel(*a, **k):\n    open({str(marker)!r}, 'w').write(repr(a))\n    raise RuntimeError('no')\n")
    env = {**__import__("os").environ, "PYTHONPATH": f"{fake.parent}"}
    ours = "from lorasave.formats.bnb import preload_bnb; assert preload_bnb() is not None"
    r = subprocess.run([sys.executable, "-c", ours], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not marker.exists(), "lorasave's bitsandbytes import called kernels.get_kernel"
    r = subprocess.run([sys.executable, "-c", "import bitsandbytes"], env=env, capture_output=True, text=True, timeout=120)
    if "avx512_bf16" in Path("/proc/cpuinfo").read_text():  # the control: a plain import on this CPU kind calls it
        assert marker.exists(), "control: bitsandbytes did not call kernels.get_kernel here, so the test proves nothing"
