"""experiments/blockffn end to end in its quick mode, every variant (dense, top-k, ReMoE, BlockFFN
with each loss ablation), with the training shortened so that it fits the test budget: each
trains, is read for TLS / CLS_L / reuse / SRP / SCH, the claims are evaluated and the figure
written. The committed results_quick/ come from the full quick mode (240 steps)."""

import json
import os

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


def test_steps_rescale_the_schedule():
    run = _load()
    full = run.variant_config("full", "blockffn", "/tmp/unused", [], steps=800)
    assert full.train.steps == 800 and full.train.warmup_steps == 40 and full.train.eval_every == 100
    assert full.model.moe.cs_hold_steps == 100 and full.model.moe.cs_window == 10  # 1000 and 100 at 8000 steps
    default = run.variant_config("full", "blockffn", "/tmp/unused", [])
    assert default.train.steps == 8000 and default.model.moe.cs_hold_steps == 1000
    # an explicit override wins over the rescaled value
    kept = run.variant_config("full", "blockffn", "/tmp/unused", ["moe.cs_hold_steps=7"], steps=800)
    assert kept.model.moe.cs_hold_steps == 7
    assert run.variant_config("full", "topk", "/tmp/unused", []).model.moe.expert_impl == "dense"
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        run.variant_config("full", "dense", "/tmp/unused", [], steps=0)


def test_update_merges_variants_and_reevaluates_claims(tmp_path):
    run = _load()
    path = str(tmp_path / "results.json")
    row = lambda loss, low: {"val_loss": loss, "tls": 0.8, "cls_8": 0.7,  # noqa: E731
                             "curves": {"val": [{"step": 1, "val_loss": loss + 1}, {"step": 2, "val_loss": low},
                                                {"step": 3, "val_loss": loss}]}}
    run._update(path, lambda r: {**r, "variants": {**r["variants"], "dense": row(5.0, 5.0)}})
    rep = run._update(path, lambda r: {**r, "variants": {**r["variants"], "blockffn": row(5.1, 4.9)}})
    assert set(json.load(open(path))["variants"]) == {"dense", "blockffn"} == set(rep["variants"])
    claims = {c["claim"]: c["holds"] for c in rep["claims"]}
    assert claims["BlockFFN (AL+CS) reaches CLS_8 >= 0.6 (paper: 0.714)"] is True
    assert claims["val loss: BlockFFN (AL+CS) <= dense + 0.05 nats (paper: PPL 14.88 vs 14.90)"] is False
    # the curve's minimum (4.9 at step 2), not its final point, decides the best-val claim
    assert claims["best val loss (the curve's minimum): BlockFFN (AL+CS) <= dense + 0.05 nats"] is True
    assert run.best_val(rep["variants"]["blockffn"]) == {"step": 2, "val_loss": 4.9}


@pytest.mark.slow
def test_jobs_train_variants_concurrently(tmp_path):
    run = _load()
    args = ["--mode", "quick", "--out", str(tmp_path), "--variants", "dense,topk,blockffn", "--jobs", "2", *SHORT]
    assert run.main(args) == 0
    report = json.load(open(tmp_path / "results.json"))
    assert set(report["variants"]) == {"dense", "topk", "blockffn"}
    assert {r["concurrent_jobs"] for r in report["variants"].values()} == {2}
    assert sorted(os.listdir(tmp_path / "logs")) == ["job0_dense+blockffn.log", "job1_topk.log"]
    assert (tmp_path / "blockffn.png").stat().st_size > 10_000
    # the tokenizer was built once, before the jobs, and every variant read the same tokens
    assert (tmp_path / "runs" / "_tokenizer").is_dir()
