"""MoR routing maths (jaxeff/ops/routing.py) against numpy references, hand examples and jit."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.ops import routing
from jaxeff.ops.routing import default_capacities, tokens_for_capacity, validate_capacities, warmup_capacity

# Every array function is tested through jax.jit (shape-static arguments static): that is how the
# model calls them, and one compiled program per shape is several times faster on CPU than eager
# op-by-op dispatch. test_eager_matches_jit checks the plain calls agree.
assignment_entropy = jax.jit(routing.assignment_entropy)
balancing_loss = jax.jit(routing.balancing_loss)
dead_token_ratio = jax.jit(routing.dead_token_ratio)
depth_load = jax.jit(routing.depth_load, static_argnames="n_depths")
expert_choice_topk = jax.jit(routing.expert_choice_topk, static_argnames="k")
gather_rows = jax.jit(routing.gather_rows)
loss_free_bias_update = jax.jit(routing.loss_free_bias_update)
max_violation = jax.jit(routing.max_violation)
router_gate = jax.jit(routing.router_gate, static_argnames=("func", "alpha", "axis"))
router_z_loss = jax.jit(routing.router_z_loss, static_argnames="axis")
sampling_accuracy = jax.jit(routing.sampling_accuracy, static_argnames="func")
scatter_add_rows = jax.jit(routing.scatter_add_rows)
threshold_decision = jax.jit(routing.threshold_decision, static_argnames="func")
token_choice_route = jax.jit(routing.token_choice_route)
topk_bce_loss = jax.jit(routing.topk_bce_loss)

# (seed, B, N): N = 1 and B = 1 included; each case also picks k in {1, random, N}.
SHAPES = [(0, 1, 1), (1, 2, 5), (2, 3, 8), (3, 1, 13), (4, 4, 2)]


def _ks(n, rng):
    return sorted({1, int(rng.integers(1, n + 1)), n})


# --- numpy references (written independently of the library) --------------------------------------

def _np_softplus(x):
    return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


def _np_bce(logits, targets, valid):
    x = logits.astype(np.float64)
    y = targets.astype(np.float64)
    # -[y log sigmoid(x) + (1-y) log(1-sigmoid(x))], with log sigmoid(x) = -softplus(-x).
    loss = y * _np_softplus(-x) + (1.0 - y) * _np_softplus(x)
    w = np.ones_like(x) if valid is None else valid.astype(np.float64)
    return (loss * w).sum() / w.sum() if w.sum() > 0 else 0.0


def _np_topk_set(row, k):
    return set(np.argsort(-row, kind="stable")[:k].tolist())


# --- capacities -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n, expected", [(1, (1.0,)), (2, (1.0, 0.5)), (3, (1.0, 2 / 3, 1 / 3)),
                                         (4, (1.0, 0.75, 0.5, 0.25))])
def test_default_capacities(n, expected):
    caps = default_capacities(n)
    assert isinstance(caps, tuple) and len(caps) == n
    np.testing.assert_allclose(caps, expected, rtol=0, atol=1e-15)
    assert validate_capacities(caps, n) == caps


def test_default_capacities_rejects_zero():
    with pytest.raises(ValueError, match="n_recursions"):
        default_capacities(0)


def test_validate_capacities_returns_floats():
    out = validate_capacities([1, 0.5, 0.5], 3)
    assert out == (1.0, 0.5, 0.5) and all(type(c) is float for c in out)
    assert validate_capacities(np.array([0.9, 0.2]), 2) == pytest.approx((0.9, 0.2))


@pytest.mark.parametrize("caps, n, match", [
    ((1.0, 0.5), 3, r"^mor_caps .*expected 3, got 2"),
    ((1.0, 0.5, 0.2, 0.1), 3, r"^mor_caps .*expected 3, got 4"),
    ((1.0, 0.0), 2, r"^mor_caps must lie in \(0, 1\]"),
    ((1.5, 0.5), 2, r"^mor_caps must lie in \(0, 1\]"),
    ((1.0, -0.3), 2, r"^mor_caps must lie in \(0, 1\]"),
    ((1.0, float("nan")), 2, r"^mor_caps must lie in \(0, 1\]"),
    ((0.5, 1.0), 2, r"^mor_caps must be descending \(non-increasing\)"),
    ((1.0, 0.3, 0.6), 3, r"^mor_caps must be descending \(non-increasing\)"),
])
def test_validate_capacities_errors(caps, n, match):
    with pytest.raises(ValueError, match=match):
        validate_capacities(caps, n, name="mor_caps")


def test_validate_capacities_default_name():
    with pytest.raises(ValueError, match=r"^capacities "):
        validate_capacities((0.5, 1.0), 2)


def test_tokens_for_capacity():
    assert tokens_for_capacity(2 / 3, 3) == 2  # (2/3) * 3 is exactly 2.0 in floats
    assert tokens_for_capacity(0.7, 90) == 62  # the official int(c * T): 0.7 * 90 = 62.99999999999999
    assert tokens_for_capacity(0.29, 100) == 28
    assert tokens_for_capacity(1 / 3, 3) == 1
    assert tokens_for_capacity(1.0, 7) == 7
    assert tokens_for_capacity(0.5, 7) == 3  # floor
    assert tokens_for_capacity(1e-6, 100) == 1  # never zero tokens
    assert tokens_for_capacity(0.25, 1) == 1
    # the default schedule against exact integer arithmetic: floor((N_r - r + 1) * n / N_r)
    for n_r in (2, 3, 4):
        for n in (1, 2, 3, 6, 7, 12, 2048):
            for r, c in enumerate(default_capacities(n_r), start=1):
                k = tokens_for_capacity(c, n)
                assert type(k) is int and k == max(1, (n_r - r + 1) * n // n_r), (n_r, n, r)


def test_warmup_capacity_endpoints_and_shape():
    assert warmup_capacity(0.25, 0, 100) == pytest.approx(1.0)
    assert warmup_capacity(0.25, 50, 100) == pytest.approx(0.625)  # cos(pi/2) = 0: halfway
    assert warmup_capacity(0.25, 100, 100) == pytest.approx(0.25)
    assert warmup_capacity(0.25, 1000, 100) == pytest.approx(0.25)
    assert warmup_capacity(0.25, 7, 0) == 0.25
    vals = [warmup_capacity(1 / 3, s, 40) for s in range(41)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert isinstance(warmup_capacity(0.5, 3, 10), float)
    s = 13
    ref = 0.4 + 0.6 * 0.5 * (1 + math.cos(math.pi * s / 40))
    assert warmup_capacity(0.4, s, 40) == pytest.approx(ref)
    jitted = jax.jit(warmup_capacity, static_argnums=(0, 2))
    np.testing.assert_allclose(float(jitted(0.4, jnp.int32(s), 40)), ref, rtol=1e-6)
    np.testing.assert_allclose(float(jitted(0.4, jnp.int32(400), 40)), 0.4, rtol=1e-6)


# --- gates and decisions --------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_router_gate_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    b, n = rng.integers(1, 4), rng.integers(1, 9)
    x = (rng.normal(size=(b, n)) * 3).astype(np.float32)
    alpha = float(rng.uniform(0.05, 1.0))
    xd = x.astype(np.float64)
    sig = alpha / (1 + np.exp(-xd))
    e = np.exp(xd - xd.max(1, keepdims=True))
    soft = alpha * n * e / e.sum(1, keepdims=True)
    for func, ref in (("sigmoid", sig), ("tanh", alpha * np.tanh(xd)), ("softmax", soft)):
        out = router_gate(jnp.asarray(x), func, alpha)
        assert out.dtype == jnp.float32 and out.shape == x.shape
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(router_gate(jnp.asarray(x), "softmax", alpha)).mean(), alpha, rtol=1e-5)


def test_router_gate_softmax_axis_and_dtype():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 4)).astype(np.float32)
    out = router_gate(jnp.asarray(x, jnp.bfloat16), "softmax", 0.1, axis=0)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out).sum(0), 0.1 * 3 * np.ones(4), rtol=1e-5)


def test_bad_func_raises():
    with pytest.raises(ValueError, match="relu"):
        router_gate(jnp.zeros((1, 2)), "relu", 0.1)
    with pytest.raises(ValueError, match="relu"):
        threshold_decision(jnp.zeros((1, 2)), "relu")


def test_threshold_decision_agrees_with_gate():
    x = jnp.asarray([[-2.0, -1e-3, 0.0, 1e-3, 3.0]])
    expected = np.array([[False, False, True, True, True]])
    for func in ("sigmoid", "tanh", "softmax"):
        out = threshold_decision(x, func)
        assert out.dtype == jnp.bool_
        np.testing.assert_array_equal(np.asarray(out), expected)
    np.testing.assert_array_equal(np.asarray(router_gate(x, "sigmoid", 1.0) >= 0.5), expected)
    np.testing.assert_array_equal(np.asarray(router_gate(x, "tanh", 1.0) >= 0.0), expected)


# --- expert-choice top-k, gather, scatter ---------------------------------------------------------

@pytest.mark.parametrize("seed, b, n", SHAPES)
def test_expert_choice_topk_matches_numpy(seed, b, n):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, n)).astype(np.float32)  # continuous: no ties
    for k in _ks(n, rng):
        idx, mask = expert_choice_topk(jnp.asarray(logits), k)
        idx, mask = np.asarray(idx), np.asarray(mask)
        assert idx.shape == (b, k) and idx.dtype == np.int32
        assert mask.shape == (b, n) and mask.dtype == np.bool_
        for row in range(b):
            assert np.all(np.diff(idx[row]) > 0)  # strictly ascending, hence distinct
            assert set(idx[row].tolist()) == _np_topk_set(logits[row], k)
            assert set(np.flatnonzero(mask[row]).tolist()) == set(idx[row].tolist())


def test_expert_choice_topk_bf16_and_bad_k():
    x = jnp.asarray([[0.5, 3.0, -1.0, 2.0]], jnp.bfloat16)
    idx, mask = expert_choice_topk(x, 2)
    np.testing.assert_array_equal(np.asarray(idx), [[1, 3]])
    np.testing.assert_array_equal(np.asarray(mask), [[False, True, False, True]])
    for k in (0, 5, -1):
        with pytest.raises(ValueError, match="k"):
            expert_choice_topk(x, k)


def test_expert_choice_topk_ties_deterministic():
    x = jnp.zeros((2, 6))
    a = expert_choice_topk(x, 3)
    b = expert_choice_topk(x, 3)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert np.asarray(a[1]).sum() == 6


@pytest.mark.parametrize("seed, b, n", SHAPES)
def test_gather_rows_matches_loops(seed, b, n):
    rng = np.random.default_rng(seed + 100)
    d, h = int(rng.integers(1, 5)), int(rng.integers(1, 3))
    x3 = rng.normal(size=(b, n, d)).astype(np.float32)
    x2 = rng.integers(0, 1000, size=(b, n)).astype(np.int32)
    x4 = rng.normal(size=(b, n, h, d)).astype(np.float32)
    for k in _ks(n, rng):
        idx = np.stack([np.sort(rng.choice(n, size=k, replace=False)) for _ in range(b)]).astype(np.int32)
        for x in (x3, x2, x4):
            out = np.asarray(gather_rows(jnp.asarray(x), jnp.asarray(idx)))
            ref = np.stack([np.stack([x[i, idx[i, j]] for j in range(k)]) for i in range(b)])
            assert out.dtype == x.dtype
            np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("seed, b, n", SHAPES)
def test_scatter_add_rows_matches_loops(seed, b, n):
    rng = np.random.default_rng(seed + 200)
    d = int(rng.integers(1, 6))
    h = rng.normal(size=(b, n, d)).astype(np.float32)
    for k in _ks(n, rng):
        # unsorted distinct indices: scatter must not rely on order
        idx = np.stack([rng.choice(n, size=k, replace=False) for _ in range(b)]).astype(np.int32)
        upd = rng.normal(size=(b, k, d)).astype(np.float32)
        ref = h.copy()
        for i in range(b):
            for j in range(k):
                ref[i, idx[i, j]] += upd[i, j]
        out = scatter_add_rows(jnp.asarray(h), jnp.asarray(idx), jnp.asarray(upd))
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-6, atol=1e-6)
    out = scatter_add_rows(jnp.asarray(h, jnp.bfloat16), jnp.asarray(idx), jnp.asarray(upd))
    assert out.dtype == jnp.bfloat16


def test_gather_scatter_roundtrip_with_topk():
    rng = np.random.default_rng(7)
    h = jnp.asarray(rng.normal(size=(2, 9, 4)).astype(np.float32))
    idx, mask = expert_choice_topk(jnp.asarray(rng.normal(size=(2, 9)).astype(np.float32)), 4)
    sel = gather_rows(h, idx)
    out = scatter_add_rows(h, idx, sel)  # doubles chosen rows, leaves the rest
    expected = np.where(np.asarray(mask)[..., None], 2 * np.asarray(h), np.asarray(h))
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6)


# --- BCE, sampling accuracy, dead tokens ----------------------------------------------------------

def test_bce_hand_example():
    logits = jnp.asarray([[2.0, -1.0, 0.0]])
    sel = jnp.asarray([[True, True, False]])
    # -log sigmoid(2) - log sigmoid(-1) - log(1 - sigmoid(0)), by hand:
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(1.0)) + math.log(2.0)) / 3
    np.testing.assert_allclose(float(topk_bce_loss(logits, sel)), expected, rtol=1e-6)
    valid = jnp.asarray([[True, False, True]])
    expected_v = (math.log(1 + math.exp(-2.0)) + math.log(2.0)) / 2
    np.testing.assert_allclose(float(topk_bce_loss(logits, sel, valid)), expected_v, rtol=1e-6)
    assert float(topk_bce_loss(logits, sel, jnp.zeros((1, 3), bool))) == 0.0


@pytest.mark.parametrize("seed, b, n", SHAPES)
def test_bce_matches_numpy(seed, b, n):
    rng = np.random.default_rng(seed + 300)
    logits = (rng.normal(size=(b, n)) * 5).astype(np.float32)
    sel = rng.random((b, n)) < 0.4
    valid = rng.random((b, n)) < 0.7
    for v in (None, valid, np.zeros((b, n), bool)):
        out = topk_bce_loss(jnp.asarray(logits), jnp.asarray(sel), None if v is None else jnp.asarray(v))
        assert out.shape == () and out.dtype == jnp.float32
        np.testing.assert_allclose(float(out), _np_bce(logits, sel, v), rtol=1e-5, atol=1e-6)


def test_bce_stable_and_ignores_invalid_garbage():
    logits = jnp.asarray([[200.0, -200.0, jnp.nan]])
    sel = jnp.asarray([[True, False, True]])
    valid = jnp.asarray([[True, True, False]])
    out = topk_bce_loss(logits, sel, valid)
    assert np.isfinite(float(out)) and float(out) < 1e-30
    g = jax.grad(lambda x: topk_bce_loss(x, sel, valid))(logits)
    assert np.all(np.isfinite(np.asarray(g)))
    # gradient of the mean BCE is (sigmoid(x) - y) / count
    x = jnp.asarray([[0.3, -1.2]])
    g = jax.grad(lambda z: topk_bce_loss(z, jnp.asarray([[True, False]])))(x)
    np.testing.assert_allclose(np.asarray(g), (np.asarray(jax.nn.sigmoid(x)) - [[1, 0]]) / 2, rtol=1e-5)


@pytest.mark.parametrize("seed, b, n", SHAPES)
def test_sampling_accuracy_matches_numpy(seed, b, n):
    rng = np.random.default_rng(seed + 400)
    logits = rng.normal(size=(b, n)).astype(np.float32)
    sel = rng.random((b, n)) < 0.5
    valid = rng.random((b, n)) < 0.6
    agree = (logits >= 0) == sel
    for func in ("sigmoid", "tanh", "softmax"):
        out = sampling_accuracy(jnp.asarray(logits), jnp.asarray(sel), func)
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(float(out), agree.mean(), rtol=1e-6)
        out = sampling_accuracy(jnp.asarray(logits), jnp.asarray(sel), func, jnp.asarray(valid))
        ref = agree[valid].mean() if valid.any() else 0.0
        np.testing.assert_allclose(float(out), ref, rtol=1e-6)


def test_sampling_accuracy_hand_example():
    logits = jnp.asarray([[1.0, -1.0, 0.5, -0.5]])
    sel = jnp.asarray([[True, False, False, False]])
    assert float(sampling_accuracy(logits, sel, "sigmoid")) == pytest.approx(0.75)


def test_dead_token_ratio_hand_example():
    sel = np.array([[1, 0, 0, 1, 0],
                    [0, 0, 1, 1, 0],
                    [1, 0, 0, 0, 0]], bool)
    # positions 1 and 4 selected by no row: 2 of 5
    assert float(dead_token_ratio(jnp.asarray(sel))) == pytest.approx(2 / 5)
    valid = np.array([[1, 1, 1, 1, 0],
                      [1, 1, 0, 1, 0],
                      [0, 1, 1, 1, 0]], bool)
    # position 4 is padding everywhere -> not counted; position 2 is selected only where invalid
    # (row 1) -> dead; position 0 is live via row 0. Dead: {1, 2} of {0, 1, 2, 3}.
    assert float(dead_token_ratio(jnp.asarray(sel), jnp.asarray(valid))) == pytest.approx(2 / 4)
    assert float(dead_token_ratio(jnp.asarray(sel), jnp.zeros_like(jnp.asarray(valid)))) == 0.0
    assert float(dead_token_ratio(jnp.ones((2, 3), bool))) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dead_token_ratio_matches_numpy(seed):
    rng = np.random.default_rng(seed + 500)
    b, t = int(rng.integers(1, 5)), int(rng.integers(1, 12))
    sel = rng.random((b, t)) < 0.3
    valid = rng.random((b, t)) < 0.8
    present = valid.any(0)
    dead = sum(1 for j in range(t) if present[j] and not any(sel[i, j] and valid[i, j] for i in range(b)))
    ref = dead / present.sum() if present.any() else 0.0
    np.testing.assert_allclose(float(dead_token_ratio(jnp.asarray(sel), jnp.asarray(valid))), ref, rtol=1e-6)


# --- token-choice ---------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_choice_route_matches_numpy(seed):
    rng = np.random.default_rng(seed + 600)
    b, t, r = int(rng.integers(1, 4)), int(rng.integers(1, 9)), int(rng.integers(1, 5))
    logits = (rng.normal(size=(b, t, r)) * 2).astype(np.float32)
    depth, gate, probs = token_choice_route(jnp.asarray(logits))
    e = np.exp(logits - logits.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    choice = logits.argmax(-1)
    assert depth.dtype == jnp.int32 and gate.dtype == jnp.float32 and probs.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(depth), choice + 1)
    np.testing.assert_allclose(np.asarray(probs), p, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(gate), np.take_along_axis(p, choice[..., None], -1)[..., 0], rtol=1e-5)
    assert np.asarray(depth).min() >= 1 and np.asarray(depth).max() <= r


def test_token_choice_bias_changes_choice_not_gate():
    logits = jnp.asarray([[[2.0, 1.0, 0.0], [0.0, 0.5, 3.0]]])
    depth, gate, probs = token_choice_route(logits)
    np.testing.assert_array_equal(np.asarray(depth), [[1, 3]])
    bias = jnp.asarray([0.0, 1.5, 0.0])
    depth_b, gate_b, probs_b = token_choice_route(logits, bias)
    np.testing.assert_array_equal(np.asarray(depth_b), [[2, 3]])  # token 0 flips 1 -> 2
    np.testing.assert_allclose(np.asarray(probs_b), np.asarray(probs))
    p = np.asarray(probs)
    # the gate is the unbiased probability of the (biased) choice
    np.testing.assert_allclose(np.asarray(gate_b), [[p[0, 0, 1], p[0, 1, 2]]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gate), [[p[0, 0, 0], p[0, 1, 2]]], rtol=1e-6)


def test_depth_load_and_balancing_hand_example():
    # 4 tokens, 2 depths: tokens 0, 1, 2 go to depth 1, token 3 to depth 2.
    probs = jnp.asarray([[[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]]])
    depth = jnp.asarray([[1, 1, 1, 2]])
    np.testing.assert_allclose(np.asarray(depth_load(depth, 2)), [0.75, 0.25])
    # f = (3/4, 1/4), P = (2.4/4, 1.6/4) = (0.6, 0.4): 2 * (0.45 + 0.1) = 1.1
    np.testing.assert_allclose(float(balancing_loss(probs, depth)), 1.1, rtol=1e-6)
    valid = jnp.asarray([[True, False, True, True]])
    # f = (2/3, 1/3), P = (1.8/3, 1.2/3) = (0.6, 0.4): 2 * (0.4 + 0.4/3) = 16/15
    np.testing.assert_allclose(np.asarray(depth_load(depth, 2, valid)), [2 / 3, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(float(balancing_loss(probs, depth, valid)), 16 / 15, rtol=1e-6)
    none = jnp.zeros((1, 4), bool)
    assert float(balancing_loss(probs, depth, none)) == 0.0
    np.testing.assert_array_equal(np.asarray(depth_load(depth, 2, none)), [0.0, 0.0])


@pytest.mark.parametrize("r", [1, 2, 3, 4])
def test_balancing_loss_uniform_is_one(r):
    t = 4 * r
    probs = jnp.full((2, t, r), 1.0 / r)
    depth = jnp.tile(jnp.arange(1, r + 1), (2, 4))
    np.testing.assert_allclose(float(balancing_loss(probs, depth)), 1.0, rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balancing_loss_and_load_match_numpy(seed):
    rng = np.random.default_rng(seed + 700)
    b, t, r = int(rng.integers(1, 4)), int(rng.integers(1, 10)), int(rng.integers(1, 5))
    logits = rng.normal(size=(b, t, r)).astype(np.float32)
    valid = rng.random((b, t)) < 0.7
    depth, _, probs = token_choice_route(jnp.asarray(logits))
    d, p = np.asarray(depth), np.asarray(probs).astype(np.float64)
    n = max(valid.sum(), 1)
    f = np.array([((d == i + 1) & valid).sum() / n for i in range(r)])
    pm = np.array([(p[..., i] * valid).sum() / n for i in range(r)])
    np.testing.assert_allclose(np.asarray(depth_load(depth, r, jnp.asarray(valid))), f, rtol=1e-6)
    np.testing.assert_allclose(float(balancing_loss(probs, depth, jnp.asarray(valid))), r * (f * pm).sum(),
                               rtol=1e-5, atol=1e-7)
    # the gradient flows through the probabilities: d/dP_i = R * f_i / n per valid token
    g = jax.grad(lambda q: balancing_loss(q, depth, jnp.asarray(valid)))(probs)
    np.testing.assert_allclose(np.asarray(g), r * f[None, None, :] * valid[..., None] / n, rtol=1e-5, atol=1e-7)


def test_loss_free_bias_update_signs():
    bias = jnp.zeros(3, jnp.bfloat16)
    load = jnp.asarray([0.5, 1 / 3, 1 / 6])  # mean 1/3
    delta = loss_free_bias_update(bias, load, 0.01)
    assert delta.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(delta.astype(jnp.float32)), [-0.01, 0.0, 0.01], rtol=1e-2)
    delta = loss_free_bias_update(jnp.ones(4), jnp.asarray([0.1, 0.4, 0.3, 0.2]), 1e-3)
    np.testing.assert_allclose(np.asarray(delta), [1e-3, -1e-3, -1e-3, 1e-3])
    np.testing.assert_array_equal(np.asarray(loss_free_bias_update(jnp.zeros(2), jnp.full(2, 0.5), 1.0)), [0, 0])


def test_router_z_loss():
    x = np.array([[1.0, -2.0, 3.0]], np.float32)
    np.testing.assert_allclose(float(router_z_loss(jnp.asarray(x))), (1 + 4 + 9) / 3, rtol=1e-6)
    rng = np.random.default_rng(8)
    y = rng.normal(size=(2, 5, 3)).astype(np.float64) * 2
    lse = np.log(np.exp(y).sum(-1))
    np.testing.assert_allclose(float(router_z_loss(jnp.asarray(y, jnp.float32), axis=-1)), (lse ** 2).mean(),
                               rtol=1e-5)
    np.testing.assert_allclose(float(router_z_loss(jnp.asarray(y, jnp.float32), -1)), (lse ** 2).mean(), rtol=1e-5)
    # hand: logsumexp([0, 0]) = log 2
    np.testing.assert_allclose(float(router_z_loss(jnp.zeros((1, 2)), axis=-1)), math.log(2) ** 2, rtol=1e-6)
    assert router_z_loss(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.float32


def test_max_violation_and_entropy_hand_values():
    np.testing.assert_allclose(float(max_violation(jnp.asarray([0.5, 0.25, 0.25]))), (0.5 - 1 / 3) * 3, rtol=1e-6)
    assert float(max_violation(jnp.full(4, 0.25))) == pytest.approx(0.0, abs=1e-7)
    np.testing.assert_allclose(float(max_violation(jnp.asarray([1.0, 0.0]))), 1.0, rtol=1e-6)
    assert float(max_violation(jnp.zeros(3))) == 0.0
    np.testing.assert_allclose(float(assignment_entropy(jnp.full(4, 0.25))), math.log(4), rtol=1e-6)
    np.testing.assert_allclose(float(assignment_entropy(jnp.asarray([0.5, 0.5, 0.0]))), math.log(2), rtol=1e-6)
    assert float(assignment_entropy(jnp.asarray([1.0, 0.0, 0.0]))) == 0.0
    p = np.array([0.5, 0.3, 0.2])
    np.testing.assert_allclose(float(assignment_entropy(jnp.asarray(p))), -(p * np.log(p)).sum(), rtol=1e-6)


# --- eager == jit ----------------------------------------------------------------------------------

def _ec_pipeline(r, logits, h, valid):
    """One expert-choice recursion step as the model composes it, from module ``r``'s functions."""
    idx, mask = r.expert_choice_topk(logits, tokens_for_capacity(2 / 3, logits.shape[1]))
    g = r.router_gate(logits, "sigmoid", 0.1)
    out = r.scatter_add_rows(h, idx, r.gather_rows(h, idx) * r.gather_rows(g, idx)[..., None])
    return (idx, mask, out, r.topk_bce_loss(logits, mask, valid), r.sampling_accuracy(logits, mask, "sigmoid", valid),
            r.dead_token_ratio(mask, valid), r.router_z_loss(logits), r.threshold_decision(logits, "tanh"),
            r.router_gate(logits, "softmax", 0.1))


def _tc_pipeline(r, logits, bias, valid):
    depth, gate, probs = r.token_choice_route(logits, bias)
    load = r.depth_load(depth, 3, valid)
    return (depth, gate, probs, load, r.balancing_loss(probs, depth, valid), r.loss_free_bias_update(bias, load, 1e-3),
            r.router_z_loss(logits, axis=-1), r.max_violation(load), r.assignment_entropy(load))


def test_eager_matches_jit():
    rng = np.random.default_rng(9)
    logits = jnp.asarray(rng.normal(size=(2, 6)).astype(np.float32))
    h = jnp.asarray(rng.normal(size=(2, 6, 3)).astype(np.float32))
    valid = jnp.asarray(rng.random((2, 6)) < 0.8)
    tc_logits = jnp.asarray(rng.normal(size=(2, 6, 3)).astype(np.float32))
    bias = jnp.asarray([0.0, 0.2, -0.1])
    eager = (_ec_pipeline(routing, logits, h, valid), _tc_pipeline(routing, tc_logits, bias, valid))
    jitted = (jax.jit(lambda *a: _ec_pipeline(routing, *a))(logits, h, valid),
              jax.jit(lambda *a: _tc_pipeline(routing, *a))(tc_logits, bias, valid))
    for e, j in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        assert e.dtype == j.dtype and e.shape == j.shape
        assert np.all(np.isfinite(np.asarray(e, np.float32)))
        np.testing.assert_allclose(np.asarray(e, np.float32), np.asarray(j, np.float32), rtol=1e-6, atol=1e-7)


def test_all_is_complete():
    public = {n for n in dir(routing) if not n.startswith("_") and callable(getattr(routing, n))
              and getattr(getattr(routing, n), "__module__", None) == routing.__name__}
    assert public == set(routing.__all__)
