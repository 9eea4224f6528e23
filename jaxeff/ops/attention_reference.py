"""The plain-jnp attention oracle: scores and softmax in float32, GQA without repeating keys.

Layouts: queries ``q_BxTxHxD``, keys and values ``k_BxSxKxD`` with K key/value heads shared by
H // K query heads each (GQA, Ainslie et al., 2023).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxeff.ops.attention_mask import AttentionMask


def masked_attention_reference(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array,
                               mask: jax.Array, *, scale: float | None = None) -> jax.Array:
    """softmax(q k^T * scale, where mask) v for a boolean mask [B, T, S] or [B, Km, T, S]
    (Km = 1 or K), scores and softmax in float32 (the oracle)."""
    b, t, h, d = q_BxTxHxD.shape
    kh = k_BxSxKxD.shape[2]
    if h % kh:
        raise ValueError(f"attention: query heads ({h}) must be a multiple of key/value heads ({kh})")
    scale = d ** -0.5 if scale is None else scale
    mask_BxKxTxS = mask[:, None] if mask.ndim == 3 else mask
    q_BxTxKxGxD = q_BxTxHxD.reshape(b, t, kh, h // kh, d)
    scores_BxKxGxTxS = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD,
                                  preferred_element_type=jnp.float32) * scale
    # A finite fill keeps fully masked rows (padding queries) finite instead of NaN.
    scores_BxKxGxTxS = jnp.where(mask_BxKxTxS[:, :, None], scores_BxKxGxTxS, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxSxKxD.dtype)
    out_BxTxKxGxD = jnp.einsum("bkgts,bskd->btkgd", probs, v_BxSxKxD, preferred_element_type=jnp.float32)
    return out_BxTxKxGxD.reshape(b, t, h, d).astype(q_BxTxHxD.dtype)


def attention_reference(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, *,
                        mask: AttentionMask | None = None, scale: float | None = None) -> jax.Array:
    """Attention under ``mask`` (default: causal) with a dense boolean mask, in float32."""
    mask = AttentionMask() if mask is None else mask
    b, t = q_BxTxHxD.shape[:2]
    return masked_attention_reference(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask.dense(b, t, k_BxSxKxD.shape[1]),
                                      scale=scale)


def attention_weights(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, *, mask: AttentionMask | None = None,
                      rows: int | None = None, scale: float | None = None) -> jax.Array:
    """Attention probabilities [B, H, rows, S] (float32) of the last ``rows`` queries (default
    all): the statistics KV-cache policies score keys with. Computed apart from the attention
    output, so any implementation can compute the output."""
    mask = AttentionMask() if mask is None else mask
    b, t, h, d = q_BxTxHxD.shape
    s, kh = k_BxSxKxD.shape[1:3]
    rows = t if rows is None else rows
    scale = d ** -0.5 if scale is None else scale
    dense_BxKxTxS = mask.dense(b, t, s)[:, :, t - rows:]
    q_BxRxKxGxD = q_BxTxHxD[:, t - rows:].reshape(b, rows, kh, h // kh, d)
    scores = jnp.einsum("brkgd,bskd->bkgrs", q_BxRxKxGxD, k_BxSxKxD, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(dense_BxKxTxS[:, :, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.nan_to_num(probs).reshape(b, h, rows, s)
