"""SVG2: k-means against numpy on fixed seeds, warm starts, top-p on the size-weighted centroid
scores (and the 10% minimum), the label-sorting permutation, the block cover of the cluster
mask, the density accounting, and bad inputs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.sparse.select import svg2 as svg2_fn
from jaxeff.sparse.select.common import permute, unpermute
from jaxeff.sparse.select.svg2 import (SVG2State, cluster_densities, cluster_mask, cluster_table, kmeans, permutation,
                                       strided_init, svg2_clusters)
from tests.sparse.select.helpers import qk, states


def numpy_kmeans(x, init, iters):
    """Lloyd's algorithm on one [N, D] set, float64, first centroid on ties, empty clusters kept."""
    c = init.astype(np.float64).copy()
    x = x.astype(np.float64)
    for _ in range(iters):
        lab = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        for j in range(len(c)):
            if (lab == j).any():
                c[j] = x[lab == j].mean(0)
    return c, ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(5, 8)) * 4
    x = centers[rng.integers(0, 5, size=(2, 3, 90))] + rng.normal(size=(2, 3, 90, 8))  # [B, H, N, D]
    init = np.asarray(strided_init(jnp.asarray(x), 6))
    cen, lab = kmeans(jnp.asarray(x, jnp.float32), jnp.asarray(init), iters=7)
    for b in range(2):
        for h in range(3):
            want_c, want_l = numpy_kmeans(x[b, h], init[b, h], 7)
            np.testing.assert_array_equal(np.asarray(lab[b, h]), want_l)
            np.testing.assert_allclose(np.asarray(cen[b, h]), want_c, rtol=1e-4, atol=1e-4)


def test_warm_start_starts_from_the_given_centroids():
    q, k, _ = qk(t=64)
    _, _, state = svg2_fn(q, k, q_clusters=4, k_clusters=8, block=16, iters=5)
    assert bool(state.warm)
    again = svg2_clusters(q, k, q_clusters=4, k_clusters=8, iters=0, state=state)
    np.testing.assert_array_equal(again.q_centroids, state.q_centroids)
    np.testing.assert_array_equal(again.k_centroids, state.k_centroids)
    cold = svg2_clusters(q, k, q_clusters=4, k_clusters=8, iters=0)
    np.testing.assert_array_equal(cold.q_centroids, strided_init(jnp.moveaxis(q, 1, 2), 4))
    # a converged state is a fixed point: more iterations change nothing
    more = svg2_clusters(q, k, q_clusters=4, k_clusters=8, iters=50, state=state)
    converged = SVG2State(more.q_centroids, more.k_centroids, jnp.asarray(True))
    again = svg2_clusters(q, k, q_clusters=4, k_clusters=8, iters=3, state=converged)
    np.testing.assert_allclose(again.q_centroids, more.q_centroids, atol=1e-5)
    np.testing.assert_array_equal(again.k_labels, more.k_labels)


def test_top_p_on_size_weighted_centroid_scores():
    q, k, _ = qk(t=96, h=4, kh=2, seed=3, scale=1.5)
    for p in (0.5, 0.9):
        cl = svg2_clusters(q, k, q_clusters=6, k_clusters=20, iters=4, threshold=p, min_fraction=0.0)
        cq, ck = np.asarray(cl.q_centroids, np.float64), np.asarray(cl.k_centroids, np.float64)
        sizes = np.asarray(cl.k_sizes, np.float64)
        logits = np.einsum("bhcd,bhed->bhce", cq, np.repeat(ck, 2, axis=1)) / 4.0
        w = np.repeat(sizes, 2, axis=1)[:, :, None, :] * np.exp(logits)
        want = w / w.sum(-1, keepdims=True)  # P_ij = |K_j| exp(s_ij) / sum_j' |K_j'| exp(s_ij')
        np.testing.assert_allclose(np.asarray(cl.probs), want, rtol=1e-4, atol=1e-6)
        sel = np.asarray(cl.selected)
        mass = (want * sel).sum(-1)
        assert (mass >= p - 1e-5).all()  # top-p meets p on the centroid scores
        smallest = np.where(sel, want, np.inf).min(-1)
        assert (mass - smallest < p + 1e-5).all()  # and takes no more clusters than needed
    low = svg2_clusters(q, k, q_clusters=6, k_clusters=20, iters=4, threshold=0.01)
    assert (np.asarray(low.selected).sum(-1) >= 2).all()  # at least 10% of the 20 key clusters
    dens = svg2_clusters(q, k, q_clusters=6, k_clusters=20, iters=4, density=0.25)
    assert (np.asarray(dens.selected).sum(-1) == 5).all()


def test_permutation_sorts_by_label_and_the_table_covers_the_cluster_mask():
    q, k, v = qk(t=64, h=4, kh=2, seed=4)
    cl = svg2_clusters(q, k, q_clusters=5, k_clusters=7, iters=3, threshold=0.7)
    perm = permutation(cl)
    for b, h in np.ndindex(1, 4):
        lab = np.asarray(cl.q_labels[b, h])[np.asarray(perm.q[b, h])]
        assert (np.diff(lab) >= 0).all()
    mask = np.asarray(cluster_mask(cl))  # [B, H, T, S] in the permuted order
    # element (t, s) of the permuted order: selected[label of q token perm.q[t], label of k token perm.kv[s]]
    lq = np.asarray(cl.q_labels)[0, 1][np.asarray(perm.q[0, 1])]
    lk = np.asarray(cl.k_labels)[0, 0][np.asarray(perm.kv[0, 0])]
    np.testing.assert_array_equal(mask[0, 1], np.asarray(cl.selected)[0, 1][lq][:, lk])
    table = np.asarray(cluster_table(cl, 16, 16))
    want = mask.reshape(1, 4, 4, 16, 4, 16).any((3, 5))  # a block is computed iff it meets the mask
    np.testing.assert_array_equal(table, want)
    d = {n: float(x) for n, x in cluster_densities(cl, 16, 16).items()}
    assert d["variable"] == pytest.approx(mask.mean()) and d["cover"] == pytest.approx(table.mean())
    assert d["variable"] <= d["cover"] + 1e-6


def test_svg2_block_mask_and_attention_round_trip():
    q, k, v = qk(t=64, h=4, kh=2, seed=5)
    bm, perm, state = svg2_fn(q, k, q_clusters=4, k_clusters=8, block=16, iters=3, threshold=1.0)
    assert set(np.unique(states(bm))) <= {0, 2}
    from jaxeff.sparse import block_sparse_attention
    o = unpermute(block_sparse_attention(*permute(q, k, v, perm), bm, impl="reference"), perm)
    if float(bm.block_density()) == 1.0:  # top-p 1.0 keeps everything: dense attention
        from tests.sparse.select.helpers import probs
        want = np.einsum("bhts,bshd->bthd", probs(q, k), np.repeat(np.asarray(v), 2, axis=2))
        np.testing.assert_allclose(o, want, atol=1e-5)
    assert state.q_centroids.shape == (1, 4, 4, 16) and state.k_centroids.shape == (1, 2, 8, 16)


@pytest.mark.parametrize("kwargs,match", [
    (dict(q_clusters=65), "q_clusters must be an integer in \\[1, 64\\]"),
    (dict(k_clusters=100), "k_clusters"),
    (dict(threshold=0.0), "threshold"),
    (dict(density=1.2), "density"),
    (dict(min_fraction=2.0), "min_fraction"),
    (dict(block=12), "block"),
])
def test_bad_inputs(kwargs, match):
    q, k, _ = qk(t=64)
    args = dict(q_clusters=4, k_clusters=8, block=16)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        svg2_fn(q, k, **args)
