"""AdaSpa: its block mass equals the dense computation's (with a given or computed LSE, both
implementations), the budgets on hand-made masses, threshold mode, causal, and the refresh
schedule across steps (cached table reused, under jit without retracing)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.sparse.select import adaspa, adaspa_mass, init_state
from jaxeff.sparse.select.adaspa import search
from jaxeff.sparse.select.common import log_sum_exp
from tests.sparse.select.helpers import block_sum, probs, qk, states


@pytest.mark.parametrize("impl", ["reference", "pallas"])
@pytest.mark.parametrize("causal", [False, True])
def test_block_mass_equals_dense(impl, causal):
    q, k, _ = qk(b=2, t=56, h=4, kh=2, seed=1)
    want = block_sum(probs(q, k, causal), 16, 16)
    rows = np.minimum(16, 56 - 16 * np.arange(4))[:, None]
    got = adaspa_mass(q, k, block=16, causal=causal, impl=impl)
    np.testing.assert_allclose(got, want / rows, atol=1e-5)
    lse = log_sum_exp(q, k, causal=causal)  # a cached LSE gives the same
    np.testing.assert_allclose(adaspa_mass(q, k, block=16, lse=lse, causal=causal, impl=impl), got, atol=1e-6)


def test_budgets_on_hand_made_masses():
    mass = np.full((1, 2, 4, 4), 0.01, np.float32)
    mass[0, 0] = np.eye(4) * 0.97 + 0.01  # head 0: concentrated on the diagonal
    mass[0, 1, :, :] = [0.4, 0.3, 0.2, 0.1]  # head 1: the same spread in every row
    m = jnp.asarray(mass)
    head = np.asarray(search(m, 16, 16, density=0.25, threshold=None, budget="head", causal=False))
    np.testing.assert_array_equal(head[0, 0], np.eye(4, dtype=bool))
    np.testing.assert_array_equal(head[0, 1], np.broadcast_to([True, False, False, False], (4, 4)))
    # one global budget of 8 blocks: head 0 needs 4 for its diagonal, head 1 takes the rest by mass
    glob = np.asarray(search(m, 16, 16, density=0.25, threshold=None, budget="global", causal=False))
    assert glob.sum() == 8 and glob[0, 1, :, 0].all() and glob[0, 0].sum() == 4
    thr = np.asarray(search(m, 16, 16, density=None, threshold=0.65, budget="head", causal=False))
    np.testing.assert_array_equal(thr[0, 1], np.broadcast_to([True, True, False, False], (4, 4)))
    assert thr[0, 0].sum() == 4
    causal = np.asarray(search(m, 16, 16, density=0.5, threshold=None, budget="row", causal=True))
    assert not np.triu(causal[0, 1], 1).any() and np.diag(causal[0, 1]).all()


def test_selection_keeps_the_largest_blocks():
    q, k, _ = qk(t=64, h=4, kh=2, seed=2, scale=2.0)
    bm, perm, state = adaspa(q, k, density=0.25, block=16)
    assert perm is None and int(state.step) == 1
    mass = block_sum(probs(q, k), 16, 16)[0]
    sel = states(bm)[0] == 2
    for h in range(4):  # the top 4 of the head's 16 blocks, and every row's best
        want = np.zeros(16, bool)
        want[np.argsort(-mass[h].ravel(), kind="stable")[:4]] = True
        want = want.reshape(4, 4) | (mass[h] == mass[h].max(-1, keepdims=True))
        np.testing.assert_array_equal(sel[h], want)
    assert set(np.unique(states(bm))) <= {0, 2}


def test_refresh_schedule_reuses_the_cached_table():
    q, k, _ = qk(t=64, seed=3, scale=2.0)
    q2, k2, _ = qk(t=64, seed=4, scale=2.0)
    traces = []

    @jax.jit
    def step(q, k, st):
        traces.append(1)
        bm, _, st = adaspa(q, k, density=0.25, block=16, state=st, refresh_every=2)
        return bm.block_states(), st

    st = init_state("adaspa", q, k, block=16)
    a0, st = step(q, k, st)  # step 0: search
    a1, st = step(q2, k2, st)  # step 1: reuse
    a2, st = step(q2, k2, st)  # step 2: search again
    fresh2 = states(adaspa(q2, k2, density=0.25, block=16)[0])
    np.testing.assert_array_equal(a0, states(adaspa(q, k, density=0.25, block=16)[0]))
    np.testing.assert_array_equal(a1, a0)
    np.testing.assert_array_equal(a2, fresh2)
    assert not np.array_equal(a0, fresh2) and int(st.step) == 3 and len(traces) == 1
    # explicit refresh steps: only step 0 and step 2 search
    st = init_state("adaspa", q, k, block=16)
    seen = []
    for i, (qi, ki) in enumerate([(q, k), (q2, k2), (q2, k2), (q, k)]):
        bm, _, st = adaspa(qi, ki, density=0.25, block=16, state=st, refresh_steps=(2,))
        seen.append(states(bm))
    np.testing.assert_array_equal(seen[1], seen[0])
    np.testing.assert_array_equal(seen[2], fresh2)
    np.testing.assert_array_equal(seen[3], fresh2)


def test_errors():
    q, k, _ = qk(t=64)
    with pytest.raises(ValueError, match="density must be a number in"):
        adaspa(q, k, density=-0.1, block=16)
    with pytest.raises(ValueError, match="refresh_every"):
        adaspa(q, k, block=16, refresh_every=0)
    with pytest.raises(ValueError, match="lse must be"):
        adaspa(q, k, block=16, lse=jnp.zeros((1, 4, 10)))
    with pytest.raises(ValueError, match="state holds a table"):
        adaspa(q, k, block=16, state=init_state("adaspa", q, k, block=32))
