"""Usage mistakes on the command line are one ``error:`` line too, exit 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["merge", "examples/tiny-llama", "examples/tiny-llama-lora"], "Missing option '-o'"),
        (["merge", "examples/tiny-llama", "examples/tiny-llama-lora", "-o", "x", "--dtype", "int8"], "Invalid value for '--dtype'"),
        (["merge", "examples/tiny-llama", "examples/tiny-llama-lora", "-o", "x", "--weights", "a,b"], "--weights"),
        (["frobnicate"], "No such command"),
    ],
)
def test_usage_errors_are_one_line(args: list[str], needle: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "lorasave", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (REPO / "x").exists()


def test_public_api_is_listed_and_lazy() -> None:
    """Every public name resolves; `import lorasave` alone does not import torch."""
    import subprocess
    import sys

    import lorasave

    assert sorted(lorasave.__all__) == sorted([*lorasave._LAZY, "__version__"])
    assert all(callable(getattr(lorasave, n)) or isinstance(getattr(lorasave, n), type) for n in lorasave._LAZY)
    assert set(lorasave._LAZY) <= set(dir(lorasave))
    code = "import sys, lorasave; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
