"""experiments/step_breakdown.py runs and its nested parts are consistent."""

import json

import pytest

from .loader import load_experiment


@pytest.mark.slow
def test_step_breakdown_tiny(tmp_path):
    mod = load_experiment("step_breakdown.py", name="step_breakdown")
    out = tmp_path / "bd.json"
    assert mod.main(["--preset", "tiny", "--reps", "2", "--set", "model.n_layers=2", "--out", str(out)]) == 0
    r = json.load(open(out))
    for k in ("train_step", "value_and_grad", "forward_loss", "forward_hidden", "head_loss", "attention",
              "optimizer"):
        assert r[k] > 0, k
    assert r["forward_hidden"] < r["value_and_grad"] and r["tokens_per_s"] > 0
