"""Every mask constructor and combinator against brute-force dense masks written here (numpy
loops / broadcasting), their pytree behaviour, and how they describe themselves to kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff import sparse
from jaxeff.sparse.masks import evaluate
from pallas_kernels.block_sparse_attention.common import describe

B, H, T, S = 2, 3, 37, 45
RNG = np.random.default_rng(0)
QI = np.arange(T)[:, None]
KI = np.arange(S)[None, :]


def dense(fn, b=B, h=H, t=T, s=S):
    return np.asarray(evaluate(sparse.masks.as_mask_fn(fn), b, h, t, s, rows=16))


def bcast(x):
    return np.broadcast_to(x, (B, H, T, S))


def brute(rule):
    """A mask from a Python predicate on (b, h, q, kv), by loops."""
    out = np.zeros((B, H, T, S), bool)
    for b in range(B):
        for h in range(H):
            for q in range(T):
                for kv in range(S):
                    out[b, h, q, kv] = rule(b, h, q, kv)
    return out


def test_causal_and_offset():
    np.testing.assert_array_equal(dense(sparse.causal()), bcast(KI <= QI))
    np.testing.assert_array_equal(dense(sparse.causal(offset=8)), bcast(KI <= QI + 8))
    assert bool(sparse.causal()(0, 0, 3, 2)) and not bool(sparse.causal()(0, 0, 2, 3))


@pytest.mark.parametrize("left,right,offset", [(5, 0, 0), (3, 4, 0), (None, 2, 0), (6, None, 0), (4, 0, 8)])
def test_local(left, right, offset):
    want = brute(lambda b, h, q, kv: (left is None or q + offset - left <= kv)
                 and (right is None or kv <= q + offset + right))
    np.testing.assert_array_equal(dense(sparse.local(left, right, offset=offset)), want)


def test_local_w_0_is_causal_sliding():
    np.testing.assert_array_equal(dense(sparse.local(4, 0)), bcast((KI <= QI) & (KI >= QI - 4)))


@pytest.mark.parametrize("chunk", [1, 8, 10, 64])
def test_chunked_causal(chunk):
    want = brute(lambda b, h, q, kv: q // chunk == kv // chunk and kv <= q)
    np.testing.assert_array_equal(dense(sparse.chunked_causal(chunk)), want)


def test_document_square_and_cross():
    seg = np.sort(RNG.integers(0, 4, (B, T)), axis=1)
    want = np.broadcast_to(seg[:, None, :, None] == seg[:, None, None, :], (B, H, T, T))
    np.testing.assert_array_equal(dense(sparse.document(seg), t=T, s=T), want)
    kv_seg = np.sort(RNG.integers(0, 4, (B, S)), axis=1)
    want = brute(lambda b, h, q, kv: seg[b, q] == kv_seg[b, kv])
    np.testing.assert_array_equal(dense(sparse.document(seg, kv_seg)), want)


def test_prefix_lm():
    prefix = np.array([5, 30])
    want = brute(lambda b, h, q, kv: kv < prefix[b] or kv <= q)
    np.testing.assert_array_equal(dense(sparse.prefix_lm(prefix)), want)


@pytest.mark.parametrize("shape", [(T, S), (H, T, S), (B, H, T, S), (1, H, T, S), (B, 1, T, S)])
def test_from_dense(shape):
    m = RNG.random(shape) < 0.3
    np.testing.assert_array_equal(dense(sparse.from_dense(m)), np.broadcast_to(m.reshape((1,) * (4 - m.ndim) + m.shape),
                                                                               (B, H, T, S)))


def test_per_head_masks_from_h():
    fn = sparse.index_mask(lambda b, h, q, kv: kv <= q - 3 * h)
    np.testing.assert_array_equal(dense(fn), brute(lambda b, h, q, kv: kv <= q - 3 * h))


def test_combinators_and_operators():
    seg = np.sort(RNG.integers(0, 3, (B, T)), axis=1)
    c, loc, doc = sparse.causal(), sparse.local(6, 2), sparse.document(seg)
    t = dict(t=T, s=T)
    dc, dl, dd = dense(c, **t), dense(loc, **t), dense(doc, **t)
    np.testing.assert_array_equal(dense(sparse.and_masks(c, loc, doc), **t), dc & dl & dd)
    np.testing.assert_array_equal(dense(sparse.or_masks(c, doc), **t), dc | dd)
    np.testing.assert_array_equal(dense(sparse.not_mask(loc), **t), ~dl)
    np.testing.assert_array_equal(dense((c & ~loc) | doc, **t), (dc & ~dl) | dd)
    assert sparse.and_masks(c) is c


def test_plain_callables_work_as_masks():
    plain = lambda b, h, q, kv: (q + kv) % 3 == 0  # noqa: E731
    want = brute(lambda b, h, q, kv: (q + kv) % 3 == 0 and kv <= q)
    np.testing.assert_array_equal(dense(sparse.and_masks(plain, sparse.causal())), want)
    np.testing.assert_array_equal(dense(plain), brute(lambda b, h, q, kv: (q + kv) % 3 == 0))


def test_masks_are_pytrees_with_array_leaves_and_static_structure():
    seg = jnp.asarray(np.sort(RNG.integers(0, 3, (B, T)), axis=1))
    fn = sparse.and_masks(sparse.causal(), sparse.document(seg))
    leaves, tree = jax.tree.flatten(fn)
    assert len(leaves) == 1 and leaves[0] is seg
    assert jax.tree.leaves(sparse.local(3, 0)) == []
    traces = []

    @jax.jit
    def f(m):
        traces.append(1)
        return evaluate(m, B, 1, T, T)

    a = f(fn)
    b = f(jax.tree.unflatten(tree, [jnp.zeros_like(seg)]))
    assert len(traces) == 1
    np.testing.assert_array_equal(a, dense(fn, h=1, t=T, s=T))
    np.testing.assert_array_equal(b, dense(sparse.causal(), h=1, t=T, s=T))  # all in one document


def test_index_only_and_structure():
    assert sparse.causal().index_only and sparse.local(2, 2).index_only and sparse.chunked_causal(4).index_only
    assert sparse.and_masks(sparse.causal(), sparse.local(3, 0)).index_only
    assert not sparse.document(np.zeros((1, 4), np.int32)).index_only
    assert not sparse.masks.as_mask_fn(lambda b, h, q, kv: q >= kv).index_only
    assert sparse.index_mask(lambda b, h, q, kv: q >= kv).index_only
    assert describe(sparse.and_masks(sparse.causal(2), sparse.not_mask(sparse.local(3, None)))) == (
        "and", ("causal", 2), ("not", ("local", 3, None, 0)))
    assert describe(sparse.index_mask(lambda b, h, q, kv: q >= kv)) is None
    assert describe(sparse.soft_cap(30.0)) == ("soft_cap", 30.0)


def _evaluate_element_mask(em, b, h, t, s):
    bi = np.arange(b)[:, None, None, None]
    hi = np.arange(h)[None, :, None, None]
    return np.asarray(em.evaluate(bi, hi, np.arange(t)[None, None, :, None], np.arange(s)[None, None, None, :], s))


def test_element_mask_descriptions():
    seg = np.sort(RNG.integers(0, 3, (B, T)), axis=1)
    c, doc = sparse.causal(), sparse.document(seg)
    cases = {
        "index": (sparse.and_masks(c, sparse.local(5, 0)), dict(index_fn=True)),
        "and_doc": (sparse.and_masks(c, doc), dict(index_fn=True, seg=True)),
        "or_doc": (sparse.or_masks(c, doc), dict(dense=(B, 1))),
        "prefix": (sparse.prefix_lm(np.array([3, 9])), dict(dense=(B, 1))),
        "from_dense_heads": (sparse.from_dense(RNG.random((H, T, T)) < 0.5), dict(dense=(1, H))),
        "custom": (lambda b, h, q, kv: q >= kv, dict(dense=(B, H))),
        "and_custom": (sparse.and_masks(doc, lambda b, h, q, kv: q >= kv, c), dict(index_fn=True, seg=True,
                                                                                  dense=(B, H))),
        "index_mask": (sparse.index_mask(lambda b, h, q, kv: kv <= q - h), dict(index_fn=True)),
    }
    for name, (fn, want) in cases.items():
        fn = sparse.masks.as_mask_fn(fn)
        em = fn.element_mask(B, H, T, T)
        assert (em.index_fn is not None) == want.get("index_fn", False), name
        assert (em.q_segment_ids is not None) == want.get("seg", False), name
        assert (None if em.dense is None else em.dense.shape[:2]) == want.get("dense"), name
        np.testing.assert_array_equal(np.broadcast_to(_evaluate_element_mask(em, B, H, T, T), (B, H, T, T)),
                                      dense(fn, t=T, s=T), err_msg=name)


def test_bad_inputs():
    with pytest.raises(ValueError, match="from_dense: mask must be a boolean array"):
        sparse.from_dense(np.ones((4, 4), np.int32))
    with pytest.raises(ValueError, match=r"from_dense: mask must be \[Q, K\]"):
        sparse.from_dense(np.ones((4,), bool))
    with pytest.raises(ValueError, match="window_left"):
        sparse.local(-1, 0)
    with pytest.raises(ValueError, match="chunk"):
        sparse.chunked_causal(0)
    with pytest.raises(ValueError, match="segment_ids must be an integer array"):
        sparse.document(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="segment_ids must have 2 dimensions"):
        sparse.document(np.zeros((4,), np.int32))
    with pytest.raises(ValueError, match="prefix_len"):
        sparse.prefix_lm(np.zeros((2, 2), np.int32))
    with pytest.raises(ValueError, match="at least one"):
        sparse.and_masks()
    with pytest.raises(ValueError, match="callable"):
        sparse.or_masks(sparse.causal(), 3)
    with pytest.raises(ValueError, match="not index-only"):
        sparse.index_mask(sparse.document(np.zeros((1, 4), np.int32)))
    with pytest.raises(ValueError, match="cap must be positive"):
        sparse.soft_cap(0.0)
