"""XAttention: block importance from antidiagonal sums (Xu et al., 2025, "XAttention: Block Sparse
Attention with Antidiagonal Scoring", arXiv 2503.16428).

The rule (paper Sec. 2.1-2.2):

* Antidiagonal scoring: inside each ``stride`` x ``stride`` tile of the score matrix, sum q.k
  along the antidiagonal lines: ``A[a, c] = sum_{m < S} q_{aS + S-1-m} . k_{cS + m}``. It is one
  matmul of strided reshapes (query rows S-1-m, key rows m of every tile, concatenated over m
  along the feature axis), so the estimate costs 1/S of the attention scores. Every antidiagonal
  crosses every row and column of its tile once, so vertical and slash patterns both show up.
* The estimates are scaled by ``scale / S``, softmax-normalised over the keys (causally: tile
  column c <= row a), and summed into (query block, key block) scores; each row of blocks sums
  to 1 (the paper's normalised block probabilities).
* Threshold block selection (Sec. 2.2): per query block, the fewest key blocks whose scores
  reach ``threshold`` = tau (default 0.9; 0.9-0.95 in the paper). ``density`` d instead keeps the
  top d * (allowed blocks per row) of each row.
* As the reference implementation does, the first key block (attention sinks) and the diagonal
  block are always kept.

Defaults: stride 8 (16 for video in the paper), blocks of 128, causal (LLM prefill). GQA: query
head h is scored against kv head h // G.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxeff.sparse.block_mask import BlockMask
from jaxeff.sparse.select.common import (budget_select, causal_blocks, check_block, check_int, check_knobs, check_qk,
                                         keep_sink_and_diagonal, to_block_mask, top_p_rows)

DEFAULTS = dict(threshold=0.9, stride=8, block=128, causal=True)
WHERE = "xattention"


def _strided(x_BxTxKxD: jax.Array, stride: int, reverse: bool) -> jax.Array:
    """[B, T, K, D] -> [B, T / S, K, S * D]: row m of each tile (S-1-m with ``reverse``) in slot m."""
    b, t, kh, d = x_BxTxKxD.shape
    x = x_BxTxKxD.reshape(b, t // stride, stride, kh, d)
    if reverse:
        x = x[:, :, ::-1]
    return jnp.moveaxis(x, 2, 3).reshape(b, t // stride, kh, stride * d)


def antidiagonal_scores(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, *, stride: int = DEFAULTS["stride"],
                        block=DEFAULTS["block"], causal: bool = DEFAULTS["causal"],
                        scale: float | None = None) -> jax.Array:
    """Normalised block scores [B, H, nQ, nK] float32 (module docstring), one query block at a time."""
    b, t, h, d, s, kh = check_qk(WHERE, q_BxTxHxD, k_BxSxKxD)
    bq, bk = check_block(WHERE, block, t, s)
    stride = check_int(WHERE, "stride", stride)
    if bq % stride or bk % stride:
        raise ValueError(f"{WHERE}: stride ({stride}) must divide the block sizes ({bq}, {bk})")
    g = h // kh
    scale = d ** -0.5 if scale is None else scale
    nq, nk = -(-t // bq), -(-s // bk)
    qp = jnp.pad(q_BxTxHxD, ((0, 0), (0, nq * bq - t), (0, 0), (0, 0)))
    kp = jnp.pad(k_BxSxKxD, ((0, 0), (0, nk * bk - s), (0, 0), (0, 0)))
    qr = _strided(qp, stride, reverse=True).reshape(b, nq, bq // stride, kh, g, stride * d)
    kr = _strided(kp, stride, reverse=False)  # [B, S', K, S*D]
    cols = jnp.arange(kr.shape[1])
    real_cols = cols * stride < s  # a tile column holding some real key

    def row(i):
        a = jnp.einsum("bqkgx,bckx->bkgqc", qr[:, i], kr, precision=jax.lax.Precision.HIGHEST,
                       preferred_element_type=jnp.float32) * (scale / stride)
        ok = jnp.broadcast_to(real_cols[None, :], (bq // stride, cols.size))
        if causal:
            ok = ok & (cols[None, :] <= (i * bq // stride + jnp.arange(bq // stride))[:, None])
        p = jax.nn.softmax(jnp.where(ok, a, -jnp.inf), axis=-1)
        rows_real = (i * bq + jnp.arange(bq // stride) * stride) < t  # padded query rows count nothing
        p = jnp.where(rows_real[:, None], p, 0.0)
        blocks = p.reshape(*p.shape[:-1], nk, bk // stride).sum(-1).sum(-2)  # [B, K, G, nK]
        return blocks / jnp.maximum(rows_real.sum(), 1)

    out = jax.lax.map(row, jnp.arange(nq))  # [nQ, B, K, G, nK]
    return jnp.moveaxis(out, 0, 3).reshape(b, h, nq, nk)


def xattention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, *, density: float | None = None,
               threshold: float | None = None, state=None, block=DEFAULTS["block"], stride: int = DEFAULTS["stride"],
               causal: bool = DEFAULTS["causal"], sink: bool = True, diagonal: bool = True,
               scale: float | None = None) -> tuple[BlockMask, None, None]:
    """XAttention's BlockMask (module docstring); causal masks keep the diagonal blocks partial."""
    del state
    b, t, h, d, s, kh = check_qk(WHERE, q_BxTxHxD, k_BxSxKxD)
    bq, bk = check_block(WHERE, block, t, s)
    density, threshold = check_knobs(WHERE, density, threshold)
    if density is None and threshold is None:
        threshold = DEFAULTS["threshold"]
    scores = antidiagonal_scores(q_BxTxHxD, k_BxSxKxD, stride=stride, block=(bq, bk), causal=causal, scale=scale)
    nq, nk = scores.shape[-2:]
    allowed = causal_blocks(nq, nk, bq, bk) if causal else None
    if threshold is not None:
        table = top_p_rows(scores, threshold, 1)
    else:
        table = budget_select(scores, density, budget="row", allowed=allowed, where=WHERE)
    table = keep_sink_and_diagonal(table, bq, bk, sink=sink, diagonal=diagonal)
    if allowed is not None:
        table = table & jnp.asarray(allowed)
    return to_block_mask(table, bq, bk, t, s, causal=causal), None, None
