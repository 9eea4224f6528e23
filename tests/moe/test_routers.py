"""Routers against numpy: BlockFFN's ReLU + RMSNorm with the per-expert gain, softmax top-k
(choice, renormalised gates, dense scatter) and ReMoE's ReLU."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.moe import routers


def test_blockffn_router_against_numpy():
    rng = np.random.default_rng(0)
    x, w, gain = rng.normal(size=(2, 5, 8)), rng.normal(size=(8, 6)), rng.random(6) + 0.5
    a0, a1, a = routers.blockffn_router(jnp.asarray(x), jnp.asarray(w), jnp.asarray(gain), eps=1e-6)
    want0 = x @ w
    want1 = np.maximum(want0, 0)
    want = want1 / np.sqrt(np.mean(want1 ** 2, -1, keepdims=True) + 1e-6) * gain
    for got, ref in ((a0, want0), (a1, want1), (a, want)):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(a) == 0, want0 <= 0)  # active exactly where A0 > 0
    # a token no expert wants gets A = 0, not NaN
    _, _, a_off = routers.blockffn_router(jnp.ones((1, 1, 8)), -jnp.ones((8, 6)), jnp.ones(6))
    assert float(jnp.abs(a_off).max()) == 0.0


def test_topk_route_and_dense_gates():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(7, 5))
    gates, chosen, probs = routers.topk_route(jnp.asarray(logits), 2)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(probs), p, rtol=1e-5)
    top = np.argsort(-p, -1)[:, :2]
    np.testing.assert_array_equal(np.sort(np.asarray(chosen), -1), np.sort(top, -1))
    g = np.take_along_axis(p, np.asarray(chosen), -1)
    np.testing.assert_allclose(np.asarray(gates), g / g.sum(-1, keepdims=True), rtol=1e-5)
    raw, _, _ = routers.topk_route(jnp.asarray(logits), 2, normalize=False)
    np.testing.assert_allclose(np.asarray(raw), g, rtol=1e-5)
    dense = np.asarray(routers.gates_to_dense(gates, chosen, 5))
    assert ((dense != 0).sum(-1) == 2).all()
    np.testing.assert_allclose(dense.sum(-1), 1.0, rtol=1e-5)


def test_remoe_router_is_relu_of_the_logits():
    x, w = jnp.asarray([[1.0, -2.0]]), jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
    logits, gates = routers.remoe_router(x, w)
    np.testing.assert_allclose(np.asarray(gates), [[1.0, 0.0]])
    np.testing.assert_allclose(np.asarray(logits), [[1.0, -2.0]])


def test_top_k_above_the_experts_is_rejected():
    with pytest.raises(ValueError, match="k must be in"):
        routers.topk_route(jnp.zeros((2, 4)), 5)
