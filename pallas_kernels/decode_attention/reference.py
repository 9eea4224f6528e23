"""The plain-jnp oracle of decode attention over a compacted, per-head KV cache.

Layouts: queries ``q [B, T, H, D]`` (T: one token per row, or a few for speculative
verification), keys/values ``k, v [B, K, C, D]`` (K key/value heads, C slots, the layout of
``jaxeff.kv.LayerKV``), ``kv_positions [B, K, C]`` (-1: empty), ``q_positions [B, T]`` and
optionally ``counts [B, K]`` (slots in use per head: slot c is read only when c < count).
Query t of row b reads the slots of each head whose position is in ``[0, q_positions[b, t]]``;
the G = H // K query heads of a group read their key/value head (never repeated). Scores and
softmax in float32; a query that reads no slot gets o = 0 and lse = -inf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def allowed(kv_positions_BxKxC, q_positions_BxT, counts_BxK=None):
    """[B, K, T, C] bool: which slots each query reads."""
    ok = (kv_positions_BxKxC[:, :, None, :] >= 0) & (kv_positions_BxKxC[:, :, None, :] <= q_positions_BxT[:, None, :, None])
    if counts_BxK is not None:
        c = kv_positions_BxKxC.shape[-1]
        ok = ok & (jnp.arange(c)[None, None, None, :] < counts_BxK[:, :, None, None])
    return ok


def decode_attention(q_BxTxHxD, k_BxKxCxD, v_BxKxCxD, kv_positions_BxKxC, q_positions_BxT, counts_BxK=None, *,
                     scale: float | None = None, return_lse: bool = False):
    b, t, h, d = q_BxTxHxD.shape
    kh = k_BxKxCxD.shape[1]
    scale = d ** -0.5 if scale is None else scale
    q = q_BxTxHxD.reshape(b, t, kh, h // kh, d).astype(jnp.float32)
    s = jnp.einsum("btkgd,bkcd->bkgtc", q, k_BxKxCxD.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST) * scale
    ok = allowed(kv_positions_BxKxC, q_positions_BxT, counts_BxK)[:, :, None]
    s = jnp.where(ok, s, -jnp.inf)
    m = s.max(-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe)
    l = p.sum(-1, keepdims=True)
    o = jnp.einsum("bkgtc,bkcd->btkgd", p / jnp.where(l > 0, l, 1.0), v_BxKxCxD.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
    o = o.reshape(b, t, h, d).astype(q_BxTxHxD.dtype)
    if not return_lse:
        return o
    lse = jnp.where(l > 0, m_safe + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)[..., 0]  # [B, K, G, T]
    return o, jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, t, h)
