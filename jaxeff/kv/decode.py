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
