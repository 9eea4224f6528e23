"""Decode attention as a portable ``pl.pallas_call`` (FlashDecoding: Dao et al., 2023,
"Flash-Decoding for long-context inference"; split-K over the slot axis).

One program per (row, key/value head, split): it loads the queries of all G query heads of the
group and all T query tokens as one ``[R, D]`` block (R = T * G, padded), walks its share of the
slots in blocks of ``block_c`` up to the head's slot count (a dynamic trip count: empty heads and
the unused tail of a cache cost nothing), masks by slot position (``0 <= pos <= q_pos``) with an
online softmax in float32, and writes a normalised partial output and its log-sum-exp; the
splits are combined outside (``common.combine``). K/V blocks are read once for the whole group.
On CPU run with ``interpret=True``; on GPU it lowers through Pallas' Triton backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.decode_attention.common import (Split, check_inputs, combine, full_counts, group_rows, pad_slots,
                                                    rows_for, ungroup_rows)


def _whole(x):
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _dot(a, b, contract):
    prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), precision=prec,
                               preferred_element_type=jnp.float32)


def _kernel(q_ref, k_ref, v_ref, pos_ref, cnt_ref, qpos_ref, o_ref, lse_ref, *, split: Split, scale: float):
    b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bc = split.block_c
    q = q_ref[...]
    rows = q.shape[0]
    qpos = qpos_ref[b, :]
    count = cnt_ref[b, h]
    start = s * split.per_split
    stop = jnp.minimum(start + split.per_split, count)
    n_blocks = jnp.maximum(stop - start + bc - 1, 0) // bc

    def body(j, carry):
        m, l, acc = carry
        off = pl.multiple_of(start + j * bc, bc)
        k = k_ref[b, h, pl.ds(off, bc), :]
        v = v_ref[b, h, pl.ds(off, bc), :]
        pos = pos_ref[b, h, pl.ds(off, bc)]
        sc = _dot(q, k, (1, 1)) * scale
        idx = off + jax.lax.broadcasted_iota(jnp.int32, (rows, bc), 1)
        ok = (idx < count) & (pos[None, :] >= 0) & (pos[None, :] <= qpos[:, None])
        sc = jnp.where(ok, sc, -jnp.inf)
        m_new = jnp.maximum(m, sc.max(axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m - m_use)
        p = jnp.exp(sc - m_use[:, None])
        l = l * alpha + p.sum(axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, (1, 0))
        return m_new, l, acc

    init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, q.shape[1]), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    seen = l > 0
    o_ref[...] = (acc / jnp.where(seen, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def decode_attention(q_BxTxHxD, k_BxKxCxD, v_BxKxCxD, kv_positions_BxKxC, q_positions_BxT, counts_BxK=None, *,
                     scale: float | None = None, return_lse: bool = False, block_c: int = 64,
                     n_splits: int | None = None, interpret: bool = False):
    """Same contract as ``reference.decode_attention``."""
    check_inputs(q_BxTxHxD, k_BxKxCxD, v_BxKxCxD, kv_positions_BxKxC, q_positions_BxT, counts_BxK)
    b, t, h, d = q_BxTxHxD.shape
    kh, c = k_BxKxCxD.shape[1:3]
    scale = d ** -0.5 if scale is None else float(scale)
    split = Split.make(c, block_c, n_splits)
    counts = full_counts(counts_BxK, kv_positions_BxKxC)
    k, v, pos = pad_slots(k_BxKxCxD, v_BxKxCxD, kv_positions_BxKxC.astype(jnp.int32), split.padded)
    rows = rows_for(t, h // kh)
    q, qpos = group_rows(q_BxTxHxD, q_positions_BxT, kh, rows)
    o_part, lse_part = pl.pallas_call(
        functools.partial(_kernel, split=split, scale=scale),
        grid=(b, kh, split.n_splits),
        in_specs=[pl.BlockSpec((None, None, rows, d), lambda i, j, s: (i, j, 0, 0)), _whole(k), _whole(v), _whole(pos),
                  _whole(counts), _whole(qpos)],
        out_specs=[pl.BlockSpec((None, None, None, rows, d), lambda i, j, s: (i, j, s, 0, 0)),
                   pl.BlockSpec((None, None, None, rows), lambda i, j, s: (i, j, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, kh, split.n_splits, rows, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, kh, split.n_splits, rows), jnp.float32)],
        interpret=interpret,
    )(q, k, v, pos, counts, qpos)
    o, lse = combine(o_part, lse_part)
    o, lse = ungroup_rows(o, lse, t, h)
    o = o.astype(q_BxTxHxD.dtype)
    return (o, lse) if return_lse else o
