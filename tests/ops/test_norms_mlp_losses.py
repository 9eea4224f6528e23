"""rms_norm, swiglu, cross_entropy and next_token_mask against numpy formulas and hand examples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.ops import cross_entropy, next_token_mask, rms_norm, swiglu


def _np_rms_norm(x, scale, eps):
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


@pytest.mark.parametrize("eps", [1e-5, 1e-1])
def test_rms_norm_matches_numpy(eps):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 16)).astype(np.float32) * 3.0
    scale = rng.normal(size=(16,)).astype(np.float32)
    out = rms_norm(jnp.asarray(x), jnp.asarray(scale), eps)
    assert out.shape == x.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), _np_rms_norm(x, scale, eps), rtol=1e-5, atol=1e-6)


def test_rms_norm_bf16_keeps_dtype_and_uses_f32_statistics():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(1, 3, 4096)) * 50.0).astype(np.float32)
    scale = np.ones((4096,), np.float32)
    out = rms_norm(jnp.asarray(x, jnp.bfloat16), jnp.asarray(scale, jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    ref = _np_rms_norm(np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)), scale, 1e-5)
    # Output rounding to bf16 only: 2^-8 relative.
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), ref, rtol=2 ** -7, atol=1e-2)


def test_swiglu_matches_numpy():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 3, 8)).astype(np.float32)
    wg, wu = rng.normal(size=(2, 8, 12)).astype(np.float32)
    wd = rng.normal(size=(12, 8)).astype(np.float32)
    g = x.astype(np.float64) @ wg
    expected = ((g / (1.0 + np.exp(-g))) * (x.astype(np.float64) @ wu)) @ wd
    out = swiglu(*map(jnp.asarray, (x, wg, wu, wd)))
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-5)


def _np_cross_entropy(logits, targets, mask):
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    logz = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    nll = logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    w = mask.astype(np.float64)
    return (nll * w).sum() / max(w.sum(), 1.0), w.sum()


def test_cross_entropy_matches_numpy_with_and_without_mask():
    rng = np.random.default_rng(3)
    logits = (rng.normal(size=(2, 6, 11)) * 4).astype(np.float32)
    targets = rng.integers(0, 11, size=(2, 6)).astype(np.int32)
    mask = rng.random((2, 6)) < 0.6
    mask[0, 0] = True
    loss, count = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    ref, ref_count = _np_cross_entropy(logits, targets, mask)
    assert float(count) == ref_count == mask.sum()
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    loss_all, count_all = cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
    np.testing.assert_allclose(float(loss_all), _np_cross_entropy(logits, targets, np.ones_like(mask))[0], rtol=1e-5)
    assert float(count_all) == 12
    # bf16 logits are upcast: the loss comes back in float32.
    loss_bf16, _ = cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets), jnp.asarray(mask))
    assert loss_bf16.dtype == jnp.float32


def test_cross_entropy_fully_masked_batch_is_zero_with_finite_gradient():
    logits = jnp.asarray(np.random.default_rng(4).normal(size=(2, 3, 5)), jnp.float32)
    targets = jnp.zeros((2, 3), jnp.int32)
    mask = jnp.zeros((2, 3), bool)
    loss, count = cross_entropy(logits, targets, mask)
    assert float(loss) == 0.0 and float(count) == 0.0
    grad = jax.grad(lambda lg: cross_entropy(lg, targets, mask)[0])(logits)
    assert np.all(np.asarray(grad) == 0.0)


def test_next_token_mask_hand_example():
    # Row 0: a document continued from the previous row (1), a new one (2), then padding (0).
    # Row 1: a single document filling the row.
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0],
                       [1, 1, 1, 1, 1, 1, 1]], jnp.int32)
    expected = np.array([[True, True, False, True, False, False],
                         [True, True, True, True, True, True]])
    out = next_token_mask(seg)
    assert out.shape == (2, 6) and out.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(out), expected)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cross_entropy_gradient_is_softmax_minus_onehot(dtype):
    """d loss / d logits = mask * (softmax - onehot(target)) / count, returned in the logits' dtype."""
    rng = np.random.default_rng(7)
    b, t, v = 3, 5, 37
    logits = rng.normal(size=(b, t, v)).astype(np.float32) * 3
    targets = rng.integers(0, v, (b, t))
    mask = rng.random((b, t)) < 0.7
    lg = jnp.asarray(logits, dtype)
    grad = jax.grad(lambda x: cross_entropy(x, jnp.asarray(targets), jnp.asarray(mask))[0])(lg)
    assert grad.dtype == dtype
    x = np.asarray(lg.astype(jnp.float32), np.float64)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = (p - np.eye(v)[targets]) * mask[..., None] / mask.sum()
    tol = 1e-6 if dtype == jnp.float32 else 2e-3
    np.testing.assert_allclose(np.asarray(grad, np.float64), want, atol=tol)


def test_swiglu_fused_gate_up_equals_two_matmuls_with_gradients():
    rng = np.random.default_rng(11)
    x, wg, wu, wd = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((2, 5, 8), (8, 12), (8, 12), (12, 8)))
    f = lambda fused: (lambda *a: (swiglu(*a, fuse_gate_up=fused) ** 2).sum())
    np.testing.assert_allclose(swiglu(x, wg, wu, wd, fuse_gate_up=True), swiglu(x, wg, wu, wd), rtol=1e-5, atol=1e-5)
    g_fused = jax.grad(f(True), argnums=(0, 1, 2, 3))(x, wg, wu, wd)
    g_plain = jax.grad(f(False), argnums=(0, 1, 2, 3))(x, wg, wu, wd)
    for a, b in zip(g_fused, g_plain):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
