"""experiments/mor/router_accuracy.py end to end in its quick mode: a run trains, its curve of
router sampling accuracy is read and summarised, and the JSON and the plot are written."""

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load():
    sys.path.insert(0, os.path.join(ROOT, "experiments", "mor"))
    spec = importlib.util.spec_from_file_location("mor_router_accuracy",
                                                  os.path.join(ROOT, "experiments", "mor", "router_accuracy.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path):
    ra = _load()
    assert ra.main(["--mode", "quick", "--out", str(tmp_path), "--fresh"]) == 0
    report = json.load(open(tmp_path / "results.json"))
    assert report["hardware"] and report["device"]
    r = report["runs"]["base"]
    assert [p["step"] for p in r["curve"]] == [5, 10]
    assert {"mor/sampling_acc_r2", "mor/sampling_acc_r3"} <= set(r["curve"][0])
    assert 0.0 <= r["val_mean_acc"] <= 1.0 and 0.0 <= r["val_step1_keep"] <= 1.0
    # the official code's average counts the capacity-1.0 step at accuracy 1
    accs = [r["val"]["mor/sampling_acc_r2"], r["val"]["mor/sampling_acc_r3"]]
    assert r["val_official_acc"] == pytest.approx((1.0 + sum(accs)) / 3)
    assert r["windows"] and "official_acc" in r["windows"][-1]
    assert (tmp_path / "accuracy_vs_steps.png").stat().st_size > 5_000
    assert ra.official_average([0.5, 0.7], (1.0, 2 / 3, 1 / 3)) == pytest.approx((1.0 + 0.5 + 0.7) / 3)
    assert ra.official_average([0.9, 0.5, 0.7], (0.99, 2 / 3, 1 / 3)) == pytest.approx((0.9 + 0.5 + 0.7) / 3)
