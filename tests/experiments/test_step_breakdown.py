"""experiments/step_breakdown.py runs and its nested parts are consistent."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_step_breakdown_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("step_breakdown", os.path.join(ROOT, "experiments",
                                                                                 "step_breakdown.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "bd.json"
    assert mod.main(["--preset", "tiny", "--reps", "2", "--set", "model.n_layers=2", "--out", str(out)]) == 0
    r = json.load(open(out))
    for k in ("train_step", "value_and_grad", "forward_loss", "forward_hidden", "head_loss", "attention",
              "optimizer"):
        assert r[k] > 0, k
    assert r["forward_hidden"] < r["value_and_grad"] and r["tokens_per_s"] > 0
