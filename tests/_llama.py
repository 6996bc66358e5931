"""The llama.cpp runtime in tests: skipped where it is not installed, required in CI."""

from __future__ import annotations

import os

import pytest

from lorasave.runtimes.llama_cpp import lib as llama_cpp
from lorasave.runtimes.llama_cpp.install import INSTALL_COMMAND


def need_llama_cpp() -> None:
    """Skip the calling test when the llama.cpp runtime is not installed; fail instead when env CI is set.

    CI installs it (``.ci/run`` runs ``lorasave install-llama-cpp``), so a missing runtime
    there is a broken setup, not a reason to skip.
    """
    if llama_cpp.available():
        return
    msg = f"the llama.cpp runtime is not installed in {llama_cpp.runtime_dir()}; install it with: {INSTALL_COMMAND}"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)
