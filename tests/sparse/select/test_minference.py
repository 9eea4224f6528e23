"""MInference vertical-slash: the line scores from the last queries against numpy, the block
cover of the kept lines against an element-level construction, sink / diagonal / local kept."""

from __future__ import annotations

import numpy as np
import pytest

from jaxeff.sparse.select import minference
from jaxeff.sparse.select.minference import vertical_slash_scores, vertical_slash_table
from tests.sparse.select.helpers import probs, qk, states


def test_vertical_and_slash_scores_match_numpy():
    q, k, _ = qk(t=48, h=4, kh=2, seed=1)
    vert, slash = vertical_slash_scores(q, k, last_q=8)
    p = probs(q, k, causal=True)[:, :, -8:]  # the last 8 queries
    np.testing.assert_allclose(vert, p.sum(2), atol=1e-5)
    want = np.zeros((1, 4, 48))
    for r in range(8):
        t = 40 + r
        for o in range(t + 1):
            want[:, :, o] += p[:, :, r, t - o]
    np.testing.assert_allclose(slash, want, atol=1e-5)


def test_block_cover_of_the_kept_lines():
    rng = np.random.default_rng(2)
    t, bq, bk = 64, 16, 16
    keys = rng.random((1, 2, t)) < 0.05
    offs = rng.random((1, 2, t)) < 0.05
    table = np.asarray(vertical_slash_table(keys, offs, bq, bk, t))
    qi, ki = np.arange(t)[:, None], np.arange(t)[None, :]
    for h in range(2):
        elem = (keys[0, h][None, :] | offs[0, h][np.clip(qi - ki, 0, t - 1)] & (qi >= ki)) & (ki <= qi)
        want = elem.reshape(4, 16, 4, 16).any((1, 3))
        # the vertical cover is per block row and column (causal blocks), so it may add blocks
        # whose kept key lies after every query of the row's block only on the diagonal
        np.testing.assert_array_equal(table[0, h] & ~np.eye(4, dtype=bool), want & ~np.eye(4, dtype=bool))


def test_minference_mask():
    q, k, _ = qk(t=128, h=2, kh=1, seed=3, scale=2.0)
    bm, perm, state = minference(q, k, block=16, last_q=16, vertical_size=4, slash_size=4, sink_tokens=0,
                                 local_offsets=0)
    st = states(bm)[0]
    assert perm is None and state is None
    assert (st[:, :, 0] > 0).all() and (np.diagonal(st, axis1=1, axis2=2) == 1).all()  # sink, causal diagonal
    assert not np.triu(st > 0, 1).any()
    vert, slash = vertical_slash_scores(q, k, last_q=16)
    top = np.argsort(-np.asarray(vert[0, 0]), kind="stable")[:4]
    for key in top:  # every kept key's block column is computed below the diagonal
        j = key // 16
        assert (st[0, j:, j] > 0).all()
    dense_ish, _, _ = minference(q, k, block=16, density=1.0)
    assert (states(dense_ish)[0] > 0).sum() == 2 * 36  # every causal block


def test_errors():
    q, k, _ = qk(t=64)
    with pytest.raises(ValueError, match="threshold is not a knob"):
        minference(q, k, block=16, threshold=0.9)
    with pytest.raises(ValueError, match="last_q"):
        minference(q, k, block=16, last_q=100)
    with pytest.raises(ValueError, match="prefill only"):
        minference(q, k[:, :32], block=16)
    with pytest.raises(ValueError, match="not both"):
        minference(q, k, block=16, density=0.5, vertical_size=10)
