"""Sparsity and routing-locality metrics of any router's output, as pure functions.

``a_BxTxE`` holds a layer's expert activations (0 = inactive: BlockFFN's ``A``, ReMoE's gates,
top-k gates scattered to ``[B, T, E]`` by :func:`jaxeff.moe.routers.gates_to_dense`);
``valid_BxT`` (optional) marks real tokens, padding is left out.

* :func:`tls`, token-level sparsity, and :func:`cls`, chunk-level sparsity over chunks of L
  consecutive positions (BlockFFN, Song et al., 2025, arXiv 2507.08771, section 2);
  ``cls(a, 1) == tls(a)``;
* :func:`reuse_ratio`: the share of a token's active experts its predecessor also activated;
* :func:`srp` and :func:`sch`: segment routing best performance and segment cache best hit rate
  (Liang et al., 2025, "Not All Models Suit Expert Offloading", arXiv 2505.16056), following
  the definitions of its code (ljcleo/moe-lrc).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CLS_LENGTHS = (1, 2, 4, 8, 16, 32, 64)


def _active(name: str, a_BxTxE, valid_BxT):
    if getattr(a_BxTxE, "ndim", None) != 3:
        raise ValueError(f"{name}: a_BxTxE must be [B, T, E], got shape {getattr(a_BxTxE, 'shape', None)}")
    b, t, _ = a_BxTxE.shape
    if valid_BxT is None:
        valid = jnp.ones((b, t), bool)
    else:
        if tuple(valid_BxT.shape) != (b, t):
            raise ValueError(f"{name}: valid_BxT must be [B, T] = {(b, t)}, got {tuple(valid_BxT.shape)}")
        valid = valid_BxT.astype(bool)
    return (a_BxTxE != 0) & valid[..., None], valid


def _check_len(name: str, arg: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: {arg} must be an integer >= 1, got {value!r}")
    return value


def tls(a_BxTxE: jax.Array, valid_BxT: jax.Array | None = None) -> jax.Array:
    """Token-level sparsity: the mean over valid tokens and experts of ``1[A = 0]``."""
    act, valid = _active("tls", a_BxTxE, valid_BxT)
    n = jnp.maximum(jnp.sum(valid) * a_BxTxE.shape[-1], 1)
    return 1.0 - jnp.sum(act) / n


def chunk_union(a_BxTxE: jax.Array, chunk_len: int, valid_BxT: jax.Array | None = None):
    """``(union [B, C, E], chunk_valid [B, C])``: which experts any valid token of each chunk of
    ``chunk_len`` positions activates (the last chunk padded), and which chunks hold a valid token."""
    _check_len("cls", "chunk_len", chunk_len)
    act, valid = _active("cls", a_BxTxE, valid_BxT)
    b, t, e = act.shape
    n = -(-t // chunk_len)
    pad = n * chunk_len - t
    union = jnp.pad(act, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk_len, e).any(2)
    chunk_valid = jnp.pad(valid, ((0, 0), (0, pad))).reshape(b, n, chunk_len).any(2)
    return union, chunk_valid


def cls(a_BxTxE: jax.Array, chunk_len: int, valid_BxT: jax.Array | None = None) -> jax.Array:
    """Chunk-level sparsity ``CLS_L``: 1 - the fraction of (chunk, expert) pairs in which some
    valid token of the chunk activates the expert. Chunks are ``chunk_len`` consecutive
    positions of a row; chunks holding no valid token are left out. ``CLS_1`` is TLS."""
    union, chunk_valid = chunk_union(a_BxTxE, chunk_len, valid_BxT)
    n = jnp.maximum(jnp.sum(chunk_valid) * a_BxTxE.shape[-1], 1)
    return 1.0 - jnp.sum(union) / n


def cls_curve(a_BxTxE: jax.Array, valid_BxT: jax.Array | None = None,
              lengths: tuple[int, ...] = CLS_LENGTHS) -> dict[int, jax.Array]:
    """``{L: CLS_L}`` for each chunk length (by default 1, 2, 4, ..., 64)."""
    return {n: cls(a_BxTxE, n, valid_BxT) for n in lengths}


def reuse_ratio(a_BxTxE: jax.Array, valid_BxT: jax.Array | None = None,
                segment_ids_BxT: jax.Array | None = None) -> jax.Array:
    """``sum_t |A_t & A_{t-1}| / sum_t |A_t|`` over tokens with a valid predecessor (in the same
    document when segment ids are given): how much of a token's expert set the previous token
    already brought in (BlockFFN reports 87-90%)."""
    act, valid = _active("reuse_ratio", a_BxTxE, valid_BxT)
    pair = valid[:, 1:] & valid[:, :-1]
    if segment_ids_BxT is not None:
        pair = pair & (segment_ids_BxT[:, 1:] == segment_ids_BxT[:, :-1])
    cur = act[:, 1:] & pair[..., None]
    return jnp.sum(cur & act[:, :-1]) / jnp.maximum(jnp.sum(cur), 1)


def _window_counts(act_BxTxE, valid_BxT, m: int):
    """Per window of m consecutive positions (every offset): the count of each expert's
    activations ``[B, S, E]`` and whether the whole window is valid ``[B, S]`` (S = T - m + 1)."""
    t = act_BxTxE.shape[1]
    csum = jnp.pad(jnp.cumsum(act_BxTxE.astype(jnp.int32), axis=1), ((0, 0), (1, 0), (0, 0)))
    vsum = jnp.pad(jnp.cumsum(valid_BxT.astype(jnp.int32), axis=1), ((0, 0), (1, 0)))
    counts = csum[:, m:t + 1] - csum[:, : t + 1 - m]
    ok = (vsum[:, m:t + 1] - vsum[:, : t + 1 - m]) == m
    return counts, ok


def srp(a_BxTxE: jax.Array, seg_len: int, valid_BxT: jax.Array | None = None, *,
        per_expert: bool = False) -> jax.Array:
    """Segment routing best performance ``SRP(m)``: how well one fixed expert set per segment of
    ``m = seg_len`` consecutive tokens could replace per-token routing. For every window of m
    valid positions (all offsets) and a count threshold c, the segment routes all its m tokens
    to the experts it activates at least c times; over all windows the F1 score of that routing
    against the real one is ``2 * matches / (predicted + actual)``, matches being the
    activations it covers. SRP is the best F1 over ``c = 0..m`` (a threshold shared by the
    experts of the layer; with ``per_expert`` one F1 per expert, ``[E]``). 1 means every
    segment uses a constant expert set; per-token routing that changes every token scores low."""
    m = _check_len("srp", "seg_len", seg_len)
    act, valid = _active("srp", a_BxTxE, valid_BxT)
    e = act.shape[-1]
    if m > act.shape[1]:
        raise ValueError(f"srp: seg_len={m} exceeds the {act.shape[1]} positions of a row")
    counts, ok = _window_counts(act, valid, m)
    w = jnp.broadcast_to(ok[..., None], counts.shape).astype(jnp.int32)
    idx = counts + (m + 1) * jnp.arange(e, dtype=jnp.int32)  # expert e, count v -> e * (m + 1) + v
    hist = jnp.zeros(e * (m + 1), jnp.int32).at[idx.reshape(-1)].add(w.reshape(-1)).reshape(e, m + 1)
    if not per_expert:
        hist = hist.sum(0, keepdims=True)
    v = jnp.arange(m + 1, dtype=jnp.float32)
    tail = lambda x: jnp.flip(jnp.cumsum(jnp.flip(x, -1), -1), -1)  # noqa: E731 - sum over counts >= c
    matches = tail(hist * v)
    preds = m * tail(hist.astype(jnp.float32))
    acts = matches[..., :1]
    f1 = 2.0 * matches / jnp.maximum(preds + acts, 1.0)
    best = jnp.max(f1, axis=-1)
    return best if per_expert else best[0]


def sch(a_BxTxE: jax.Array, seg_len: int, cache_size: int, valid_BxT: jax.Array | None = None) -> jax.Array:
    """Segment cache best hit rate ``SCH(m, C)``: the hit rate of a cache of ``cache_size``
    experts (the paper takes a multiple rho of the active experts per token) managed with a
    look-ahead of ``m = seg_len`` tokens. At each token the cache keeps the token's own experts
    and fills its other places with the cached experts used most often in the current segment
    (the token and the m - 1 after it), ties going to the most recently used; a hit is an active
    expert already cached. As in the paper's code, the cache starts warm: the first
    ``cache_size`` distinct experts of a row hit on first use. Padding is skipped."""
    m = _check_len("sch", "seg_len", seg_len)
    c = _check_len("sch", "cache_size", cache_size)
    act, valid = _active("sch", a_BxTxE, valid_BxT)
    b, t, e = act.shape
    csum = jnp.pad(jnp.cumsum(act.astype(jnp.int32), axis=1), ((0, 0), (1, 0), (0, 0)))
    ends = jnp.minimum(jnp.arange(t) + m, t)
    future = csum[:, ends] - csum[:, :t]  # [B, T, E]: uses in [t, t + m)
    ids = jnp.arange(e, dtype=jnp.int32)

    def rank_desc(score):  # 0 for the highest score of each row
        order = jnp.argsort(-score, axis=-1, stable=True)
        return jnp.argsort(order, axis=-1, stable=True)

    def step(carry, xs):
        cache, last, seen, n_seen = carry
        act_t, valid_t, fut_t, t_idx = xs
        new = act_t & ~seen
        warm = new & (n_seen[:, None] + jnp.cumsum(new, axis=-1) <= c)
        hits = jnp.sum(act_t & (cache | warm), axis=-1)
        n_act = jnp.sum(act_t, axis=-1)
        big = jnp.float32(t + 1)
        # the token's own experts (by their future use if they do not all fit), then the rest
        own = jnp.where(act_t, fut_t.astype(jnp.float32) * big - ids / e, -jnp.inf)
        keep_own = act_t & (rank_desc(own) < c)
        rest = cache & ~act_t
        score = jnp.where(rest, fut_t.astype(jnp.float32) * big + last.astype(jnp.float32), -jnp.inf)
        keep_rest = rest & (rank_desc(score) < (c - n_act)[:, None])
        new_cache = keep_own | keep_rest
        upd = valid_t[:, None]
        cache = jnp.where(upd, new_cache, cache)
        last = jnp.where(upd & act_t, t_idx, last)
        seen = jnp.where(upd, seen | act_t, seen)
        n_seen = jnp.sum(seen, axis=-1)
        return (cache, last, seen, n_seen), (jnp.where(valid_t, hits, 0), jnp.where(valid_t, n_act, 0))

    init = (jnp.zeros((b, e), bool), jnp.full((b, e), -1, jnp.int32), jnp.zeros((b, e), bool),
            jnp.zeros((b,), jnp.int32))
    xs = (jnp.swapaxes(act, 0, 1), jnp.swapaxes(valid, 0, 1), jnp.swapaxes(future, 0, 1),
          jnp.arange(t, dtype=jnp.int32))
    _, (hits, totals) = jax.lax.scan(step, init, xs)
    return jnp.sum(hits) / jnp.maximum(jnp.sum(totals), 1)


def cache_size_for(a_BxTxE: jax.Array, rho: float, valid_BxT: jax.Array | None = None) -> int:
    """``max(1, round(rho * mean active experts per valid token))`` (eager): the paper's cache of
    rho times the k active experts, for routers whose k varies."""
    act, valid = _active("cache_size_for", a_BxTxE, valid_BxT)
    mean = float(jnp.sum(act) / jnp.maximum(jnp.sum(valid), 1))
    return max(1, int(round(rho * mean)))
