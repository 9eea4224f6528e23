"""The common interface: every method through ``select`` (BlockMask + permutation + state),
jit without retracing across calls with the same shapes, the selector's mask run by the Pallas
kernel (interpret mode) against the reference, and bad input raising ValueError naming the
argument."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxeff.sparse import BlockMask
from jaxeff.sparse.select import METHODS, Permutation, attend, init_state, select
from tests.sparse.select.helpers import qk, states

GRID = (4, 4, 8)  # 128 tokens
OPTIONS = {
    "svg2": dict(q_clusters=8, k_clusters=16, iters=3, block=16),
    "paro": dict(grid=GRID, block=16),
    "adaspa": dict(block=16),
    "efficient_vdit": dict(grid=GRID, block=16),
    "xattention": dict(block=16, stride=4),
    "minference": dict(block=16, last_q=16, vertical_size=8, slash_size=8),
}


def test_every_method_is_registered():
    assert set(METHODS) == set(OPTIONS)
    for name, m in METHODS.items():
        assert m.fn.__doc__ and name in m.fn.__module__


@pytest.mark.parametrize("method", list(OPTIONS))
def test_select_returns_a_block_mask_a_permutation_and_a_state(method):
    q, k, v = qk(t=128, h=4, kh=2, seed=1)
    bm, perm, state = select(q, k, method=method, **OPTIONS[method])
    assert isinstance(bm, BlockMask) and bm.seq_lengths == (128, 128) and bm.block_size == (16, 16)
    assert (perm is not None) == METHODS[method].reorders
    if perm is not None:
        assert isinstance(perm, Permutation) and perm.q.shape == (1, 4, 128) and perm.kv.shape == (1, 2, 128)
    assert (state is None) == (METHODS[method].init_state is None)
    causal = method in ("xattention", "minference")
    assert set(np.unique(states(bm))) <= ({0, 1, 2} if causal else {0, 2})
    o = attend(q, k, v, bm, perm, impl="reference")
    assert o.shape == q.shape and np.isfinite(np.asarray(o)).all()


@pytest.mark.parametrize("method", list(OPTIONS))
def test_jit_does_not_retrace_across_calls(method):
    traces = []

    def step(q, k, state):
        traces.append(1)
        bm, perm, state = select(q, k, method=method, state=state, **OPTIONS[method])
        return bm, perm, state

    step = jax.jit(step)
    q, k, _ = qk(t=128, seed=2)
    state = init_state(method, q, k, **OPTIONS[method])
    for seed in (3, 4, 5):
        q, k, _ = qk(t=128, seed=seed)
        bm, perm, state = step(q, k, state)
        eager = select(q, k, method=method, state=state if method == "paro" else None, **OPTIONS[method])[0]
        if method != "svg2":  # svg2's jitted calls warm-start from the previous centroids
            np.testing.assert_array_equal(states(bm), states(eager))
    assert len(traces) == 1


def test_the_pallas_kernel_runs_a_selectors_mask():
    q, k, v = qk(t=128, h=4, kh=2, d=16, seed=6, scale=1.5)
    for method in ("paro", "adaspa"):
        bm, perm, _ = select(q, k, method=method, density=0.3, **OPTIONS[method])
        want = attend(q, k, v, bm, perm, impl="reference")
        got = attend(q, k, v, bm, perm, impl="pallas")
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_unknown_method_and_option():
    q, k, _ = qk(t=64)
    with pytest.raises(ValueError, match="unknown method 'flash'; known: svg2, paro, adaspa"):
        select(q, k, method="flash")
    with pytest.raises(ValueError, match="method 'adaspa' takes no option 'grid'; its options: block"):
        select(q, k, method="adaspa", grid=(1, 8, 8))


@pytest.mark.parametrize("method", list(OPTIONS))
@pytest.mark.parametrize("bad", [0.0, 1.5, -1.0, float("nan")])
def test_density_outside_the_unit_interval_raises(method, bad):
    q, k, _ = qk(t=128)
    with pytest.raises(ValueError, match="density must be a number in \\(0, 1\\]"):
        select(q, k, method=method, density=bad, **OPTIONS[method])


@pytest.mark.parametrize("method", ["paro", "efficient_vdit"])
def test_grid_that_does_not_match_the_sequence_raises(method):
    q, k, _ = qk(t=128)
    opts = dict(OPTIONS[method], grid=(4, 4, 4))
    with pytest.raises(ValueError, match="grid \\(4, 4, 4\\) holds 64 tokens but the sequence has 128"):
        select(q, k, method=method, **opts)


def test_more_clusters_than_tokens_raises():
    q, k, _ = qk(t=64)
    with pytest.raises(ValueError, match="svg2: k_clusters must be an integer in \\[1, 64\\], got 65"):
        select(q, k, method="svg2", q_clusters=8, k_clusters=65, block=16)
    with pytest.raises(ValueError, match="q_clusters"):
        select(q, k, method="svg2", q_clusters=100, k_clusters=8, block=16)
