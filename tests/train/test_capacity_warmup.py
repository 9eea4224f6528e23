"""The MoR capacity warm-up in train(): capacities move from 1.0 to the targets in phases, one
compiled step per phase, resume picks the phase of the global step, and warm-up off is unchanged."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxeff.ops.routing import tokens_for_capacity
from jaxeff.train import loop as loop_module
from jaxeff.train import train
from jaxeff.models import abstract_model
from jaxeff.train.loop import capacities_at

# 2 layers shared as one block run twice, expert-choice 1.0 then 0.5 of the 32 tokens; the capacity
# warm-up takes 8 steps in 4 phases. A constant lr after 2 warm-up steps makes a 5-step run follow
# the schedule of the first 5 steps of a 12-step one.
MOR = ("model.n_layers=2", "recursion.strategy=cycle", "recursion.n_recursions=2", "recursion.routing=expert",
       "recursion.capacities=1,0.5", "train.warmup_steps=2", "train.schedule=constant")
WARMUP = ("recursion.capacity_warmup_steps=8", "recursion.capacity_warmup_phases=4")
STEPS = 12


def read_records(run_dir) -> dict[int, dict]:
    """Training records (those with a loss) per step; a step logged twice keeps its last record."""
    recs = {}
    for line in Path(run_dir, "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            recs[rec["step"]] = rec
    return recs


def _record_builds(monkeypatch) -> list:
    """The graphdefs of the train steps train() builds from now on (each is jitted and compiled once)."""
    built = []
    real = loop_module.make_train_step
    monkeypatch.setattr(loop_module, "make_train_step", lambda gd, *a, **k: built.append(gd) or real(gd, *a, **k))
    return built


@pytest.fixture
def count_step_fns(monkeypatch):
    return _record_builds(monkeypatch)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, run_config):
    """An uninterrupted 12-step warm-up run, with the train steps it built."""
    run_dir = tmp_path_factory.mktemp("warmup") / "run"
    cfg = run_config(run_dir, *MOR, *WARMUP, f"train.steps={STEPS}")
    with pytest.MonkeyPatch.context() as mp:
        built = _record_builds(mp)
        summary = train(cfg, verbose=False)
    return {"cfg": cfg, "summary": summary, "records": read_records(run_dir), "built": built}


def test_phases_follow_the_stepped_cosine(run_config, tmp_path):
    rcfg = run_config(tmp_path, *MOR, *WARMUP).recursion
    # phase p = min(4, floor(s * 4 / 8)) = s // 2; its capacity is the cosine's at step 2p
    expected = [1.0, 0.5 + 0.25 * (1 + np.cos(np.pi / 4)), 0.75, 0.5 + 0.25 * (1 - np.cos(np.pi / 4)), 0.5]
    for s in range(STEPS):
        caps = capacities_at(rcfg, s)
        assert caps[0] == 1.0 and caps[1] == pytest.approx(expected[min(4, s // 2)], abs=1e-12), s
    assert capacities_at(rcfg, 8) == capacities_at(rcfg, 10 ** 6) == rcfg.resolved_capacities
    off = run_config(tmp_path, *MOR).recursion
    assert all(capacities_at(off, s) == off.resolved_capacities for s in (0, 3, 100))


@pytest.mark.slow
def test_warmup_selects_fewer_tokens_phase_by_phase(reference):
    recs, rcfg, t = reference["records"], reference["cfg"].recursion, reference["cfg"].train.seq_len
    assert sorted(recs) == list(range(1, STEPS + 1))
    caps = [capacities_at(rcfg, s) for s in range(STEPS)]  # record n logs global step n - 1
    assert [recs[s + 1]["mor/capacity_r2"] for s in range(STEPS)] == [c[1] for c in caps]
    assert all(recs[s]["mor/capacity_r1"] == 1.0 for s in recs)
    frac = [recs[s + 1]["mor/selected_frac_r2"] for s in range(STEPS)]
    # the packed batches have no padding, so the model keeps exactly k = max(1, int(c * T)) tokens
    assert frac == pytest.approx([tokens_for_capacity(c[1], t) / t for c in caps], abs=1e-6)
    assert frac[:8] == pytest.approx([1.0, 1.0, 29 / 32, 29 / 32, 0.75, 0.75, 18 / 32, 18 / 32], abs=1e-6)
    assert frac[8:] == pytest.approx([0.5] * (STEPS - 8), abs=1e-6)  # the targets from global step 8 on
    assert all(np.isfinite([recs[s]["loss"] for s in recs]))


def test_one_compiled_step_per_phase_and_target_graphdef(reference):
    built, summary = reference["built"], reference["summary"]
    assert len(built) == 5  # phases 0..4 (4 = targets)
    assert len({id(g) for g in built}) == 5
    target, _ = abstract_model(reference["cfg"])
    assert summary["graphdef"] == target
    assert built[-1] is summary["graphdef"]  # the last phase reuses the model's own graphdef
    assert np.isfinite(summary["val_loss"])


@pytest.mark.slow
def test_resume_mid_warmup_reproduces_the_run(run_config, tmp_path, reference, count_step_fns):
    run_dir = tmp_path / "run"
    first = train(run_config(run_dir, *MOR, *WARMUP, "train.steps=5"), verbose=False)
    assert first["start_step"] == 0 and len(count_step_fns) == 3  # phases 0, 1, 2
    second = train(run_config(run_dir, *MOR, *WARMUP, f"train.steps={STEPS}"), verbose=False)
    assert second["start_step"] == 5
    assert len(count_step_fns) == 3 + 3  # resumed in phase 2 (global step 5), then phases 3 and 4
    recs = read_records(run_dir)
    ref = reference["records"]
    assert sorted(recs) == sorted(ref)
    for s in recs:
        assert recs[s]["loss"] == pytest.approx(ref[s]["loss"], abs=1e-6), s
        assert recs[s]["mor/selected_frac_r2"] == ref[s]["mor/selected_frac_r2"], s
    for a, b in zip(jax.tree.leaves(second["final_params"]), jax.tree.leaves(reference["summary"]["final_params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_warmup_off_builds_one_step(train_cfg, count_step_fns):
    cfg = train_cfg(*MOR, "train.steps=3")
    summary = train(cfg, verbose=False)
    assert len(count_step_fns) == 1 and count_step_fns[0] is summary["graphdef"]
    recs = read_records(cfg.run_dir)
    assert all("mor/capacity_r2" not in r for r in recs.values())
    assert all(r["mor/selected_frac_r2"] == pytest.approx(0.5, abs=1e-6) for r in recs.values())
