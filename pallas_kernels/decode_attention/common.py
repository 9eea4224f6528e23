"""Shared host-side pieces of the decode-attention kernels: the row layout of a GQA group, the
split of the slot axis and the log-sum-exp combine of the splits' partial results."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Split:
    """How the slot axis is cut: ``n_splits`` programs per (row, key/value head), each over
    ``per_split`` slots (a multiple of ``block_c``); the cache is padded to ``padded`` slots."""
    block_c: int
    n_splits: int
    per_split: int
    padded: int

    @classmethod
    def make(cls, capacity: int, block_c: int, n_splits: int | None = None, target_blocks: int = 8) -> "Split":
        n_blocks = -(-capacity // block_c)
        if n_splits is None:  # long caches: several programs per head, about target_blocks blocks each
            n_splits = max(1, min(n_blocks, -(-n_blocks // target_blocks)))
        n_splits = max(1, min(n_splits, n_blocks))
        per = -(-n_blocks // n_splits) * block_c
        return cls(block_c=block_c, n_splits=n_splits, per_split=per, padded=per * n_splits)


def check_inputs(q, k, v, kv_positions, q_positions, counts):
    b, t, h, d = q.shape
    if k.ndim != 4 or k.shape[0] != b or k.shape[3] != d or v.shape != k.shape:
        raise ValueError(f"decode_attention: k and v must be [B, K, C, D] matching q {q.shape}, got {k.shape}, "
                         f"{v.shape}")
    kh = k.shape[1]
    if h % kh:
        raise ValueError(f"decode_attention: query heads ({h}) must be a multiple of key/value heads ({kh})")
    if kv_positions.shape != k.shape[:3]:
        raise ValueError(f"decode_attention: kv_positions must be [B, K, C] = {k.shape[:3]}, got {kv_positions.shape}")
    if q_positions.shape != (b, t):
        raise ValueError(f"decode_attention: q_positions must be [B, T] = {(b, t)}, got {q_positions.shape}")
    if counts is not None and counts.shape != (b, kh):
        raise ValueError(f"decode_attention: counts must be [B, K] = {(b, kh)}, got {counts.shape}")


def group_rows(q_BxTxHxD, q_positions_BxT, n_kv: int, rows_pad: int):
    """Queries as one row block per (row, key/value head): ``[B, K, R, D]`` with row
    ``t * G + g`` (padded to ``rows_pad`` with position -1), and each row's position ``[B, R]``."""
    b, t, h, d = q_BxTxHxD.shape
    g = h // n_kv
    q = jnp.transpose(q_BxTxHxD.reshape(b, t, n_kv, g, d), (0, 2, 1, 3, 4)).reshape(b, n_kv, t * g, d)
    pos = jnp.repeat(q_positions_BxT.astype(jnp.int32), g, axis=1)
    pad = rows_pad - t * g
    q = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0)))
    pos = jnp.pad(pos, ((0, 0), (0, pad)), constant_values=-1)
    return q, pos


def ungroup_rows(o_BxKxRxD, lse_BxKxR, t: int, h: int):
    b, kh, _, d = o_BxKxRxD.shape
    g = h // kh
    o = jnp.transpose(o_BxKxRxD[:, :, : t * g].reshape(b, kh, t, g, d), (0, 2, 1, 3, 4)).reshape(b, t, h, d)
    lse = jnp.transpose(lse_BxKxR[:, :, : t * g].reshape(b, kh, t, g), (0, 2, 1, 3)).reshape(b, t, h)
    return o, lse


def combine(o_BxKxSxRxD, lse_BxKxSxR):
    """Log-sum-exp combine of the splits: each split's normalised output weighted by
    ``exp(lse_s - lse)``; rows no split saw get o = 0, lse = -inf."""
    m = lse_BxKxSxR.max(2, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse_BxKxSxR - m_safe)  # 0 for empty splits
    total = w.sum(2, keepdims=True)
    o = (w[..., None] * o_BxKxSxRxD).sum(2) / jnp.where(total > 0, total, 1.0)[..., None][:, :, 0]
    lse = jnp.where(total > 0, m_safe + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)[:, :, 0]
    return o, lse


def pad_slots(k, v, kv_positions, padded: int):
    c = k.shape[2]
    if padded == c:
        return k, v, kv_positions
    widths = ((0, 0), (0, 0), (0, padded - c))
    return (jnp.pad(k, widths + ((0, 0),)), jnp.pad(v, widths + ((0, 0),)),
            jnp.pad(kv_positions, widths, constant_values=-1))


def full_counts(counts, kv_positions):
    if counts is not None:
        return counts.astype(jnp.int32)
    return jnp.full(kv_positions.shape[:2], kv_positions.shape[2], jnp.int32)


def rows_for(t: int, g: int, minimum: int = 16) -> int:
    r = max(t * g, minimum)
    return 1 << (r - 1).bit_length()
