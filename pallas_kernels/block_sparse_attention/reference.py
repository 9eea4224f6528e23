"""The oracle: dense attention over an element mask, in plain jnp.

softmax(score_mod(q k^T * scale) where mask) v with float32 scores and softmax statistics; GQA
by viewing q as [B, T, K, G, D] (G = H // K query heads per key/value head), never repeating K/V.
A query row with no allowed key outputs 0 with LSE -inf, and its gradients are 0: the softmax is
computed safely (masked terms are exactly 0 and the row sum is guarded), not with a finite fill.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention.common import (ElementMask, ScoreMod, SparseLayout, check_inputs,
                                                          describe, layout_to_dense)


def attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, mask: jax.Array, *,
              scale: float | None = None, score_mod: ScoreMod | None = None,
              return_lse: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """Dense masked attention. ``mask``: bool [B|1, H|1, T, S]. Returns (o [B, T, H, D] in q's
    dtype, LSE [B, H, T] float32 or None)."""
    b, t, h, d = q_BxTxHxD.shape
    s, kh = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
    g = h // kh
    scale = d ** -0.5 if scale is None else scale
    q_BxTxKxGxD = q_BxTxHxD.reshape(b, t, kh, g, d)
    full = jax.lax.Precision.HIGHEST  # the oracle: no TF32 on GPU
    scores = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD, precision=full,
                        preferred_element_type=jnp.float32)
    scores = scores.astype(jnp.float32) * scale
    if score_mod is not None:
        bi = jnp.arange(b, dtype=jnp.int32)[:, None, None, None, None]
        hi = (jnp.arange(kh, dtype=jnp.int32)[:, None] * g + jnp.arange(g, dtype=jnp.int32))[None, :, :, None, None]
        qi = jnp.arange(t, dtype=jnp.int32)[None, None, None, :, None]
        ki = jnp.arange(s, dtype=jnp.int32)[None, None, None, None, :]
        scores = score_mod(scores, bi, hi, qi, ki).astype(jnp.float32)
    mb, mh = mask.shape[:2]
    mask_BxKxGxTxS = mask.reshape(mb, kh, g, t, s) if mh == h else mask.reshape(mb, 1, 1, t, s)
    masked = jnp.where(mask_BxKxGxTxS, scores, -jnp.inf)
    m = jax.lax.stop_gradient(masked.max(axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask_BxKxGxTxS, jnp.exp(masked - m), 0.0)
    l = p.sum(axis=-1, keepdims=True)
    o = jnp.einsum("bkgts,bskd->btkgd", (p / jnp.where(l > 0, l, 1.0)).astype(v_BxSxKxD.dtype), v_BxSxKxD,
                   precision=full, preferred_element_type=jnp.float32)
    o = o.reshape(b, t, h, d).astype(q_BxTxHxD.dtype)
    if not return_lse:
        return o, None
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)[..., 0]
    return o, lse.reshape(b, h, t)


def reference_from_layout(q, k, v, layout: SparseLayout, element_mask: ElementMask, *, scale=None,
                          score_mod=None, return_lse=False):
    """The reference over the mask a layout and element mask describe (``common.layout_to_dense``)."""
    check_inputs(q, k, v, layout, "reference")
    mask = layout_to_dense(layout, element_mask, *_mask_dims(q, layout, element_mask))
    return attention(q, k, v, mask, scale=scale, score_mod=score_mod, return_lse=return_lse)


def _mask_dims(q, layout: SparseLayout, element_mask: ElementMask) -> tuple[int, int]:
    """The smallest (batch, heads) the dense mask needs: 1 where nothing varies along the axis."""
    b, _, h, _ = q.shape
    lb, lh = layout.kv_num_blocks.shape[:2]
    varies_b = lb > 1 or element_mask.q_segment_ids is not None or (
        element_mask.dense is not None and element_mask.dense.shape[0] > 1)
    varies_h = lh > 1 or (element_mask.dense is not None and element_mask.dense.shape[1] > 1)
    # An index function may read b and h: evaluate it over both unless the layout says otherwise.
    if element_mask.index_fn is not None and describe(element_mask.index_fn) is None:
        varies_b, varies_h = True, True
    return (b if varies_b else 1), (h if varies_h else 1)


def block_sparse_attention(q, k, v, layout: SparseLayout, element_mask: ElementMask, *, scale=None, score_mod=None,
                           return_lse=False, interpret=False):
    """The registry entry point (same signature as every implementation)."""
    del interpret
    return reference_from_layout(q, k, v, layout, element_mask, scale=scale, score_mod=score_mod,
                                 return_lse=return_lse)
