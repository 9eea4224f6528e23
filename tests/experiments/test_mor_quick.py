"""experiments/mor end to end in its quick mode: every variant trains, is evaluated and plotted."""

import json

import pytest

from .loader import load_experiment


def _load():
    return load_experiment("mor", "run.py", name="mor_run")


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path):
    run = _load()
    assert run.main(["--mode", "quick", "--out", str(tmp_path), "--fresh"]) == 0
    report = json.load(open(tmp_path / "results.json"))
    assert set(report["variants"]) == set(run.VARIANTS)
    assert (tmp_path / "nll_vs_flops.png").stat().st_size > 10_000
    v = report["variants"]
    budget = v["vanilla"]["train_flops"]
    for name, r in v.items():
        assert abs(r["train_flops"] / budget - 1) < 0.05, name  # iso-FLOP within one step's worth
        assert r["val_nll"] < 6.5 and len(r["curve"]) >= 2
    # cheaper variants see more tokens in the same budget
    assert v["mor_expert_nr3"]["tokens"] > v["mor_expert_nr2"]["tokens"] > v["vanilla"]["tokens"]
    assert v["recursive_nr3"]["params"] < v["recursive_nr2"]["params"] < v["vanilla"]["params"]
    for name in ("mor_expert_nr2", "mor_expert_nr3"):
        assert 0.0 <= v[name]["router_sampling_accuracy"] <= 1.0
        assert "val_nll_threshold" in v[name]
        kv = v[name]["kv_cache"]
        assert kv["share"]["fraction_of_recursion_blocks"] == pytest.approx(1 / v[name]["recursion"]["n_recursions"])
        assert kv["share"]["fraction_of_recursion_blocks"] < kv["recursion"]["fraction_of_recursion_blocks"] <= 1.0
    assert "mor/max_violation" in v["mor_token_nr3"] and "mor/assignment_entropy" in v["mor_token_nr3"]
    assert {c["claim"] for c in report["claims"]} >= {"NLL(MoR expert-choice, N_r=2) < NLL(recursive, N_r=2)"}
    # a second call keeps finished variants instead of retraining them
    assert run.main(["--mode", "quick", "--out", str(tmp_path), "--variants", "vanilla"]) == 0
