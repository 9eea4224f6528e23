"""experiments/mor/router_accuracy.py end to end in its quick mode: a run trains, its curve of
router sampling accuracy is read and summarised, and the JSON and the plot are written."""

import json

import pytest

from .loader import load_experiment


def _load():
    return load_experiment("mor", "router_accuracy.py", name="mor_router_accuracy")


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
