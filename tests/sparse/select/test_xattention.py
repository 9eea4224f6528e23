"""XAttention: antidiagonal block scores against a numpy loop over tiles, threshold selection
with the sink and diagonal kept, the density variant, causal structure, and errors."""

from __future__ import annotations

import numpy as np
import pytest

from jaxeff.sparse.select import xattention
from jaxeff.sparse.select.xattention import antidiagonal_scores
from tests.sparse.select.helpers import qk, states


def numpy_scores(q, k, stride, block, causal):
    """Loops: A[a, c] = sum_m q[aS + S-1-m] . k[cS + m]; softmax over c (c <= a when causal)
    with scale 1 / (sqrt(d) S); block sums; each row of blocks divided by its tile rows."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, t, h, d = q.shape
    kh = k.shape[2]
    n = t // stride
    out = np.zeros((b, h, t // block, t // block))
    for bi, hi in np.ndindex(b, h):
        a = np.zeros((n, n))
        for r, c in np.ndindex(n, n):
            a[r, c] = sum(q[bi, r * stride + stride - 1 - m, hi] @ k[bi, c * stride + m, hi // (h // kh)]
                          for m in range(stride))
        a = a / np.sqrt(d) / stride
        if causal:
            a = np.where(np.tril(np.ones((n, n), bool)), a, -np.inf)
        p = np.exp(a - a.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        per = block // stride
        out[bi, hi] = p.reshape(t // block, per, t // block, per).sum((1, 3)) / per
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_antidiagonal_scores_match_numpy(causal):
    q, k, _ = qk(t=64, h=4, kh=2, d=8, seed=1)
    got = antidiagonal_scores(q, k, stride=4, block=16, causal=causal)
    np.testing.assert_allclose(got, numpy_scores(q, k, 4, 16, causal), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got).sum(-1), 1.0, rtol=1e-5)


def test_threshold_selection_keeps_sink_and_diagonal():
    q, k, _ = qk(t=128, h=2, kh=1, d=8, seed=2, scale=2.0)
    tau = 0.6
    bm, perm, state = xattention(q, k, threshold=tau, block=16, stride=4)
    assert perm is None and state is None
    sc = numpy_scores(q, k, 4, 16, True)[0]
    st = states(bm)[0]
    for h in range(2):
        want = np.zeros((8, 8), bool)
        for i in range(8):
            order = np.argsort(-sc[h, i], kind="stable")
            csum = np.cumsum(sc[h, i][order])
            want[i, order[:np.searchsorted(csum, tau - 1e-9) + 1]] = True
        want[:, 0] = True
        want |= np.eye(8, dtype=bool)
        want &= np.tril(np.ones((8, 8), bool))
        np.testing.assert_array_equal(st[h] > 0, want)
        np.testing.assert_array_equal(st[h] == 1, np.eye(8, dtype=bool))  # causal diagonal: partial
    dens, _, _ = xattention(q, k, density=0.25, block=16, stride=4, sink=False, diagonal=False)
    assert (np.asarray(states(dens)[0] > 0).sum(-1) >= 1).all()


def test_non_causal_and_errors():
    q, k, _ = qk(t=64, d=8)
    bm, _, _ = xattention(q, k, threshold=1.0, block=16, stride=4, causal=False)
    assert (states(bm) == 2).all()  # tau = 1 keeps every block
    with pytest.raises(ValueError, match="stride \\(5\\) must divide"):
        xattention(q, k, block=16, stride=5)
    with pytest.raises(ValueError, match="threshold must be a number in"):
        xattention(q, k, block=16, stride=4, threshold=1.5)
