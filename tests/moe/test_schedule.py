"""The adaptive coefficients: BlockFFN's lambda_cs over a scripted loss history (the paper's
settings: hold 1000 steps, 100-step windows, cap 4x) and ReMoE's lambda against plain-Python
transcriptions of their rules; the scheduler state lives in the train state and a run stopped
and resumed gives the same coefficients, losses and parameters as one that ran through."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.config import ModelConfig, MoEConfig
from jaxeff.moe import schedule
from jaxeff.train import train


def reference_cs(losses, lam0=5e-2, hold=1000, window=100, cap=4.0, min_inc=1.025):
    """The coefficient each step uses: after every `window` steps (from step `hold` on) it is
    multiplied by gamma = mean(last window) / mean(window before), at least `min_inc` when
    gamma > 1, and capped at cap * lam0."""
    coef, out, win, prev = lam0, [], [], None
    for i, x in enumerate(losses, 1):
        out.append(coef)
        win.append(x)
        if i % window == 0:
            cur = float(np.mean(win))
            win = []
            if i >= hold and prev is not None:
                g = cur / prev
                coef = min(coef * (g if g <= 1 else max(min_inc, g)), cap * lam0)
            prev = cur
    return np.asarray(out)


def run_schedule(s, metric_values, name="moe/cs_loss"):
    def body(state, x):
        c = s.coef(state)
        return s.update(state, {name: x}), c
    _, coefs = jax.lax.scan(body, s.init(), jnp.asarray(metric_values, jnp.float32))
    return np.asarray(coefs)


def test_chunk_sparsity_coefficient_over_a_scripted_history():
    steps = np.arange(1, 2601)
    # falling for a while (the coefficient follows it down), then rising (up by >= 2.5%, up to the cap)
    losses = np.where(steps < 1500, 0.8 * 0.9995 ** steps, 0.8 * 0.9995 ** 1500 * 1.002 ** (steps - 1500))
    s = schedule.ChunkSparsityCoefficient()
    got = run_schedule(s, losses)
    want = reference_cs(losses)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert (got[:1000] == np.float32(5e-2)).all()  # held
    assert got[1000] < 5e-2  # the first move, after step 1000, follows the falling loss
    rises = got[1600::100] / got[1599:-1:100]
    assert (rises >= 1.025 - 1e-6).all() or got.max() == pytest.approx(0.2)
    assert got.max() <= 4 * 5e-2 + 1e-7


def test_chunk_sparsity_coefficient_small_windows_and_the_cap():
    losses = [1.0, 1.0, 2.0, 2.0, 8.0, 8.0, 0.5, 0.5, 1.0, 1.0]
    s = schedule.ChunkSparsityCoefficient(lambda0=1.0, hold=2, window=2, max_factor=3.0)
    np.testing.assert_allclose(run_schedule(s, losses), reference_cs(losses, 1.0, 2, 2, 3.0), rtol=1e-6)
    np.testing.assert_allclose(run_schedule(s, losses), [1, 1, 1, 1, 2, 2, 3, 3, 0.1875, 0.1875], rtol=1e-6)


def test_remoe_coefficient():
    s = schedule.ReMoECoefficient(lambda0=1e-8, alpha=1.2, target=0.75)
    coefs = run_schedule(s, [0.5, 0.6, 0.8, 0.9, 0.7], name="moe/remoe_sparsity")
    np.testing.assert_allclose(coefs, 1e-8 * np.array([1, 1.2, 1.44, 1.2, 1.0]), rtol=1e-6)


def test_loss_schedules_follow_the_config():
    def cfg(**moe):
        return ModelConfig(n_layers=2, moe=MoEConfig(**moe))
    assert schedule.loss_schedules(cfg()) == {}
    assert set(schedule.loss_schedules(cfg(kind="blockffn"))) == {"moe_cs"}
    assert schedule.loss_schedules(cfg(kind="blockffn", cs_adaptive=False)) == {}
    assert schedule.loss_schedules(cfg(kind="blockffn", cs_coef=0.0)) == {}
    assert set(schedule.loss_schedules(cfg(kind="remoe", top_k=1, n_experts=8))) == {"remoe_l1"}
    assert schedule.loss_schedules(cfg(kind="remoe", top_k=1, n_experts=8))["remoe_l1"].target == 0.875
    assert schedule.loss_schedules(cfg(kind="topk")) == {}
    assert schedule.loss_schedules(cfg(kind="blockffn", dense_layers=(0, 1))) == {}


MOE_RUN = ("moe.kind=blockffn", "moe.n_experts=4", "moe.expert_dim=16", "moe.cs_hold_steps=2", "moe.cs_window=2",
           "train.warmup_steps=1", "train.schedule=constant", "train.ckpt_every=3")


def _records(run_dir):
    recs = {}
    for line in Path(run_dir, "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            recs[r["step"]] = r
    return recs


@pytest.mark.slow
def test_scheduler_state_survives_checkpoint_and_resume(run_config, tmp_path):
    once = tmp_path / "once"
    full = train(run_config(once, *MOE_RUN, "train.steps=6"), verbose=False)
    split = tmp_path / "split"
    train(run_config(split, *MOE_RUN, "train.steps=3"), verbose=False)
    resumed = train(run_config(split, *MOE_RUN, "train.steps=6"), verbose=False)
    assert resumed["start_step"] == 3
    a, b = _records(once), _records(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    coefs = [a[s]["sched/moe_cs"] for s in range(1, 7)]
    # windows of 2 steps: the first comparison of two windows ends step 4, so step 5 uses the new
    # value, 5e-2 times the ratio of the windows' mean L_cs (at least 1.025 when it rises)
    np.testing.assert_allclose(coefs[:4], 5e-2, rtol=1e-6)
    cs = [a[s]["moe/cs_loss"] for s in range(1, 5)]
    gamma = (cs[2] + cs[3]) / (cs[0] + cs[1])
    assert gamma != 1.0
    assert coefs[4] == pytest.approx(5e-2 * (gamma if gamma <= 1 else max(1.025, gamma)), rel=1e-6)
    assert coefs[5] == coefs[4]
    for s in range(1, 7):
        assert b[s]["sched/moe_cs"] == pytest.approx(a[s]["sched/moe_cs"], abs=1e-9), s
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], abs=1e-6), s
    for x, y in zip(jax.tree.leaves(full["final_params"]), jax.tree.leaves(resumed["final_params"])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
