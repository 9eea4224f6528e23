"""Learning-rate schedules and the weight-decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff import ModelConfig, Transformer
from jaxeff.config import TrainConfig
from jaxeff.train import learning_rate_schedule, make_optimizer, weight_decay_mask


def _lr(cfg, step):
    return float(learning_rate_schedule(cfg)(step))


def test_warmup_is_linear_then_cosine_to_min_lr():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=2.0, min_lr_ratio=0.1, schedule="cosine")
    for s in range(11):
        assert _lr(cfg, s) == pytest.approx(2.0 * s / 10, abs=1e-6)
    # cosine over the remaining 90 steps: floor + (peak - floor) * (1 + cos(pi * t / 90)) / 2
    for s in (10, 25, 55, 80, 99, 100):
        t = s - 10
        expected = 0.2 + (2.0 - 0.2) * 0.5 * (1 + np.cos(np.pi * t / 90))
        assert _lr(cfg, s) == pytest.approx(expected, rel=1e-5)
    assert _lr(cfg, 100) == pytest.approx(0.2, rel=1e-6)  # min_lr_ratio * lr at the end
    assert _lr(cfg, 150) == pytest.approx(0.2, rel=1e-6)  # and stays there
    values = [_lr(cfg, s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_wsd_is_stable_then_linear_decay():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1, schedule="wsd", wsd_decay_fraction=0.2)
    assert _lr(cfg, 5) == pytest.approx(0.5)
    for s in (10, 30, 60, 80):  # stable from the end of warm-up until the last 20 steps
        assert _lr(cfg, s) == pytest.approx(1.0)
    assert _lr(cfg, 90) == pytest.approx(0.55, rel=1e-6)  # halfway through the decay
    assert _lr(cfg, 100) == pytest.approx(0.1, rel=1e-6)
    assert _lr(cfg, 85) == pytest.approx(1.0 - 0.9 * 5 / 20, rel=1e-6)


def test_constant_and_no_warmup():
    cfg = TrainConfig(steps=50, warmup_steps=4, lr=0.5, schedule="constant")
    assert [_lr(cfg, s) for s in (0, 2, 4, 20, 50)] == pytest.approx([0.0, 0.25, 0.5, 0.5, 0.5])
    cfg = TrainConfig(steps=50, warmup_steps=0, lr=0.5, min_lr_ratio=0.0, schedule="cosine")
    assert _lr(cfg, 0) == pytest.approx(0.5)
    assert _lr(cfg, 25) == pytest.approx(0.25, rel=1e-5)
    assert _lr(cfg, 50) == pytest.approx(0.0, abs=1e-7)


def _params(tie=False):
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=16,
                      tie_embeddings=tie)
    return nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0))))


def test_weight_decay_mask_defaults():
    mask = weight_decay_mask(_params(), TrainConfig())
    assert mask["embed"]["table"] is False
    assert mask["final_norm"]["scale"] is False
    for i in (0, 1):
        blk = mask["blocks"][i]
        assert blk["attn_norm"]["scale"] is False and blk["mlp_norm"]["scale"] is False
        assert all(blk["attn"][w] is True for w in ("wq", "wk", "wv", "wo"))
        assert all(blk["mlp"][w] is True for w in ("w_gate", "w_up", "w_down"))
    assert mask["lm_head"]["w"] is True  # an untied output projection is a matrix like any other


def test_weight_decay_mask_switches():
    mask = weight_decay_mask(_params(tie=True), TrainConfig(decay_embeddings=True, decay_norms=True))
    assert all(jax.tree.leaves(mask))
    assert "lm_head" not in mask or not mask["lm_head"]


def test_optimizer_decays_exactly_the_masked_parameters():
    """With zero gradients AdamW's update is pure weight decay: p <- p * (1 - lr * wd)."""
    params = _params()
    cfg = TrainConfig(steps=10, warmup_steps=0, lr=0.1, weight_decay=0.5, schedule="constant")
    tx = make_optimizer(cfg, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = jax.tree.map(lambda p, u: p + u, params, updates)
    mask = weight_decay_mask(params, cfg)

    def check(p, n, m):
        np.testing.assert_allclose(np.asarray(n), np.asarray(p) * (0.95 if m else 1.0), rtol=1e-6)
    jax.tree.map(check, params, new, mask)


def test_optimizer_clips_gradients_by_global_norm():
    """A gradient of global norm 2000 then one of norm 1: clipped to norm 1, both steps see the same
    gradient and Adam's second step is -lr * sign(g); unclipped, the first one dominates Adam's
    second moment and the second step is far smaller."""
    params = {"a": jnp.ones((2, 2)), "b": jnp.ones((4,))}
    g_big = {"a": jnp.full((2, 2), 2000.0 / np.sqrt(8)), "b": jnp.full((4,), 2000.0 / np.sqrt(8))}
    g_one = jax.tree.map(lambda x: x / 2000.0, g_big)

    def second_update(clip_norm):
        cfg = TrainConfig(steps=10, warmup_steps=0, lr=0.1, weight_decay=0.0, schedule="constant",
                          clip_norm=clip_norm, b1=0.0)  # no momentum: the step is m / sqrt(v)
        tx = make_optimizer(cfg, params)
        st = tx.init(params)
        _, st = tx.update(g_big, st, params)
        up, _ = tx.update(g_one, st, params)
        return np.concatenate([np.ravel(x) for x in jax.tree.leaves(up)])

    np.testing.assert_allclose(second_update(1.0), -0.1, rtol=1e-4)
    assert np.all(np.abs(second_update(0.0)) < 0.01)
