"""PARO: the axis-order permutations of a grid, the calibration choosing the order that makes a
head's attention block-concentrated (temporal and spatial heads built by hand), the static mask
against the rule, reuse of the calibrated state, GQA, and bad grids."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.sparse.select import init_state, paro, paro_calibrate, select
from jaxeff.sparse.select.paro import ORDER_NAMES, ORDERS, order_permutation
from tests.sparse.select.helpers import block_sum, probs, qk, states

GRID = (4, 4, 4)  # frames, height, width: 64 tokens, a frame is one block of 16


def test_order_permutations():
    grid = (2, 3, 4)
    ident = order_permutation(grid, (0, 1, 2))
    np.testing.assert_array_equal(ident, np.arange(24))
    hwf = order_permutation(grid, (1, 2, 0))
    # H-W-F: the frames of pixel (0, 0) first, then pixel (0, 1), ...
    np.testing.assert_array_equal(hwf[:4], [0, 12, 1, 13])
    f, h, w = np.unravel_index(hwf, grid)
    assert (np.diff(h) >= 0).all() and ((np.diff(w) >= 0) | (np.diff(h) > 0)).all()
    assert len(ORDERS) == 6 and ORDER_NAMES[0] == "FHW" and sorted(ORDER_NAMES) == sorted(set(ORDER_NAMES))


def hand_made_heads(strength=8.0):
    """kv head 0 temporal (same pixel, any frame), kv head 1 spatial (same frame); 2 query heads each."""
    f, h, w = np.unravel_index(np.arange(64), GRID)
    pixel = np.eye(16)[h * 4 + w]  # [64, 16]
    frame = np.eye(16)[f]
    q = np.stack([pixel, pixel, frame, frame], axis=1)[None] * strength  # [1, 64, 4, 16]
    k = np.stack([pixel, frame], axis=1)[None] * strength
    return jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)


def test_calibration_chooses_the_concentrating_order():
    q, k = hand_made_heads()
    state = paro_calibrate(q, k, grid=GRID, density=0.25, block=16)
    names = [ORDER_NAMES[int(o)] for o in state.order]
    # temporal head: any order without frames outermost puts the frames of a pixel in one block
    # (H-W-F, W-H-F, and here also H-F-W, W-F-H: a block of 16 = one row over all frames)
    assert names[0][0] != "F"
    assert names[1][0] == "F"  # spatial head: frames outermost keep each frame whole
    scores = np.asarray(state.scores)
    assert scores.max(-1) == pytest.approx(1.0, abs=1e-4)  # all the mass inside the diagonal blocks
    assert scores[0, ORDER_NAMES.index("FHW")] < 0.7  # the temporal head is spread in F-H-W order
    np.testing.assert_array_equal(np.asarray(state.table)[0], np.broadcast_to(np.eye(4, dtype=bool), (4, 4, 4)))


def test_static_mask_follows_the_rule_on_random_inputs():
    q, k, _ = qk(t=64, h=4, kh=2, seed=7, scale=2.0)
    bm, perm, state = paro(q, k, grid=GRID, density=0.3, block=16)
    n = round(0.3 * 16)
    p = probs(q, k)[0]  # [H, T, S]
    for h in range(4):
        order = ORDERS[int(state.order[h // 2])]
        pi = order_permutation(GRID, order)
        np.testing.assert_array_equal(np.asarray(perm.q[0, h]), pi)
        mass = block_sum(p[h][pi][:, pi], 16, 16)
        want = np.zeros(16, bool)
        want[np.argsort(-mass.ravel(), kind="stable")[:n]] = True
        want = want.reshape(4, 4) | (mass == mass.max(-1, keepdims=True)) | np.eye(4, dtype=bool)
        np.testing.assert_array_equal(states(bm)[0, h] == 2, want)
    # the order is the best of the six by captured mass, per kv head
    assert (np.asarray(state.scores).argmax(-1) == np.asarray(state.order)).all()


def test_calibrated_state_is_reused_and_jit_calibrates_once():
    q, k = hand_made_heads()
    bm, perm, state = paro(q, k, grid=GRID, density=0.25, block=16)
    q2, k2, _ = qk(t=64, h=4, kh=2, seed=9)
    bm2, perm2, state2 = paro(q2, k2, grid=GRID, state=state, block=16)
    np.testing.assert_array_equal(states(bm2), states(bm))
    np.testing.assert_array_equal(perm2.kv, perm.kv)
    traces = []

    @jax.jit
    def step(q, k, st):
        traces.append(1)
        bm, perm, st = select(q, k, method="paro", grid=GRID, density=0.25, block=16, state=st)
        return bm.block_states(), perm.kv, st

    s0 = init_state("paro", q, k, grid=GRID, block=16)
    got, kv, s1 = step(q, k, s0)  # uncalibrated: calibrates here
    np.testing.assert_array_equal(got, states(bm))
    got2, _, s2 = step(q2, k2, s1)  # calibrated: reused
    np.testing.assert_array_equal(got2, got)
    assert len(traces) == 1 and bool(s2.calibrated)


def test_threshold_mode_and_errors():
    q, k = hand_made_heads()
    state = paro_calibrate(q, k, grid=GRID, threshold=0.9, block=16)
    assert np.asarray(state.table).sum() == 16  # 0.9 of the mass sits in the diagonal blocks
    with pytest.raises(ValueError, match="grid \\(4, 4, 2\\) holds 32 tokens but the sequence has 64"):
        paro(q, k, grid=(4, 4, 2), block=16)
    with pytest.raises(ValueError, match="self-attention"):
        paro_calibrate(q, k[:, :32], grid=GRID, block=16)
    with pytest.raises(ValueError, match="density"):
        paro(q, k, grid=GRID, density=0.0, block=16)
