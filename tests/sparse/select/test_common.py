"""The shared helpers: permutations and their inverses, top-k / top-p / budgets per row, sink and
diagonal keeping, tables as BlockMasks (full / empty blocks only), the chunked LSE."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.sparse.select import common
from tests.sparse.select.helpers import probs, qk, states


def random_perm(rng, shape):
    return jnp.asarray(np.stack([rng.permutation(shape[-1]) for _ in range(int(np.prod(shape[:-1])))]
                                ).reshape(shape), jnp.int32)


def test_permute_then_unpermute_is_the_identity():
    rng = np.random.default_rng(0)
    q, k, v = qk(b=2, t=40, h=6, kh=3, d=8)
    perm = common.Permutation(random_perm(rng, (2, 6, 40)), random_perm(rng, (2, 3, 40)))
    qp, kp, vp = common.permute(q, k, v, perm)
    # position t of head h holds token perm.q[b, h, t]
    np.testing.assert_array_equal(qp[1, :, 4], q[1, np.asarray(perm.q[1, 4]), 4])
    np.testing.assert_array_equal(kp[0, :, 2], k[0, np.asarray(perm.kv[0, 2]), 2])
    np.testing.assert_array_equal(common.unpermute(qp, perm), q)
    inv = perm.inverse()
    np.testing.assert_array_equal(common.permute(*common.permute(q, k, v, perm), inv)[1], k)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(perm.q), np.asarray(inv.q), -1),
                                  np.broadcast_to(np.arange(40), (2, 6, 40)))
    assert common.permute(q, k, v, None)[0] is q and common.unpermute(q, None) is q


def test_attention_is_equivariant_under_a_permutation():
    """Permuting q/k/v, attending with the permuted mask and permuting back = attending directly."""
    from jaxeff.sparse import block_sparse_attention, create_block_mask, from_dense
    rng = np.random.default_rng(1)
    q, k, v = qk(t=48, h=4, kh=2)
    shared = random_perm(rng, (1, 2, 48))
    perm = common.Permutation(common.shared_query_perm(shared, 4), shared)
    full = create_block_mask(from_dense(np.ones((48, 48), bool)), None, None, 48, 48, block_q=16, block_kv=16)
    want = block_sparse_attention(q, k, v, full, impl="reference")
    got = common.unpermute(block_sparse_attention(*common.permute(q, k, v, perm), full, impl="reference"), perm)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_top_p_meets_p_with_the_fewest_entries():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.dirichlet(np.ones(20), size=(3, 7)), jnp.float32)
    for p in (0.3, 0.9, 1.0):
        keep = np.asarray(common.top_p_rows(x, p))
        xs = np.asarray(x)
        for row, kr in zip(xs.reshape(-1, 20), keep.reshape(-1, 20)):
            assert row[kr].sum() >= p * row.sum() - 1e-6
            # the kept set is the largest entries, and dropping its smallest one falls below p
            assert row[kr].min() >= row[~kr].max() if (~kr).any() else True
            assert row[kr].sum() - row[kr].min() < p * row.sum() + 1e-6
    assert (np.asarray(common.top_p_rows(x, 0.01, min_keep=5)).sum(-1) == 5).all()


def test_top_k_and_budgets():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 3, 8, 8)), jnp.float32)
    assert (np.asarray(common.top_k_rows(x, 3)).sum(-1) == 3).all()
    row = np.asarray(common.budget_select(x, 0.25, budget="row"))
    assert (row.sum(-1) == 2).all()
    head = np.asarray(common.budget_select(x, 0.25, budget="head"))
    xs = np.asarray(x)
    for b in range(2):
        for h in range(3):
            top16 = np.argsort(-xs[b, h].ravel())[:16]
            want = np.zeros(64, bool)
            want[top16] = True
            want = want.reshape(8, 8) | (xs[b, h] == xs[b, h].max(-1, keepdims=True))  # every row its best
            np.testing.assert_array_equal(head[b, h], want)
    glob = np.asarray(common.budget_select(x, 0.25, budget="global"))
    assert glob.reshape(2, -1).sum(-1).min() >= 48
    allowed = common.causal_blocks(8, 8, 16, 16)
    causal = np.asarray(common.budget_select(x, 0.5, budget="head", allowed=allowed))
    assert not (causal & ~allowed).any() and causal[0, 0].sum() >= round(0.5 * allowed.sum())
    with pytest.raises(ValueError, match="budget"):
        common.budget_select(x, 0.5, budget="tile")


def test_sink_and_diagonal_and_block_masks_hold_full_blocks_only():
    table = jnp.zeros((1, 2, 4, 8), bool)
    kept = np.asarray(common.keep_sink_and_diagonal(table, 32, 16))
    want = np.zeros((4, 8), bool)
    want[:, 0] = True
    for i in range(4):
        want[i, 2 * i:2 * i + 2] = True  # query block i (32 tokens) spans key blocks 2i, 2i+1
    np.testing.assert_array_equal(kept[0, 1], want)
    bm = common.to_block_mask(jnp.asarray(kept), 32, 16, 128, 128)
    st = states(bm)
    assert set(np.unique(st)) == {0, 2}
    np.testing.assert_array_equal(st == 2, kept)
    # uneven lengths: the tail blocks are partial (masked by length), nothing else
    bm = common.to_block_mask(jnp.ones((1, 1, 4, 8), bool), 32, 16, 120, 120)
    assert set(np.unique(states(bm))) == {1, 2}
    causal = states(common.to_block_mask(jnp.ones((1, 1, 4, 4), bool), 16, 16, 64, 64, causal=True))[0, 0]
    np.testing.assert_array_equal(causal, np.tril(np.ones((4, 4))) + np.tril(np.ones((4, 4)), -1))


@pytest.mark.parametrize("causal", [False, True])
def test_log_sum_exp_matches_dense(causal):
    q, k, _ = qk(b=2, t=50, h=4, kh=2)
    got = common.log_sum_exp(q, k, causal=causal, block_q=16)
    qn, kn = np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), 2, axis=2)
    sc = np.einsum("bthd,bshd->bhts", qn, kn) / 4.0
    if causal:
        sc = np.where(np.tril(np.ones((50, 50), bool)), sc, -np.inf)
    np.testing.assert_allclose(got, np.log(np.exp(sc).sum(-1)), rtol=1e-5)
    assert probs(q, k, causal).shape == (2, 4, 50, 50)


@pytest.mark.parametrize("fn,args,match", [
    (common.check_fraction, ("f", "density", 0.0), "density must be a number in \\(0, 1\\]"),
    (common.check_fraction, ("f", "density", 1.5), "density"),
    (common.check_fraction, ("f", "threshold", True), "threshold"),
    (common.check_grid, ("f", (2, 4, 4), 64), "grid \\(2, 4, 4\\) holds 32 tokens but the sequence has 64"),
    (common.check_grid, ("f", (2, 4), 8), "grid must be"),
    (common.check_block, ("f", 24, 64, 64), "block"),
    (common.check_knobs, ("f", 0.5, 0.5), "not both"),
])
def test_checks_name_the_argument(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)


def test_check_qk():
    q, k, _ = qk()
    with pytest.raises(ValueError, match="q must be"):
        common.check_qk("f", q[0], k)
    with pytest.raises(ValueError, match="multiple of k's heads"):
        common.check_qk("f", q[:, :, :3], k)
    with pytest.raises(ValueError, match="floating-point"):
        common.check_qk("f", q.astype(jnp.int32), k)
    assert common.check_qk("f", q, k) == (1, 64, 4, 16, 64, 2)
    assert jax.tree.leaves(common.Permutation(jnp.zeros((1, 2, 3)), jnp.zeros((1, 1, 3))))
