"""Shared host-side pieces of the chunk-sparse FFN kernels: input checks, grouping tokens into
chunks, and each chunk's union of active experts as a compacted index list.

Layouts: tokens ``x [B, T, D]``, their expert activations ``a [B, T, E]`` (0 = inactive; BlockFFN's
``A`` after the router), expert weights ``w_up [E, D, F]`` and ``w_down [E, F, D]``. A chunk is
``L`` consecutive tokens of a row: a whole row when ``T <= chunk_len`` (decoding: T = 1; the
speculative-verification case: T = n <= 64), else ``chunk_len`` tokens (prefill / training).
The union list of a chunk holds the ids of the experts that some token of it activates,
ascending, in the first ``counts[c]`` entries of ``ids[c]``; the entries after repeat the last
id (0 for an empty chunk), so a pipeline that prefetches one entry too far reads a valid expert.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_inputs(x_BxTxD, a_BxTxE, w_up_ExDxF, w_down_ExFxD, chunk_len: int) -> None:
    if getattr(x_BxTxD, "ndim", None) != 3:
        raise ValueError(f"chunk_sparse_ffn: x must be [B, T, D], got shape {getattr(x_BxTxD, 'shape', None)}")
    b, t, d = x_BxTxD.shape
    if getattr(w_up_ExDxF, "ndim", None) != 3 or w_up_ExDxF.shape[1] != d:
        raise ValueError(f"chunk_sparse_ffn: w_up must be [E, D={d}, F], got {getattr(w_up_ExDxF, 'shape', None)}")
    e, _, f = w_up_ExDxF.shape
    if getattr(a_BxTxE, "ndim", None) != 3 or tuple(a_BxTxE.shape) != (b, t, e):
        raise ValueError(f"chunk_sparse_ffn: a must be [B, T, E] = {(b, t, e)}, got {getattr(a_BxTxE, 'shape', None)}")
    if tuple(getattr(w_down_ExFxD, "shape", ())) != (e, f, d):
        raise ValueError(f"chunk_sparse_ffn: w_down must be [E, F, D] = {(e, f, d)}, "
                         f"got {getattr(w_down_ExFxD, 'shape', None)}")
    if not isinstance(chunk_len, int) or isinstance(chunk_len, bool) or chunk_len < 1:
        raise ValueError(f"chunk_sparse_ffn: chunk_len must be an integer >= 1, got {chunk_len!r}")


def chunk_shape(t: int, chunk_len: int) -> tuple[int, int]:
    """(chunks per row, tokens per chunk)."""
    if t <= chunk_len:
        return 1, t
    return -(-t // chunk_len), chunk_len


def to_chunks(x_BxTxD, chunk_len: int):
    """``[B, T, ...] -> [B * n, L, ...]`` (the last chunk of a row padded with zeros)."""
    b, t = x_BxTxD.shape[:2]
    n, length = chunk_shape(t, chunk_len)
    pad = n * length - t
    x = jnp.pad(x_BxTxD, ((0, 0), (0, pad)) + ((0, 0),) * (x_BxTxD.ndim - 2))
    return x.reshape(b * n, length, *x_BxTxD.shape[2:])


def from_chunks(y_CxLxD, b: int, t: int):
    return y_CxLxD.reshape(b, -1, y_CxLxD.shape[-1])[:, :t]


def union_mask(a_CxLxE) -> jax.Array:
    """``[C, E]`` bool: the experts some token of each chunk activates."""
    return jnp.any(a_CxLxE != 0, axis=1)


def union_lists(a_CxLxE) -> tuple[jax.Array, jax.Array]:
    """``(ids [C, E] int32, counts [C] int32)``: each chunk's union of active experts, compacted."""
    used = union_mask(a_CxLxE)
    e = used.shape[-1]
    counts = jnp.sum(used, axis=-1).astype(jnp.int32)
    order = jnp.argsort(jnp.where(used, 0, 1), axis=-1, stable=True).astype(jnp.int32)  # used ids first, ascending
    last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[:, None], axis=-1)
    last = jnp.where(counts[:, None] > 0, last, 0)
    ids = jnp.where(jnp.arange(e)[None, :] < counts[:, None], order, last)
    return ids, counts
