"""Several adapters merged at once, with weights: W0 + sum_i w_i * dW_i.

The reference is one PeftModel with both adapters loaded and active together, each LoRA's
scaling multiplied by its weight (cross-checked against PEFT's ``add_weighted_adapter`` with
``combination_type="cat"``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import _parity as P
import lorasave
from lorasave.errors import LorasaveError

PAIR = ["multi_a", "multi_b"]
WEIGHTS = [0.7, 0.3]


@pytest.fixture(scope="session")
def mz(zoo: Path) -> P.Zoo:
    return P.Zoo(zoo / "multi")


def test_reference_weights_matter(mz: P.Zoo) -> None:
    """Fixture check: each adapter and each weight moves the reference logits."""
    weighted = P.multi_reference(mz, PAIR, WEIGHTS)
    plain = P.multi_reference(mz, PAIR)
    assert P.rel_diff(plain, weighted) > 1e-2
    for n in PAIR:
        ref = mz.reference(n)
        assert P.rel_diff(ref.disabled, ref.logits) > P.MIN_EFFECT, n
        assert P.rel_diff(ref.logits, plain) > 1e-2, n


def test_reference_agrees_with_add_weighted_adapter_cat(mz: P.Zoo) -> None:
    """Calibration: PEFT's own weighted combination gives the same logits as the reference."""
    pm = P.multi_peft_model(mz, PAIR)
    pm.add_weighted_adapter(PAIR, WEIGHTS, adapter_name="combined", combination_type="cat")
    pm.set_adapter("combined")
    got = P.logits(pm, P.eval_inputs("llama"))
    P.assert_logits_match(got, P.multi_reference(mz, PAIR, WEIGHTS))


@pytest.mark.parametrize("weights", [WEIGHTS, None], ids=["weighted", "default_weights"])
def test_weighted_merge_matches_peft(mz: P.Zoo, weights: list[float] | None) -> None:
    kw = {} if weights is None else {"weights": weights}
    out = mz.merge(PAIR, **kw)
    model = P.load_merged(out, P.BASES["llama"].auto)
    got = P.logits(model, P.eval_inputs("llama"))
    P.assert_logits_match(got, P.multi_reference(mz, PAIR, weights))


def test_weights_of_one_equal_no_weights(mz: P.Zoo) -> None:
    a = mz.merge(PAIR)
    b = mz.merge(PAIR, weights=[1.0, 1.0])
    for f in P.weight_files(a):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_wrong_number_of_weights_refused(mz: P.Zoo, tmp_path: Path) -> None:
    with pytest.raises(LorasaveError):
        lorasave.merge(mz.base("llama"), [mz.adapter(n) for n in PAIR], tmp_path / "out", weights=[0.5])
    assert not (tmp_path / "out").exists()


def test_two_dora_adapters_refused(mz: P.Zoo, tmp_path: Path) -> None:
    with pytest.raises(LorasaveError) as err:
        lorasave.merge(mz.base("llama"), [mz.adapter("multi_dora_a"), mz.adapter("multi_dora_b")], tmp_path / "out", weights=WEIGHTS)
    assert "dora" in P.message(err.value).lower(), str(err.value)
    assert not (tmp_path / "out").exists()


def test_conflicting_modules_to_save_refused(mz: P.Zoo, tmp_path: Path) -> None:
    with pytest.raises(LorasaveError) as err:
        lorasave.merge(mz.base("llama"), [mz.adapter("multi_mts_a"), mz.adapter("multi_mts_b")], tmp_path / "out")
    msg = P.message(err.value)
    assert "lm_head" in msg or "modules_to_save" in msg, msg
    assert not (tmp_path / "out").exists()


def test_cli_weights(mz: P.Zoo, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "lorasave", "merge", str(mz.base("llama")), *(str(mz.adapter(n)) for n in PAIR)]
    cmd += ["-o", str(out), "--weights", ",".join(map(str, WEIGHTS)), "--dtype", "float32", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    api = mz.merge(PAIR, weights=WEIGHTS)
    assert P.weight_files(out) == P.weight_files(api)
    for f in [*P.weight_files(api), "config.json"]:
        assert (out / f).read_bytes() == (api / f).read_bytes(), f
