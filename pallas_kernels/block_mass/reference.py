"""The oracle: per-block attention mass in plain jnp, one query block at a time.

``mass[b, h, i, j] = sum_{t in block i} sum_{s in block j} exp(q_t . k_s * scale - lse[b, h, t])``
over the allowed elements (all, or ``s <= t`` when causal). With ``lse`` the log-sum-exp of the
same attention, each query row's masses sum to 1 over the keys, so a query block's row of
``mass`` sums to the number of its real queries. GQA: query head h reads key head h // G; K is
never repeated. ``lax.map`` over query blocks keeps one [block_q, S] score tile at a time: the
[T, S] score matrix is never materialised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_mass.common import check_inputs, pad_axis


def block_mass(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, lse_BxHxT: jax.Array, block_q: int, block_kv: int, *,
               scale: float | None = None, causal: bool = False) -> jax.Array:
    """mass [B, H, nQ, nK] float32 (see the module docstring)."""
    check_inputs(q_BxTxHxD, k_BxSxKxD, lse_BxHxT, block_q, block_kv)
    b, t, h, d = q_BxTxHxD.shape
    s, kh = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
    g = h // kh
    scale = d ** -0.5 if scale is None else scale
    nq, nk = -(-t // block_q), -(-s // block_kv)
    qp = pad_axis(q_BxTxHxD, 1, nq * block_q).reshape(b, nq, block_q, kh, g, d)
    # padded query rows get lse = +inf: exp(. - inf) = 0, they carry no mass
    lse = pad_axis(lse_BxHxT.astype(jnp.float32), 2, nq * block_q, jnp.inf).reshape(b, kh, g, nq, block_q)
    kp = pad_axis(k_BxSxKxD, 1, nk * block_kv)
    kv_idx = jnp.arange(nk * block_kv, dtype=jnp.int32)
    full = jax.lax.Precision.HIGHEST

    def row(i):
        q_blk = qp[:, i]  # [B, bq, K, G, D]
        sc = jnp.einsum("bqkgd,bskd->bkgqs", q_blk, kp, precision=full, preferred_element_type=jnp.float32) * scale
        lse_blk = lse[:, :, :, i]  # [B, K, G, bq]
        ok = kv_idx[None, :] < s
        if causal:
            ok = ok & (kv_idx[None, :] <= (i * block_q + jnp.arange(block_q, dtype=jnp.int32))[:, None])
        # lse = -inf (a row with no allowed key): no mass, not nan
        finite = jnp.isfinite(lse_blk)[..., None]
        p = jnp.where(ok & finite, jnp.exp(sc - jnp.where(finite, lse_blk[..., None], 0.0)), 0.0)
        return p.reshape(b, kh, g, block_q, nk, block_kv).sum(axis=(3, 5))  # [B, K, G, nK]

    mass = jax.lax.map(row, jnp.arange(nq))  # [nQ, B, K, G, nK]
    return jnp.moveaxis(mass, 0, 3).reshape(b, h, nq, nk)
