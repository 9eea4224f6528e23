"""What the block selectors share: input checks, permutations of tokens, per-row top-k / top-p
selection under a budget, sink / diagonal keeping, and the conversion of a block table into a
:class:`~jaxeff.sparse.BlockMask`.

Conventions (jaxeff's): q ``[B, T, H, D]``, k ``[B, S, K, D]`` with H = K * G (GQA: query head
h reads key/value head h // G). Scores over blocks are computed per kv group from q viewed as
``[B, T, K, G, D]``, never by repeating K. A block table is ``[B, H, nQ, nK]`` bool (one row per
query head: the kernel reads K/V once per kv head whatever the query head's mask).

Permutations (:class:`Permutation`): ``q [B, H, T]`` reorders each query head's tokens,
``kv [B, K, S]`` each kv head's keys and values. Keys are permuted per kv head, not per query
head: a per-query-head key order would need K/V gathered (and stored) once per query head, G
times the memory. So the G query heads of a group share their key order; their query orders may
differ (SVG2 clusters queries per query head), since q is gathered per head anyway.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.sparse.block_mask import BlockMask, check_block_size, create_block_mask
from jaxeff.sparse.masks import and_masks, causal as causal_mask, from_blocks


# --- Checks ---------------------------------------------------------------------------------------

def check_qk(where: str, q, k) -> tuple[int, int, int, int, int, int]:
    """(B, T, H, D, S, K) of q [B, T, H, D] and k [B, S, K, D]; ``ValueError`` naming the argument."""
    for name, x in (("q", q), ("k", k)):
        if not hasattr(x, "shape") or len(x.shape) != 4:
            raise ValueError(f"{where}: {name} must be [batch, seq, heads, head_dim], got shape "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{where}: {name} must be a floating-point array, got {x.dtype}")
    b, t, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"{where}: k must be [batch={b}, seq, kv_heads, head_dim={d}] like q, got {tuple(k.shape)}")
    if h % k.shape[2]:
        raise ValueError(f"{where}: q's heads ({h}) must be a multiple of k's heads ({k.shape[2]})")
    return b, t, h, d, k.shape[1], k.shape[2]


def check_fraction(where: str, name: str, x, *, allow_none: bool = True):
    """A Python number in (0, 1] (or None)."""
    if x is None and allow_none:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float, np.floating, np.integer)) or not 0 < float(x) <= 1:
        raise ValueError(f"{where}: {name} must be a number in (0, 1]" + (" or None" if allow_none else "")
                         + f", got {x!r}")
    return float(x)


def check_int(where: str, name: str, x, *, minimum: int = 1, maximum: int | None = None) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < minimum or (maximum is not None
                                                                                      and x > maximum):
        rng = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{where}: {name} must be an integer {rng}, got {x!r}")
    return int(x)


def check_block(where: str, block, t: int, s: int) -> tuple[int, int]:
    """``block`` = int or (block_q, block_kv): powers of two as ``create_block_mask`` wants."""
    bq, bk = (block, block) if not isinstance(block, (tuple, list)) else tuple(block)
    try:
        check_block_size("block_q", bq, t)
        check_block_size("block_kv", bk, s)
    except ValueError as e:
        raise ValueError(f"{where}: block: {e}") from None
    return bq, bk


def check_knobs(where: str, density, threshold, *, takes_density: bool = True, takes_threshold: bool = True):
    """At most one of ``density`` / ``threshold``, each in (0, 1], and only the ones the method takes."""
    density = check_fraction(where, "density", density)
    threshold = check_fraction(where, "threshold", threshold)
    if density is not None and threshold is not None:
        raise ValueError(f"{where}: pass density or threshold, not both (got density={density}, "
                         f"threshold={threshold})")
    if density is not None and not takes_density:
        raise ValueError(f"{where}: density is not a knob of this method (it takes threshold)")
    if threshold is not None and not takes_threshold:
        raise ValueError(f"{where}: threshold is not a knob of this method (it takes density)")
    return density, threshold


def check_grid(where: str, grid, t: int) -> tuple[int, int, int]:
    """(frames, height, width) with frames * height * width == T."""
    if not isinstance(grid, (tuple, list)) or len(grid) != 3 or any(
            isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1 for g in grid):
        raise ValueError(f"{where}: grid must be (frames, height, width) positive integers, got {grid!r}")
    f, hh, ww = (int(g) for g in grid)
    if f * hh * ww != t:
        raise ValueError(f"{where}: grid {tuple(grid)} holds {f * hh * ww} tokens but the sequence has {t}")
    return f, hh, ww


# --- Permutations ---------------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Permutation:
    """Token orders: attention runs on ``q[b, perm.q[b, h, t], h]`` and ``k/v[b, perm.kv[b, g, s], g]``
    (position t of the permuted sequence holds original token ``perm.q[b, h, t]``)."""
    q: jax.Array  # [B, H, T] int32
    kv: jax.Array  # [B, K, S] int32

    def inverse(self) -> Permutation:
        return Permutation(invert(self.q), invert(self.kv))


def invert(perm: jax.Array) -> jax.Array:
    """The inverse permutation along the last axis: ``inv[perm[i]] = i``."""
    return jnp.argsort(perm, axis=-1).astype(jnp.int32)


def _gather_tokens(x_BxTxHxD: jax.Array, perm_BxHxT: jax.Array) -> jax.Array:
    """x[b, perm[b, h, t], h] -> [B, T, H, D]."""
    idx = jnp.swapaxes(perm_BxHxT, 1, 2)[..., None]  # [B, T, H, 1]
    return jnp.take_along_axis(x_BxTxHxD, idx, axis=1)


def permute(q: jax.Array, k: jax.Array, v: jax.Array, perm: Permutation | None):
    """q, k, v in the permuted order (unchanged for ``perm=None``)."""
    if perm is None:
        return q, k, v
    return _gather_tokens(q, perm.q), _gather_tokens(k, perm.kv), _gather_tokens(v, perm.kv)


def unpermute(o_BxTxHxD: jax.Array, perm: Permutation | None) -> jax.Array:
    """Attention outputs back in the original token order (the inverse of the query permutation)."""
    if perm is None:
        return o_BxTxHxD
    return _gather_tokens(o_BxTxHxD, invert(perm.q))


def shared_query_perm(kv_perm_BxKxT: jax.Array, heads: int) -> jax.Array:
    """[B, K, T] -> [B, H, T]: each query head takes its kv head's order (self-attention)."""
    b, kh, t = kv_perm_BxKxT.shape
    return jnp.repeat(kv_perm_BxKxT, heads // kh, axis=1)


# --- Selection ------------------------------------------------------------------------------------

def ranks(x: jax.Array) -> jax.Array:
    """Descending rank along the last axis (0 = largest; ties by position)."""
    order = jnp.argsort(-x, axis=-1, stable=True)
    return invert(order.astype(jnp.int32))


def top_k_rows(scores: jax.Array, k: int) -> jax.Array:
    """bool, True for the ``k`` largest entries of each row (last axis)."""
    return ranks(scores) < k


def top_p_rows(probs: jax.Array, p: float, min_keep: int = 1) -> jax.Array:
    """bool: per row (last axis), the fewest largest entries whose sum reaches ``p`` of the row's
    total, and at least the ``min_keep`` largest. An entry is kept when the mass of the entries
    ranked above it is still below p (so the kept set is the smallest prefix reaching p)."""
    order = jnp.argsort(-probs, axis=-1, stable=True)
    sorted_p = jnp.take_along_axis(probs, order, axis=-1)
    total = sorted_p.sum(-1, keepdims=True)
    before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
    rank = jnp.arange(probs.shape[-1])
    keep_sorted = (before < p * total) | (rank < min_keep)
    return jnp.take_along_axis(keep_sorted, invert(order.astype(jnp.int32)), axis=-1)


BUDGETS = ("row", "head", "global")


def budget_select(scores_BxHxQxK: jax.Array, density: float, *, budget: str = "head",
                  allowed: np.ndarray | None = None, where: str = "select") -> jax.Array:
    """The blocks with the largest scores under a block budget of ``density`` times the allowed
    blocks: ``row``: the top round(density * nK) of every row; ``head``: the top
    round(density * nQ * nK) of each (batch, head), taken across its rows (rows with spread mass
    take more, every row at least its best block); ``global``: the same over all heads of a batch
    row (heads with concentrated attention give their budget to others). ``allowed`` [nQ, nK]
    (static numpy, e.g. the causal blocks) bounds the candidates and is the budget's denominator."""
    if budget not in BUDGETS:
        raise ValueError(f"{where}: budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    b, h, nq, nk = scores_BxHxQxK.shape
    x = scores_BxHxQxK.astype(jnp.float32)
    n_allowed = nq * nk
    if allowed is not None:
        allowed = np.asarray(allowed, bool)  # static: the budget is a Python int
        n_allowed = int(allowed.sum())
        x = jnp.where(jnp.asarray(allowed), x, -jnp.inf)
    if budget == "row":
        pick = top_k_rows(x, max(1, round(density * n_allowed / nq)))
    elif budget == "head":
        n = max(1, round(density * n_allowed))
        pick = (ranks(x.reshape(b, h, nq * nk)) < n).reshape(x.shape)
    else:
        n = max(1, round(density * n_allowed * h))
        pick = (ranks(x.reshape(b, h * nq * nk)) < n).reshape(x.shape)
    pick = pick | top_k_rows(x, 1)  # no query block left without keys
    return pick if allowed is None else pick & jnp.asarray(allowed)


def causal_blocks(nq: int, nk: int, bq: int, bk: int) -> np.ndarray:
    """[nQ, nK] bool: blocks holding some (q, kv) with kv <= q (static)."""
    i, j = np.arange(nq)[:, None], np.arange(nk)[None, :]
    return j * bk <= (i + 1) * bq - 1


def keep_sink_and_diagonal(table: jax.Array, bq: int, bk: int, *, sink: bool = True, diagonal: bool = True):
    """Adds the first key block (attention sinks) and the diagonal blocks (each query block's
    own keys: the block holding key index = query index)."""
    nq, nk = table.shape[-2:]
    extra = np.zeros((nq, nk), bool)
    if sink:
        extra[:, 0] = True
    if diagonal:
        for i in range(nq):
            lo, hi = i * bq, min((i + 1) * bq, nk * bk) - 1
            extra[i, lo // bk:hi // bk + 1] = True
    return table | jnp.asarray(extra)


def to_block_mask(table_BxHxQxK: jax.Array, block_q: int, block_kv: int, q_len: int, kv_len: int, *,
                  causal: bool = False) -> BlockMask:
    """The BlockMask of a block table (``from_blocks`` + ``create_block_mask``): full and empty
    blocks only, except causal's diagonal blocks (an index mask the kernels evaluate in place)."""
    b, h = table_BxHxQxK.shape[:2]
    fn = from_blocks(table_BxHxQxK, block_q, block_kv)
    if causal:
        fn = and_masks(fn, causal_mask())
    return create_block_mask(fn, b, h, q_len, kv_len, block_q=block_q, block_kv=block_kv)


def table_density(table_BxHxQxK: jax.Array, allowed: np.ndarray | None = None) -> jax.Array:
    """Fraction of the blocks a table computes, out of the ``allowed`` ones (all by default)."""
    if allowed is None:
        return table_BxHxQxK.mean()
    allowed = np.asarray(allowed, bool)
    b, h = table_BxHxQxK.shape[:2]
    return (table_BxHxQxK & jnp.asarray(allowed)).sum() / (allowed.sum() * b * h)


# --- Scores ---------------------------------------------------------------------------------------

def log_sum_exp(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, *, scale: float | None = None, causal: bool = False,
                block_q: int = 128) -> jax.Array:
    """The log-sum-exp [B, H, T] float32 of softmax attention (natural log), one query block at a
    time (lax.map): memory holds [block_q, S] scores, never [T, S]. GQA without repeating K."""
    b, t, h, d = q_BxTxHxD.shape
    s, kh = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
    g = h // kh
    scale = d ** -0.5 if scale is None else scale
    bq = min(block_q, t)
    nq = -(-t // bq)
    qp = jnp.pad(q_BxTxHxD, ((0, 0), (0, nq * bq - t), (0, 0), (0, 0))).reshape(b, nq, bq, kh, g, d)
    kv_idx = jnp.arange(s)

    def row(i):
        sc = jnp.einsum("bqkgd,bskd->bkgqs", qp[:, i], k_BxSxKxD, precision=jax.lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32) * scale
        if causal:
            q_idx = i * bq + jnp.arange(bq)
            sc = jnp.where(kv_idx[None, :] <= q_idx[:, None], sc, -jnp.inf)
        return jax.nn.logsumexp(sc, axis=-1)  # [B, K, G, bq]

    out = jax.lax.map(row, jnp.arange(nq))  # [nQ, B, K, G, bq]
    return jnp.moveaxis(out, 0, 3).reshape(b, h, nq * bq)[..., :t]


def grouped(q_BxTxHxD: jax.Array, kv_heads: int) -> jax.Array:
    """q as [B, T, K, G, D]."""
    b, t, h, d = q_BxTxHxD.shape
    return q_BxTxHxD.reshape(b, t, kv_heads, h // kv_heads, d)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def n_blocks(length: int, block: int) -> int:
    return math.ceil(length / block)
