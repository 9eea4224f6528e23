"""MInference's vertical-slash pattern for LLM prefill (Jiang et al., 2024, "MInference 1.0:
Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention", arXiv 2407.02490).

The rule (paper Sec. 3.2, Algorithm 2, the vertical-slash head):

* Estimate from the last queries: the attention of the last ``last_q`` (default 64) queries over
  all keys, ``A = softmax(q[-last_q:] k^T * scale)`` (causal).
* Vertical lines: key s scores ``sum_r A[r, s]``; slash lines: offset o = t - s scores
  ``sum_r A[r, t_r - o]`` (t_r the query's position). Keep the top ``vertical_size`` keys and
  the top ``slash_size`` offsets; the first ``sink_tokens`` keys (30 in the reference code) and
  the ``local_offsets`` nearest offsets (100) are always kept.
* The token-level pattern then becomes blocks: a block is computed when a kept key column or a
  kept diagonal (offset) crosses it (the reference kernel computes the slashes block-wise too).
  The first key block (sinks) and the diagonal block are always kept; the causal mask is applied
  inside the diagonal blocks.

``density`` d sets vertical_size = slash_size = ceil(d * S / 2) (token lines covering about d of
the keys); the achieved block density is higher, since every line touches whole blocks. The
paper's sizes (1000 vertical, 6096 slash) are for 128k-token prompts; pass them explicitly.
GQA: query head h is estimated against kv head h // G; the table is per query head.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxeff.sparse.block_mask import BlockMask
from jaxeff.sparse.select.common import (causal_blocks, check_block, check_int, check_knobs, check_qk, grouped,
                                         keep_sink_and_diagonal, to_block_mask, top_k_rows)

DEFAULTS = dict(last_q=64, vertical_size=1000, slash_size=6096, sink_tokens=30, local_offsets=100, block=64)
WHERE = "minference"


def vertical_slash_scores(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, *, last_q: int = DEFAULTS["last_q"],
                          scale: float | None = None) -> tuple[jax.Array, jax.Array]:
    """(vertical [B, H, S], slash [B, H, T]) float32 from the last ``last_q`` queries (causal;
    the queries are the last of the sequence, keys and queries aligned at the end)."""
    b, t, h, d, s, kh = check_qk(WHERE, q_BxTxHxD, k_BxSxKxD)
    last_q = check_int(WHERE, "last_q", last_q, maximum=t)
    scale = d ** -0.5 if scale is None else scale
    ql = grouped(q_BxTxHxD[:, t - last_q:], kh)  # [B, L, K, G, D]
    sc = jnp.einsum("blkgd,bskd->bkgls", ql, k_BxSxKxD, precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32) * scale
    pos = (s - last_q) + jnp.arange(last_q)  # absolute key position of each query (prefill: T == S)
    sc = jnp.where(jnp.arange(s)[None, :] <= pos[:, None], sc, -jnp.inf)
    a = jax.nn.softmax(sc, axis=-1).reshape(b, h, last_q, s)
    vertical = a.sum(2)
    # slash o collects A[r, pos_r - o]
    key = pos[:, None] - jnp.arange(t)[None, :]  # [L, T]
    vals = jnp.take_along_axis(a, jnp.broadcast_to(jnp.clip(key, 0, s - 1), (b, h, last_q, t)), axis=-1)
    slash = jnp.where(key >= 0, vals, 0.0).sum(2)
    return vertical, slash


def vertical_slash_table(vertical_keys: jax.Array, slash_offsets: jax.Array, block_q: int, block_kv: int,
                         q_len: int) -> jax.Array:
    """[B, H, nQ, nK] bool: blocks a kept key column (``vertical_keys`` [B, H, S] bool) or a
    kept diagonal (``slash_offsets`` [B, H, T] bool, offset = q - kv) crosses, causal blocks only."""
    s = vertical_keys.shape[-1]
    nq, nk = -(-q_len // block_q), -(-s // block_kv)
    col = jnp.pad(vertical_keys, ((0, 0), (0, 0), (0, nk * block_kv - s))).reshape(*vertical_keys.shape[:2], nk,
                                                                                    block_kv).any(-1)
    allowed = causal_blocks(nq, nk, block_q, block_kv)
    vert = col[:, :, None, :] & jnp.asarray(allowed)
    # block (i, j) holds offsets i*bq - (j+1)*bk + 1 .. (i+1)*bq - 1 - j*bk
    i, j = jnp.arange(nq)[:, None], jnp.arange(nk)[None, :]
    lo = jnp.clip(i * block_q - (j + 1) * block_kv + 1, 0, q_len)
    hi = jnp.clip((i + 1) * block_q - 1 - j * block_kv, -1, q_len - 1)
    cs = jnp.concatenate([jnp.zeros((*slash_offsets.shape[:2], 1), jnp.int32),
                          jnp.cumsum(slash_offsets.astype(jnp.int32), -1)], -1)  # cs[o] = kept offsets < o
    count = jnp.take(cs, hi + 1, axis=-1) - jnp.take(cs, lo, axis=-1)
    slash = (count > 0) & (hi >= lo)
    return (vert | slash) & jnp.asarray(allowed)


def minference(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, *, density: float | None = None,
               threshold: float | None = None, state=None, block=DEFAULTS["block"], last_q: int = DEFAULTS["last_q"],
               vertical_size: int | None = None, slash_size: int | None = None,
               sink_tokens: int = DEFAULTS["sink_tokens"], local_offsets: int = DEFAULTS["local_offsets"],
               scale: float | None = None) -> tuple[BlockMask, None, None]:
    """MInference's vertical-slash BlockMask for causal prefill (module docstring)."""
    del state
    b, t, h, d, s, kh = check_qk(WHERE, q_BxTxHxD, k_BxSxKxD)
    if s != t:
        raise ValueError(f"{WHERE}: prefill only (q has {t} tokens, k {s}): the slashes are offsets q - kv")
    bq, bk = check_block(WHERE, block, t, s)
    density, _ = check_knobs(WHERE, density, threshold, takes_threshold=False)
    if density is not None:
        if vertical_size is not None or slash_size is not None:
            raise ValueError(f"{WHERE}: pass density or vertical_size/slash_size, not both")
        vertical_size = slash_size = max(1, math.ceil(density * s / 2))
    vertical_size = check_int(WHERE, "vertical_size", DEFAULTS["vertical_size"] if vertical_size is None
                              else vertical_size)
    slash_size = check_int(WHERE, "slash_size", DEFAULTS["slash_size"] if slash_size is None else slash_size)
    sink_tokens = check_int(WHERE, "sink_tokens", sink_tokens, minimum=0)
    local_offsets = check_int(WHERE, "local_offsets", local_offsets, minimum=0)
    vertical, slash = vertical_slash_scores(q_BxTxHxD, k_BxSxKxD, last_q=last_q, scale=scale)
    vertical = jnp.where(jnp.arange(s) < sink_tokens, jnp.inf, vertical)
    slash = jnp.where(jnp.arange(t) < local_offsets, jnp.inf, slash)
    keys = top_k_rows(vertical, min(vertical_size, s))
    offsets = top_k_rows(slash, min(slash_size, t))
    table = vertical_slash_table(keys, offsets, bq, bk, t)
    table = keep_sink_and_diagonal(table, bq, bk) & jnp.asarray(causal_blocks(*table.shape[-2:], bq, bk))
    return to_block_mask(table, bq, bk, t, s, causal=True), None, None
