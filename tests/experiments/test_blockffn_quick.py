"""experiments/blockffn end to end in its quick mode, every variant (dense, top-k, ReMoE, BlockFFN
with each loss ablation), with the training shortened so that it fits the test budget: each
trains, is read for TLS / CLS_L / reuse / SRP / SCH, the claims are evaluated and the figure
written. The committed results_quick/ come from the full quick mode (240 steps)."""

import json

import pytest

from .loader import load_experiment

SHORT = ["--set", "train.steps=20", "--set", "train.eval_every=20", "--set", "train.log_every=5",
         "--set", "moe.cs_hold_steps=6", "--set", "moe.cs_window=3"]


def _load():
    return load_experiment("blockffn", "run.py", name="blockffn_run")


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path):
    run = _load()
    assert run.main(["--mode", "quick", "--out", str(tmp_path), "--fresh", *SHORT]) == 0
    report = json.load(open(tmp_path / "results.json"))
    assert set(report["variants"]) == set(run.VARIANTS) and report["device"]
    assert (tmp_path / "blockffn.png").stat().st_size > 10_000
    v = report["variants"]
    assert "tls" not in v["dense"] and v["dense"]["val_loss"] < 7.0
    params = {r["params"] for r in v.values()}
    assert max(params) / min(params) < 1.05  # matched total parameters
    moe = {k: r for k, r in v.items() if k != "dense"}
    assert len({r["flops_per_token"] for r in moe.values()}) == 1  # one active budget
    for name, r in moe.items():
        for key in ("tls", "cls_1", "cls_8", "cls_64", "reuse", "srp_8", "sch_8_rho2"):
            assert 0.0 <= r[key] <= 1.0, (name, key)
        assert 0.0 <= r["active_experts"] <= 16
        assert abs(r["cls_1"] - r["tls"]) < 1e-6
        assert r["cls_64"] <= r["cls_8"] + 1e-6 <= r["tls"] + 2e-6  # CLS falls with the chunk length
        assert r["curves"]["train"] and "moe/tls" in r["curves"]["train"][-1]
    assert abs(v["topk"]["tls"] - (1 - 3 / 16)) < 1e-6  # top-3 of 16: exactly 13/16 inactive
    assert "sched/moe_cs" in v["blockffn"]["curves"]["train"][-1]
    assert "sched/remoe_l1" in v["remoe"]["curves"]["train"][-1]
    assert {c["claim"] for c in report["claims"]} >= {"CLS_8: BlockFFN (AL+CS) > top-k (paper: 0.714 vs 0.492)"}
    # a second call keeps finished variants instead of retraining them
    assert run.main(["--mode", "quick", "--out", str(tmp_path), "--variants", "dense", *SHORT]) == 0
