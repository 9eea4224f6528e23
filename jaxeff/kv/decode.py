"""Cache reads through the decode-attention kernels of ``pallas_kernels/decode_attention``.

``with_decode_kernel(cache, impl)`` marks every layer so that :func:`jaxeff.nn.cache_attend`
reads it with ``pallas_kernels.decode_attention.api.decode_attention`` (per-head slot counts and
positions, GQA groups read once, a split over the slots for long caches) instead of the dense
``jaxeff.ops`` attention, whenever the call has no read-time selection and the plain causal
pattern; the reference path stays the default. On a CPU the kernels run in interpret mode.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxeff.kv.cache import KVCache, LayerKV

READ_IMPLS = ("xla", "reference", "portable", "mosaic_gpu", "auto")
# Query rows per key/value head (T x H / K) that the kernels take in one tile: a decode step or a
# speculative verification. A longer read (the prompt's prefill into a marked cache) goes through
# the dense attention instead: the Hopper kernel refuses it and the portable one would run a
# whole prompt as a single block.
MAX_KERNEL_ROWS = 64


def uses_kernel(layer, q_BxTxHxD, n_kv_heads: int) -> bool:
    """Whether ``cache_attend`` reads ``layer`` for these queries through its decode kernel."""
    rows = q_BxTxHxD.shape[1] * (q_BxTxHxD.shape[2] // n_kv_heads)
    return layer.read_impl != "xla" and rows <= MAX_KERNEL_ROWS


def with_decode_kernel(cache: KVCache, impl: str = "portable") -> KVCache:
    if impl not in READ_IMPLS:
        raise ValueError(f"with_decode_kernel: impl must be one of {READ_IMPLS}, got {impl!r}")
    return dataclasses.replace(cache, layers=tuple(dataclasses.replace(l, read_impl=impl) for l in cache.layers))


def decode_read(layer, q_BxTxHxD, positions_BxT, impl: str):
    """The attention output of ``q`` over ``layer`` through a decode kernel."""
    from pallas_kernels.decode_attention.api import decode_attention
    if type(layer) is LayerKV:
        k, v = layer.k.astype(q_BxTxHxD.dtype), layer.v.astype(q_BxTxHxD.dtype)
    else:
        k_all, v_all = layer.keys_values(q_BxTxHxD.dtype)
        k, v = jnp.swapaxes(k_all, 1, 2), jnp.swapaxes(v_all, 1, 2)
    return decode_attention(q_BxTxHxD, k, v, layer.positions, positions_BxT, layer.counts, impl=impl)
