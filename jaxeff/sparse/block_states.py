"""Block states (empty / partial / full) from a mask's structure, without evaluating elements.

``create_block_mask`` classifies blocks element by element (bounded memory, any mask); for the
masks a training step builds every batch that is most of its cost. For these masks the states
follow exactly from a few numbers per block, so they are computed on the [nQ, nKV] grid:

* a band ``local(window_left, window_right, offset=o)`` (``causal`` is ``local(None, 0)``):
  over a block, d = kv - q - o takes every integer from kv_lo - q_hi - o to kv_hi - q_lo - o, so
  the block is empty when that range misses [-window_left, window_right], full when it lies
  inside (and the block holds no padding), partial otherwise;
* ``document(segment_ids)`` (self-attention). In a row whose documents are contiguous runs with
  distinct ids (what packing makes), a block's queries and keys cover runs [lo, hi] (run indices
  grow with the position). The block is empty when the ranges do not meet, full when both are one
  and the same run, and partial otherwise: exact. A row where an id comes back after another
  (not run-unique) is classified from each block's id range [min, max] instead. Such a block is
  empty only when the two ranges do not meet, so no allowed pair is ever skipped; the
  classification is conservative (some empty blocks count as partial and are computed with the
  element mask), and the attention is the same. Both classifications are computed and
  ``jnp.where`` picks one per row. A ``lax.cond`` here cost a device-to-host read of its
  predicate on every traced build on a GPU (+9% wall time at S16384, 2026-12-02);
* ``and_masks(document, causal)`` (the packed-training mask): the AND of the two states is
  exact, because blocks are aligned powers of two, so a block partial for causality contains
  some diagonal pair (t, t), which every document allows.

Anything else returns None and is classified element by element. States use the padding rule of
:mod:`jaxeff.sparse.block_mask`: elements past Q_LEN or KV_LEN are masked, so a block holding
any padding is never full.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxeff.sparse.masks import And, Causal, Document, Local

EMPTY, PARTIAL, FULL = 0, 1, 2


def _ranges(n_blocks: int, block: int, length: int):
    """First and last real index of each block, and whether it holds padding."""
    lo = jnp.arange(n_blocks, dtype=jnp.int32) * block
    hi = jnp.minimum(lo + block, length) - 1
    return lo, hi, lo + block > length


def _band(mask, q_len, kv_len, bq, bk):
    """[nQ, nK] states of a band (Causal or Local)."""
    if isinstance(mask, Causal):
        left, right, off = None, 0, mask.offset
    else:
        left, right, off = mask.window_left, mask.window_right, mask.offset
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    q_lo, q_hi, q_pad = _ranges(nq, bq, q_len)
    k_lo, k_hi, k_pad = _ranges(nk, bk, kv_len)
    d_min = k_lo[None, :] - q_hi[:, None] - off
    d_max = k_hi[None, :] - q_lo[:, None] - off
    lo = -left if left is not None else None
    empty = jnp.zeros((nq, nk), bool)
    inside = jnp.ones((nq, nk), bool)
    if lo is not None:
        empty = empty | (d_max < lo)
        inside = inside & (d_min >= lo)
    if right is not None:
        empty = empty | (d_min > right)
        inside = inside & (d_max <= right)
    full = inside & ~q_pad[:, None] & ~k_pad[None, :]
    return jnp.where(empty, EMPTY, jnp.where(full, FULL, PARTIAL)).astype(jnp.int8)


def _runs(seg_BxT: jax.Array):
    """Run index of each token, and whether each row's runs have distinct ids ([B] bool)."""
    change = jnp.concatenate([jnp.zeros_like(seg_BxT[:, :1], bool), seg_BxT[:, 1:] != seg_BxT[:, :-1]], axis=1)
    run_BxT = jnp.cumsum(change, axis=1).astype(jnp.int32)
    srt = jnp.sort(seg_BxT, axis=1)
    distinct_B = 1 + jnp.sum(srt[:, 1:] != srt[:, :-1], axis=1)
    return run_BxT, distinct_B == run_BxT[:, -1] + 1


def _interval_states(q_lo_BxN, q_hi_BxN, k_lo_BxM, k_hi_BxM, q_pad, k_pad):
    """[B, nQ, nK] states of blocks whose queries and keys cover the value intervals [lo, hi] of a
    quantity that must be equal for a pair to attend (a run index, or an id)."""
    empty = (q_hi_BxN[:, :, None] < k_lo_BxM[:, None, :]) | (k_hi_BxM[:, None, :] < q_lo_BxN[:, :, None])
    one = ((q_lo_BxN == q_hi_BxN)[:, :, None] & (k_lo_BxM == k_hi_BxM)[:, None, :]
           & (q_lo_BxN[:, :, None] == k_lo_BxM[:, None, :]))
    full = one & ~q_pad[None, :, None] & ~k_pad[None, None, :]
    return jnp.where(empty, EMPTY, jnp.where(full, FULL, PARTIAL)).astype(jnp.int8)


def _block_id_range(seg_BxT, n_blocks: int, block: int):
    """Smallest and largest id in each block of a row ([B, n] each; padding excluded)."""
    b, t = seg_BxT.shape
    pad = n_blocks * block - t
    info = jnp.iinfo(jnp.int32)
    lo = jnp.pad(seg_BxT, ((0, 0), (0, pad)), constant_values=info.max).reshape(b, n_blocks, block).min(-1)
    hi = jnp.pad(seg_BxT, ((0, 0), (0, pad)), constant_values=info.min).reshape(b, n_blocks, block).max(-1)
    return lo, hi


def _document(doc: Document, batch, q_len, kv_len, bq, bk):
    """[B, nQ, nK] states of a self-attention document mask: exact on run-unique rows, conservative
    (never empty where a pair attends) on the others."""
    seg = jnp.broadcast_to(doc.q_segment_ids, (batch, q_len)).astype(jnp.int32)
    run_BxT, unique_B = _runs(seg)
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    q_lo, q_hi, q_pad = _ranges(nq, bq, q_len)
    k_lo, k_hi, k_pad = _ranges(nk, bk, kv_len)
    by_runs = _interval_states(run_BxT[:, q_lo], run_BxT[:, q_hi], run_BxT[:, k_lo], run_BxT[:, k_hi], q_pad, k_pad)
    iq_lo, iq_hi = _block_id_range(seg, nq, bq)
    ik_lo, ik_hi = _block_id_range(seg, nk, bk)
    by_ids = _interval_states(iq_lo, iq_hi, ik_lo, ik_hi, q_pad, k_pad)
    return jnp.where(unique_B[:, None, None], by_runs, by_ids)


def _is_plain_causal(m) -> bool:
    return (isinstance(m, Causal) and m.offset == 0) or (
        isinstance(m, Local) and m.window_left is None and m.window_right == 0 and m.offset == 0)


def structural_states(mask_fn, batch: int, heads: int, q_len: int, kv_len: int, bq: int, bk: int):
    """[batch, heads, nQ, nK] int8 states of ``mask_fn`` from its structure, or None when its
    structure does not give them (exactly, or for document rows that are not run-unique,
    conservatively)."""
    shape = (batch, heads, -(-q_len // bq), -(-kv_len // bk))
    if isinstance(mask_fn, (Causal, Local)):
        return jnp.broadcast_to(_band(mask_fn, q_len, kv_len, bq, bk), shape)
    parts = mask_fn.parts if isinstance(mask_fn, And) else (mask_fn,)
    docs = [p for p in parts if isinstance(p, Document)]
    bands = [p for p in parts if isinstance(p, (Causal, Local))]
    if len(docs) != 1 or docs[0].kv_segment_ids is not None or q_len != kv_len \
            or len(docs) + len(bands) != len(parts) or len(bands) > 1 or (bands and not _is_plain_causal(bands[0])):
        return None
    states = _document(docs[0], batch, q_len, kv_len, bq, bk)
    if bands:
        band = _band(bands[0], q_len, kv_len, bq, bk)[None]
        states = jnp.minimum(states, band)  # empty < partial < full: min is the AND (exact on exact states)
    return jnp.broadcast_to(states[:, None], shape)
