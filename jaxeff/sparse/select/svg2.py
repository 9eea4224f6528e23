"""Sparse VideoGen2: semantic-aware permutation (Yang et al., 2025, "Sparse VideoGen2: Accelerate
Video Generation with Sparse Attention via Semantic-Aware Permutation", arXiv 2505.18875).

The rule (paper Sec. 4):

1. k-means per head on the queries (``q_clusters`` = C_q) and on the keys (``k_clusters`` = C_k),
   a fixed number of Lloyd iterations (``iters``), warm-started from the previous call's
   centroids (``state``: consecutive denoising steps have similar q/k). Cold start: the centroids
   are the tokens at evenly spaced positions (deterministic, jit-friendly).
2. Centroid block scores weighted by cluster size (Sec. 4.2): for query cluster i and key
   cluster j, ``P_ij = |K_j| exp(c^q_i . c^k_j * scale) / sum_j' |K_j'| exp(c^q_i . c^k_j' * scale)``,
   the attention mass the centroids predict for the cluster pair (a key cluster of n tokens near
   its centroid contributes about n times one token's weight).
3. Top-p per query cluster (Sec. 4.2, Eq. for the dynamic budget): the fewest key clusters whose
   P reaches ``threshold`` = p (default 0.9), and at least ``min_fraction`` (default 10%) of the
   key clusters. ``density`` = d instead keeps the top ceil(d * C_k) key clusters (same minimum).
4. Permutation: argsort of the cluster labels (stable), applied to Q per query head and to K/V
   per kv head; attention runs in that order and the output is permuted back.

Variable-size clusters onto fixed blocks (the kernels tile in fixed blocks; the paper's own
kernel takes variable ones): in the permuted order a cluster is a contiguous run of tokens, so
the cluster-pair mask is a mask of variable-size rectangles. We cover it with the fixed blocks
that intersect a selected rectangle (:func:`cluster_table`): a block is computed when any
(query cluster, key cluster) pair it overlaps is selected. Nothing is dropped (the cover is a
superset of the paper's mask, so the error can only be lower), the cost is density: blocks
straddling cluster boundaries are computed whole. :func:`cluster_densities` measures it against
the exact variable-block density, and against the other mapping (padding every cluster to a
whole number of blocks, which grows the sequence by up to C * (block - 1) tokens and so cannot
have a static shape). Padding is not implemented.

GQA: key clusters (and the key permutation) are per kv head and shared by the G query heads of
the group; query clusters are per query head (see ``common``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.sparse.block_mask import BlockMask
from jaxeff.sparse.select.common import (Permutation, check_block, check_int, check_knobs, check_qk,
                                         to_block_mask, top_k_rows, top_p_rows)

DEFAULTS = dict(q_clusters=300, k_clusters=1000, top_p=0.9, min_fraction=0.1, iters=10, block=64)
WHERE = "svg2"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SVG2State:
    """Centroids to warm-start the next call; ``warm`` False means start cold."""
    q_centroids: jax.Array  # [B, H, Cq, D] float32
    k_centroids: jax.Array  # [B, K, Ck, D] float32
    warm: jax.Array  # [] bool


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Clusters:
    """Everything SVG2 decides, before it becomes blocks."""
    q_labels: jax.Array  # [B, H, T] int32
    k_labels: jax.Array  # [B, K, S] int32
    q_sizes: jax.Array  # [B, H, Cq] int32
    k_sizes: jax.Array  # [B, K, Ck] int32
    probs: jax.Array  # [B, H, Cq, Ck] float32: size-weighted centroid attention
    selected: jax.Array  # [B, H, Cq, Ck] bool
    q_centroids: jax.Array  # [B, H, Cq, D]
    k_centroids: jax.Array  # [B, K, Ck, D]


def strided_init(x_BxHxNxD: jax.Array, n_clusters: int) -> jax.Array:
    """The cold-start centroids: tokens at positions floor(c * N / C), c = 0..C-1."""
    n = x_BxHxNxD.shape[-2]
    return x_BxHxNxD[..., (np.arange(n_clusters) * n) // n_clusters, :].astype(jnp.float32)


def assign(x: jax.Array, centroids: jax.Array) -> jax.Array:
    """Nearest centroid (squared Euclidean; the first on ties): [..., N] int32."""
    d2 = (jnp.sum(centroids * centroids, -1)[..., None, :]
          - 2 * jnp.einsum("...nd,...cd->...nc", x, centroids, precision=jax.lax.Precision.HIGHEST))
    return jnp.argmin(d2, axis=-1).astype(jnp.int32)


def _update(x, labels, centroids):
    """Means of the assigned points; an empty cluster keeps its centroid."""
    c = centroids.shape[-2]
    flat_x = x.reshape(-1, *x.shape[-2:])
    flat_l = labels.reshape(-1, labels.shape[-1])

    def one(xi, li):
        sums = jnp.zeros((c, xi.shape[-1]), jnp.float32).at[li].add(xi)
        counts = jnp.zeros((c,), jnp.float32).at[li].add(1.0)
        return sums, counts

    sums, counts = jax.vmap(one)(flat_x, flat_l)
    sums = sums.reshape(centroids.shape)
    counts = counts.reshape(centroids.shape[:-1])[..., None]
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), centroids)


def kmeans(x_BxHxNxD: jax.Array, init_BxHxCxD: jax.Array, iters: int) -> tuple[jax.Array, jax.Array]:
    """Lloyd's k-means, batched over the leading axes: ``iters`` rounds of (assign, update), then
    the labels of the final centroids. Returns (centroids [..., C, D] float32, labels [..., N])."""
    x = x_BxHxNxD.astype(jnp.float32)
    c = jax.lax.fori_loop(0, iters, lambda _, c: _update(x, assign(x, c), c), init_BxHxCxD.astype(jnp.float32))
    return c, assign(x, c)


def _sizes(labels: jax.Array, n: int) -> jax.Array:
    flat = labels.reshape(-1, labels.shape[-1])
    counts = jax.vmap(lambda l: jnp.zeros((n,), jnp.int32).at[l].add(1))(flat)
    return counts.reshape(*labels.shape[:-1], n)


def svg2_clusters(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, *, density: float | None = None,
                  threshold: float | None = None, state: SVG2State | None = None,
                  q_clusters: int = DEFAULTS["q_clusters"], k_clusters: int = DEFAULTS["k_clusters"],
                  iters: int = DEFAULTS["iters"], min_fraction: float = DEFAULTS["min_fraction"],
                  scale: float | None = None) -> Clusters:
    """Steps 1-3 of the rule (module docstring): clusters, their scores and the selection."""
    b, t, h, d, s, kh = check_qk(WHERE, q_BxTxHxD, k_BxSxKxD)
    density, threshold = check_knobs(WHERE, density, threshold)
    cq = check_int(WHERE, "q_clusters", q_clusters, maximum=t)
    ck = check_int(WHERE, "k_clusters", k_clusters, maximum=s)
    iters = check_int(WHERE, "iters", iters, minimum=0)
    if isinstance(min_fraction, bool) or not 0 <= float(min_fraction) <= 1:
        raise ValueError(f"{WHERE}: min_fraction must be in [0, 1], got {min_fraction!r}")
    scale = d ** -0.5 if scale is None else scale
    xq = jnp.moveaxis(q_BxTxHxD, 1, 2)  # [B, H, T, D]
    xk = jnp.moveaxis(k_BxSxKxD, 1, 2)  # [B, K, S, D]
    init_q, init_k = strided_init(xq, cq), strided_init(xk, ck)
    if state is not None:
        if state.q_centroids.shape != init_q.shape or state.k_centroids.shape != init_k.shape:
            raise ValueError(f"{WHERE}: state holds centroids {state.q_centroids.shape} / {state.k_centroids.shape}, "
                             f"these inputs need {init_q.shape} / {init_k.shape}")
        init_q = jnp.where(state.warm, state.q_centroids, init_q)
        init_k = jnp.where(state.warm, state.k_centroids, init_k)
    cen_q, lab_q = kmeans(xq, init_q, iters)
    cen_k, lab_k = kmeans(xk, init_k, iters)
    size_q, size_k = _sizes(lab_q, cq), _sizes(lab_k, ck)

    g = h // kh
    logits = jnp.einsum("bkgcd,bked->bkgce", cen_q.reshape(b, kh, g, cq, d), cen_k,
                        precision=jax.lax.Precision.HIGHEST) * scale
    weight = jnp.log(size_k.astype(jnp.float32))[:, :, None, None, :]  # -inf for an empty cluster
    probs = jax.nn.softmax(logits + weight, axis=-1).reshape(b, h, cq, ck)
    min_keep = max(1, math.ceil(float(min_fraction) * ck))
    if density is not None:
        selected = top_k_rows(probs, max(min_keep, math.ceil(density * ck)))
    else:
        selected = top_p_rows(probs, DEFAULTS["top_p"] if threshold is None else threshold, min_keep)
    return Clusters(lab_q, lab_k, size_q, size_k, probs, selected, cen_q, cen_k)


def permutation(clusters: Clusters) -> Permutation:
    """Step 4: tokens sorted by cluster label (stable), per query head and per kv head."""
    return Permutation(jnp.argsort(clusters.q_labels, axis=-1, stable=True).astype(jnp.int32),
                       jnp.argsort(clusters.k_labels, axis=-1, stable=True).astype(jnp.int32))


def _presence(sorted_labels: jax.Array, n_clusters: int, block: int) -> jax.Array:
    """[..., nBlocks, C] bool: which clusters each block of the sorted sequence holds."""
    n = sorted_labels.shape[-1]
    nb = -(-n // block)
    blk = jnp.arange(n) // block
    flat = sorted_labels.reshape(-1, n)
    out = jax.vmap(lambda l: jnp.zeros((nb, n_clusters), bool).at[blk, l].set(True))(flat)
    return out.reshape(*sorted_labels.shape[:-1], nb, n_clusters)


def cluster_table(clusters: Clusters, block_q: int, block_kv: int) -> jax.Array:
    """[B, H, nQ, nK] bool in the permuted order: the fixed blocks that intersect a selected
    (query cluster, key cluster) rectangle (the cover described in the module docstring)."""
    b, h, cq, ck = clusters.selected.shape
    kh = clusters.k_labels.shape[1]
    pq = _presence(jnp.sort(clusters.q_labels, axis=-1), cq, block_q).astype(jnp.float32)  # [B, H, nQ, Cq]
    pk = _presence(jnp.sort(clusters.k_labels, axis=-1), ck, block_kv).astype(jnp.float32)  # [B, K, nK, Ck]
    reach = jnp.einsum("bhqc,bhce->bhqe", pq, clusters.selected.astype(jnp.float32))  # [B, H, nQ, Ck]
    nq = reach.shape[2]
    table = jnp.einsum("bkgqe,bkje->bkgqj", reach.reshape(b, kh, h // kh, nq, ck), pk) > 0
    return table.reshape(b, h, nq, pk.shape[2])


def cluster_mask(clusters: Clusters) -> jax.Array:
    """[B, H, T, S] bool, the paper's variable-block mask in the permuted order (tests and the
    experiments' density accounting; materialises T x S)."""
    b, h = clusters.q_labels.shape[:2]
    kh = clusters.k_labels.shape[1]
    lq = jnp.sort(clusters.q_labels, axis=-1)  # [B, H, T]
    lk = jnp.repeat(jnp.sort(clusters.k_labels, axis=-1), h // kh, axis=1)  # [B, H, S]
    rows = jnp.take_along_axis(clusters.selected, lq[..., None], axis=2)  # [B, H, T, Ck]
    return jnp.take_along_axis(rows, jnp.broadcast_to(lk[:, :, None, :], (*rows.shape[:3], lk.shape[-1])), axis=3)


def cluster_densities(clusters: Clusters, block_q: int, block_kv: int) -> dict[str, jax.Array]:
    """What the mapping onto fixed blocks costs (module docstring): ``variable``, the fraction
    of the T x S elements the paper's variable-size blocks compute; ``cover``, the fraction of
    fixed blocks our BlockMask computes (the cost we pay); ``padded``, what padding each
    cluster to whole blocks would compute, in blocks of the unpadded sequence."""
    b, h, cq, ck = clusters.selected.shape
    kh = clusters.k_labels.shape[1]
    t, s = clusters.q_labels.shape[-1], clusters.k_labels.shape[-1]
    nq_i = clusters.q_sizes.astype(jnp.float32)  # [B, H, Cq]
    nk_j = jnp.repeat(clusters.k_sizes.astype(jnp.float32), h // kh, axis=1)  # [B, H, Ck]
    sel = clusters.selected.astype(jnp.float32)
    variable = jnp.einsum("bhi,bhij,bhj->", nq_i, sel, nk_j) / (b * h * t * s)
    padded_blocks = jnp.einsum("bhi,bhij,bhj->", jnp.ceil(nq_i / block_q), sel, jnp.ceil(nk_j / block_kv))
    padded = padded_blocks / (b * h * (-(-t // block_q)) * (-(-s // block_kv)))
    cover = cluster_table(clusters, block_q, block_kv).mean()
    return {"variable": variable, "cover": cover, "padded": padded}


def svg2(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, *, density: float | None = None,
         threshold: float | None = None, state: SVG2State | None = None, block=DEFAULTS["block"],
         q_clusters: int = DEFAULTS["q_clusters"], k_clusters: int = DEFAULTS["k_clusters"],
         iters: int = DEFAULTS["iters"], min_fraction: float = DEFAULTS["min_fraction"],
         scale: float | None = None) -> tuple[BlockMask, Permutation, SVG2State]:
    """SVG2's BlockMask (in the permuted order), the permutation, and the centroids for the next
    call. ``threshold`` = top-p (default 0.9) or ``density`` = top fraction of key clusters per
    query cluster; at least ``min_fraction`` of them either way."""
    b, t, h, d, s, kh = check_qk(WHERE, q_BxTxHxD, k_BxSxKxD)
    bq, bk = check_block(WHERE, block, t, s)
    cl = svg2_clusters(q_BxTxHxD, k_BxSxKxD, density=density, threshold=threshold, state=state,
                       q_clusters=q_clusters, k_clusters=k_clusters, iters=iters, min_fraction=min_fraction,
                       scale=scale)
    table = cluster_table(cl, bq, bk)
    new_state = SVG2State(cl.q_centroids, cl.k_centroids, jnp.asarray(True))
    return to_block_mask(table, bq, bk, t, s), permutation(cl), new_state


def init_state(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, *, q_clusters: int = DEFAULTS["q_clusters"],
               k_clusters: int = DEFAULTS["k_clusters"], **_) -> SVG2State:
    """A cold state of the right shapes (so a jitted loop sees one state structure from call 1)."""
    b, t, h, d, s, kh = check_qk(WHERE, q_BxTxHxD, k_BxSxKxD)
    return SVG2State(jnp.zeros((b, h, q_clusters, d), jnp.float32), jnp.zeros((b, kh, k_clusters, d), jnp.float32),
                     jnp.asarray(False))
