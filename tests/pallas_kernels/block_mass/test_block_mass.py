"""block_mass (reference jnp pass and the Pallas kernel in interpret mode) against the dense
computation in numpy: uneven lengths, GQA, causal, T != S, rows with no key, bad inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_mass import api


def dense_mass(q, k, bq, bk, causal=False, scale=None):
    """numpy: softmax probabilities [B, H, T, S], summed over each block, and the LSE."""
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    sc = np.einsum("bthd,bshd->bhts", q.astype(np.float64), np.repeat(k, h // kh, axis=2).astype(np.float64)) * scale
    if causal:
        sc = np.where(np.arange(s)[None, :] <= np.arange(t)[:, None], sc, -np.inf)
    lse = np.log(np.exp(sc).sum(-1))
    p = np.exp(sc - lse[..., None])
    nq, nk = -(-t // bq), -(-s // bk)
    pp = np.zeros((b, h, nq * bq, nk * bk))
    pp[:, :, :t, :s] = p
    return pp.reshape(b, h, nq, bq, nk, bk).sum((3, 5)), lse


CASES = [  # (B, T, S, H, K, D, bq, bk, causal)
    (1, 64, 64, 2, 2, 16, 16, 16, False),
    (2, 50, 50, 4, 2, 16, 16, 16, True),
    (1, 40, 72, 6, 3, 8, 16, 32, False),
    (1, 96, 96, 2, 1, 32, 32, 16, True),
]


@pytest.mark.parametrize("impl", ["reference", "pallas"])
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_block_mass_equals_the_dense_computation(impl, case):
    b, t, s, h, kh, d, bq, bk, causal = case
    rng = np.random.default_rng(sum(case[:6]))
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    k = rng.normal(size=(b, s, kh, d)).astype(np.float32)
    want, lse = dense_mass(q, k, bq, bk, causal)
    got = api.block_mass(jnp.asarray(q), jnp.asarray(k), jnp.asarray(lse, jnp.float32), bq, bk, causal=causal,
                         impl=impl)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
    # every query's probabilities sum to one: a query block row sums to its real queries
    rows = np.minimum(bq, t - bq * np.arange(want.shape[2]))
    np.testing.assert_allclose(np.asarray(got).sum(-1), np.broadcast_to(rows, want.shape[:3]), rtol=1e-4)


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_rows_with_no_key_and_scale(impl):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(1, 32, 2, 16)).astype(np.float32)
    k = rng.normal(size=(1, 32, 2, 16)).astype(np.float32)
    want, lse = dense_mass(q, k, 16, 16, scale=0.5)
    lse = lse.astype(np.float32)
    lse[0, 1, :5] = -np.inf  # no allowed key: contributes nothing, not nan
    got = np.asarray(api.block_mass(jnp.asarray(q), jnp.asarray(k), jnp.asarray(lse), 16, 16, scale=0.5, impl=impl))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[0, 0], want[0, 0], atol=2e-5)
    assert got[0, 1, 0].sum() == pytest.approx(11, rel=1e-4)


def test_jit_and_auto_dispatch():
    q = jax.random.normal(jax.random.key(0), (1, 48, 4, 16))
    k = jax.random.normal(jax.random.key(1), (1, 48, 2, 16))
    lse = jnp.zeros((1, 4, 48))
    fn = jax.jit(lambda q, k, lse: api.block_mass(q, k, lse, 16, 16))
    np.testing.assert_allclose(fn(q, k, lse), api.block_mass(q, k, lse, 16, 16, impl="pallas"), rtol=1e-5)
    assert api.which_impl() == ("pallas" if jax.default_backend() == "gpu" else "reference")


@pytest.mark.parametrize("kwargs,match", [
    (dict(lse=jnp.zeros((1, 4, 10))), "lse must be"),
    (dict(q=jnp.zeros((1, 16, 3, 8))), "multiple of k's heads"),
    (dict(k=jnp.zeros((1, 16, 2))), "k must be"),
    (dict(block_q=0), "block_q"),
    (dict(impl="cuda"), "unknown impl"),
])
def test_bad_inputs_raise(kwargs, match):
    args = dict(q=jnp.zeros((1, 16, 4, 8)), k=jnp.zeros((1, 16, 2, 8)), lse=jnp.zeros((1, 4, 16)), block_q=16,
                block_kv=16)
    impl = kwargs.pop("impl", "reference")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        api.block_mass(args["q"], args["k"], args["lse"], args["block_q"], args["block_kv"], impl=impl)
