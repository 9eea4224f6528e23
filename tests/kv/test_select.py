"""The shared eviction machinery: top-budget with protection (per head and AdaKV head-wise)
against numpy, compaction keeps slot order and moves per-slot state, merge arithmetic, budgets."""

import numpy as np
import jax.numpy as jnp
import pytest

from jaxeff.kv import Budget
from jaxeff.kv.select import compact, descending_rank, keep_top, merge_mean

from .helpers import kept_positions, np_keep, random_layer


def test_descending_rank_ties_go_to_the_lower_slot():
    r = np.asarray(descending_rank(jnp.asarray([[1.0, 3.0, 3.0, 0.5, 3.0]])))
    np.testing.assert_array_equal(r, [[3, 0, 1, 4, 2]])


@pytest.mark.parametrize("gaps", [False, True])
def test_keep_top_matches_numpy_with_protection_and_ragged_counts(gaps):
    rng = np.random.default_rng(0)
    layer, _ = random_layer(rng, b=2, kh=3, c=20, counts=((15, 11, 15), (7, 7, 3)), gaps=gaps)
    scores = rng.normal(size=(2, 3, 20)).astype(np.float32)
    scores[0, 0, 3] = scores[0, 0, 5]  # a tie
    protect = rng.random((2, 3, 20)) < 0.2
    budget = np.asarray([6, 4])
    keep = keep_top(jnp.asarray(scores), layer.valid, jnp.asarray(protect), jnp.asarray(budget))
    out, _ = compact(layer, keep)
    pos = np.asarray(layer.positions)
    for i in range(2):
        for h in range(3):
            assert kept_positions(out, i, h) == np_keep(scores[i, h], pos[i, h], protect[i, h], budget[i])
    np.testing.assert_array_equal(np.asarray(out.counts), np.asarray(keep).sum(-1))
    # fewer protected slots than the budget: exactly the budget (or all there is) per head
    counts = np.asarray(out.counts)
    assert counts[1, 2] == 3 and counts[0, 0] >= 6


def test_headwise_allocation_matches_numpy_adakv():
    """AdaKV: each head keeps its top floor(0.2 * budget) first, then the layer's K * budget best
    scores over all heads; heads end with different counts, the total is K * budget."""
    rng = np.random.default_rng(1)
    layer, _ = random_layer(rng, b=1, kh=3, c=24, counts=((20, 20, 20),))
    scores = rng.random((1, 3, 24)).astype(np.float32)
    scores[0, 1] *= 4  # head 1 is the most important: it should get more than its share
    budget = 5
    keep = np.asarray(keep_top(jnp.asarray(scores), layer.valid, jnp.zeros((1, 3, 24), bool),
                               jnp.asarray([budget]), headwise=True, safeguard=0.2))
    valid = np.asarray(layer.valid)[0]
    guard = int(np.floor(0.2 * budget))
    entries = []
    for h in range(3):
        idx = [s for s in np.flatnonzero(valid[h])]
        top = sorted(idx, key=lambda s: (-scores[0, h, s], s))[:guard]
        for s in idx:
            entries.append((np.inf if s in top else scores[0, h, s], h * 24 + s))
    chosen = sorted(entries, key=lambda e: (-e[0], e[1]))[: 3 * budget]
    expect = np.zeros(72, bool)
    expect[[e[1] for e in chosen]] = True
    np.testing.assert_array_equal(keep[0].reshape(-1), expect)
    assert keep.sum() == 3 * budget and keep[0, 1].sum() > budget and keep[0].sum(-1).min() >= guard


def test_compact_moves_slot_state_and_empties_the_rest():
    rng = np.random.default_rng(2)
    layer, _ = random_layer(rng, b=1, kh=2, c=8, counts=((6, 6),))
    keep = jnp.asarray([[[1, 0, 1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0]]], bool)
    state = {"acc": jnp.arange(16, dtype=jnp.float32).reshape(1, 2, 8) + 1}
    out, st = compact(layer, keep, state, {"acc": -7.0})
    np.testing.assert_array_equal(np.asarray(out.positions[0, 0]), [0, 2, 3, 5, -1, -1, -1, -1])
    np.testing.assert_array_equal(np.asarray(st["acc"][0, 1]), [13, 14, -7, -7, -7, -7, -7, -7])
    np.testing.assert_array_equal(np.asarray(out.k[0, 0, 1]), np.asarray(layer.k[0, 0, 2]))
    assert not np.asarray(out.v[0, 1, 2:]).any()
    np.testing.assert_array_equal(np.asarray(out.counts), [[4, 2]])


def test_merge_mean_arithmetic():
    """x_c <- (x_c + sum_e w_e x_e) / (1 + n_c), keys and values alike; others unchanged."""
    rng = np.random.default_rng(3)
    layer, _ = random_layer(rng, b=1, kh=1, c=6, d=3, counts=((6,),))
    dest = jnp.asarray([[[6, 0, 0, 6, 3, 6]]])  # slots 1, 2 into 0; slot 4 into 3; 6: none
    w = jnp.asarray([[[0.0, 0.5, 2.0, 0.0, 0.25, 0.0]]])
    out = merge_mean(layer, dest, w)
    k = np.asarray(layer.k[0, 0])
    got = np.asarray(out.k[0, 0])
    np.testing.assert_allclose(got[0], (k[0] + 0.5 * k[1] + 2.0 * k[2]) / 3, rtol=1e-6)
    np.testing.assert_allclose(got[3], (k[3] + 0.25 * k[4]) / 2, rtol=1e-6)
    np.testing.assert_allclose(got[[1, 2, 4, 5]], k[[1, 2, 4, 5]], rtol=1e-6)
    v = np.asarray(layer.v[0, 0])
    np.testing.assert_allclose(np.asarray(out.v[0, 0, 3]), (v[3] + 0.25 * v[4]) / 2, rtol=1e-6)


def test_budget_tokens_and_layer_schedule():
    lengths = jnp.asarray([100, 7])
    np.testing.assert_array_equal(np.asarray(Budget(0.25).tokens(lengths)), [25, 1])
    np.testing.assert_array_equal(np.asarray(Budget(10).tokens(lengths)), [10, 10])
    per = Budget(0.5, layers=(1.0, 3.0)).per_layer(jnp.asarray([40]), 2)
    assert [int(x[0]) for x in per] == [20, 60]
    assert Budget(0.5, layers=(1.0, 3.0)).max_tokens(100) == 75


@pytest.mark.parametrize("bad", [0, -3, 0.0, 1.5, float("nan"), True, "half"])
def test_bad_budgets_raise_naming_the_budget(bad):
    with pytest.raises(ValueError, match="budget"):
        Budget(bad)
