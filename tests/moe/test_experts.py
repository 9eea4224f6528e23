"""Expert compute paths against a numpy loop: the dense reference (non-gated and gated), dropless
top-k through ``jax.lax.ragged_dot`` (values and gradients equal to the dense path), fixed
capacities that drop the overflow in GShard's order, and the chunk-sparse kernel path with the
dense path's gradient."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.moe import experts, routers

N, D, E, F, K = 12, 8, 6, 5, 2


@pytest.fixture
def weights():
    rng = np.random.default_rng(0)
    f32 = lambda *shape, s=1.0: jnp.asarray(rng.normal(size=shape) * s, jnp.float32)  # noqa: E731
    return f32(N, D), f32(E, D, F, s=0.3), f32(E, F, D, s=0.3), f32(E, D, F, s=0.3)


def np_experts(x, a, w_up, w_down, w_gate=None):
    x, a, w_up, w_down = (np.asarray(v, np.float64) for v in (x, a, w_up, w_down))
    silu = lambda u: u / (1 + np.exp(-u))  # noqa: E731
    y = np.zeros_like(x)
    for n in range(x.shape[0]):
        for e in range(a.shape[1]):
            if a[n, e] == 0:
                continue
            h = silu(x[n] @ w_up[e]) if w_gate is None else silu(x[n] @ np.asarray(w_gate[e])) * (x[n] @ w_up[e])
            y[n] += a[n, e] * h @ w_down[e]
    return y


def test_dense_experts_non_gated_and_gated(weights):
    x, w_up, w_down, w_gate = weights
    a = jnp.asarray(np.maximum(np.random.default_rng(1).normal(size=(N, E)), 0), jnp.float32)
    np.testing.assert_allclose(np.asarray(experts.dense_experts(x, a, w_up, w_down)), np_experts(x, a, w_up, w_down),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(experts.dense_experts(x, a, w_up, w_down, w_gate)),
                               np_experts(x, a, w_up, w_down, w_gate), rtol=1e-4, atol=1e-5)


def test_ragged_equals_dense_in_values_and_gradients(weights):
    x, w_up, w_down, w_gate = weights
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(N, E)), jnp.float32)
    gates, chosen, _ = routers.topk_route(logits, K)
    dense = lambda x, u, d, g: experts.dense_experts(x, routers.gates_to_dense(g, chosen, E), u, d)  # noqa: E731
    ragged = lambda x, u, d, g: experts.ragged_experts(x, g, chosen, u, d)  # noqa: E731
    want = np_experts(x, routers.gates_to_dense(gates, chosen, E), w_up, w_down)
    np.testing.assert_allclose(np.asarray(ragged(x, w_up, w_down, gates)), want, rtol=1e-4, atol=1e-5)
    loss = lambda f: lambda *a: jnp.sum(jnp.tanh(f(*a)))  # noqa: E731
    gd = jax.grad(loss(dense), argnums=(0, 1, 2, 3))(x, w_up, w_down, gates)
    gr = jax.grad(loss(ragged), argnums=(0, 1, 2, 3))(x, w_up, w_down, gates)
    for a, b in zip(gd, gr):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    gated = experts.ragged_experts(x, gates, chosen, w_up, w_down, w_gate)
    np.testing.assert_allclose(np.asarray(gated), np_experts(x, routers.gates_to_dense(gates, chosen, E), w_up, w_down,
                                                             w_gate), rtol=1e-4, atol=1e-5)


def test_tokamax_is_refused_clearly_when_missing():
    try:
        import tokamax  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="tokamax"):
            experts.ragged_dot_impl("tokamax")
    assert experts.ragged_dot_impl("ragged") is jax.lax.ragged_dot


def _strict_half_ragged_dot():
    """A stand-in for tokamax's Mosaic ``ragged_dot``: it takes operands of one dtype only, and its
    backward multiplies the output's cotangent with them, refusing a cotangent of another dtype."""
    def check(*arrays):
        if len({a.dtype for a in arrays}) != 1:
            raise NotImplementedError(f"lhs and rhs must have same dtype, got {[a.dtype for a in arrays]}")

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
    def dot(lhs, rhs, sizes, out_dtype):
        check(lhs, rhs)
        return jax.lax.ragged_dot(lhs, rhs, sizes, preferred_element_type=out_dtype)

    def fwd(lhs, rhs, sizes, out_dtype):
        return dot(lhs, rhs, sizes, out_dtype), (lhs, rhs, sizes)

    def bwd(out_dtype, res, g):
        lhs, rhs, sizes = res
        check(g, rhs)
        _, vjp = jax.vjp(lambda a, b: jax.lax.ragged_dot(a, b, sizes), lhs, rhs)
        return (*vjp(g), None)

    dot.defvjp(fwd, bwd)
    return lambda lhs, rhs, sizes, preferred_element_type=None: dot(lhs, rhs, sizes, preferred_element_type)


def test_tokamax_path_trains_in_bf16(weights, monkeypatch):
    """The tokamax path's gradient with bf16 weights: a float32 output from the kernel would give
    its backward a float32 cotangent against bf16 weights (the H200 run's NotImplementedError)."""
    monkeypatch.setattr(experts, "_tokamax_ragged_dot", _strict_half_ragged_dot)
    x, w_up, w_down, _ = (w.astype(jnp.bfloat16) for w in weights)
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(N, E)), jnp.float32)
    gates, chosen, _ = routers.topk_route(logits, K)
    def loss(impl):
        return lambda x, u, d: jnp.sum(experts.ragged_experts(x, gates, chosen, u, d, impl=impl) ** 2)

    got = jax.grad(loss("tokamax"), argnums=(0, 1, 2))(x, w_up, w_down)
    want = jax.grad(loss("ragged"), argnums=(0, 1, 2))(x, w_up, w_down)
    for a, b in zip(got, want):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0.05, atol=0.05)


def test_capacity_drops_the_overflow_in_gshard_order(weights):
    x, w_up, w_down, _ = weights
    chosen = jnp.asarray([[0, 1]] * 4 + [[1, 0]] * 2 + [[2, 3]] * 6, jnp.int32)
    gates = jnp.full((N, K), 0.5, jnp.float32)
    slot, kept = experts.capacity_slots(chosen, E, 3)
    # first choices take slots before second choices: expert 0 gets tokens 0-3 first (slots 0..3)
    np.testing.assert_array_equal(np.asarray(slot[:4, 0]), [0, 1, 2, 3])
    np.testing.assert_array_equal(np.asarray(slot[4:6, 1]), [4, 5])  # expert 0 as second choice comes after
    y, kept = experts.capacity_experts(x, gates, chosen, w_up, w_down, capacity=3)
    a = np.asarray(routers.gates_to_dense(jnp.where(kept, gates, 0.0), chosen, E))
    np.testing.assert_allclose(np.asarray(y), np_experts(x, a, w_up, w_down), rtol=1e-4, atol=1e-5)
    big, kept_all = experts.capacity_experts(x, gates, chosen, w_up, w_down, capacity=N)
    assert bool(kept_all.all())
    np.testing.assert_allclose(np.asarray(big), np.asarray(experts.ragged_experts(x, gates, chosen, w_up, w_down)),
                               rtol=1e-5, atol=1e-6)
    assert experts.expert_capacity(12, 2, 6, 1.25) == 5


@pytest.mark.parametrize("impl", ["reference", "portable"])
def test_chunk_sparse_kernel_path_has_the_dense_values_and_gradients(weights, impl):
    x, w_up, w_down, _ = weights
    a = jnp.asarray(np.maximum(np.random.default_rng(3).normal(size=(2, 6, E)) - 0.5, 0), jnp.float32)
    xb = x.reshape(2, 6, D)
    ref = lambda x, a, u, d: experts.dense_experts(x.reshape(-1, D), a.reshape(-1, E), u, d).reshape(2, 6, D)  # noqa
    ker = lambda x, a, u, d: experts.chunk_sparse_experts(x, a, u, d, chunk_len=4, impl=impl)  # noqa: E731
    np.testing.assert_allclose(np.asarray(ker(xb, a, w_up, w_down)), np.asarray(ref(xb, a, w_up, w_down)),
                               rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda *v: jnp.sum(f(*v) ** 2)  # noqa: E731
    for g1, g2 in zip(jax.grad(loss(ker), argnums=(0, 1, 2, 3))(xb, a, w_up, w_down),
                      jax.grad(loss(ref), argnums=(0, 1, 2, 3))(xb, a, w_up, w_down)):
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-5, atol=1e-5)
