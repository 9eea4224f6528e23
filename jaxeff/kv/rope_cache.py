"""Keys stored before RoPE and rotated when read: at their absolute positions, or at their slot
(StreamingLLM's position shift, Xiao et al., 2023, arXiv 2309.17453, section 3.2).

By default jaxeff caches keys after RoPE, rotated at their absolute positions: an evicted cache
then still holds each surviving key exactly as the model computed it, and the next token's
position is ``cache.lengths`` however many slots survive. StreamingLLM instead assigns positions
*within the cache*: with sinks and a recent window kept, the keys are read at positions
0 .. n-1 by slot and the query at its own slot, so the model never sees a position beyond the
cache's size. That needs keys stored before RoPE (:class:`RopeLayerKV`): the layer receives the
model's rotated keys, undoes the rotation at their positions, and rotates again when read.

RoPE rotates each channel pair by ``position * freq``; rotations compose, so rotating by ``-p``
undoes a rotation by ``p`` and a query rotated at ``p`` moves to ``p'`` by a rotation of
``p' - p`` (:func:`rotate`). Masks still go by the absolute positions the slots hold (causality
is about which tokens came first, not where they are read).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxeff.kv.cache import KVCache, LayerKV


def rotate(x: jax.Array, positions: jax.Array, base: float, style: str) -> jax.Array:
    """RoPE of ``x [..., D]`` at ``positions`` broadcastable to ``x.shape[:-1]`` (the arithmetic
    of :func:`jaxeff.ops.apply_rope`, for any layout); float32 inside, the input dtype out."""
    d = x.shape[-1]
    inv_freq = base ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32)
    if style == "half":
        x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    elif style == "interleaved":
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xf.shape)
    else:
        raise ValueError(f"rotate: style must be 'half' or 'interleaved', got {style!r}")
    return out.astype(x.dtype)


def slot_ranks(positions_BxKxC: jax.Array, q_positions_BxT: jax.Array) -> jax.Array:
    """[B, K, T]: how many valid slots of each head hold a position <= each query's, minus one:
    the slot position of a query whose own key is in the cache (slots keep position order)."""
    valid = positions_BxKxC >= 0
    le = valid[:, :, None, :] & (positions_BxKxC[:, :, None, :] <= q_positions_BxT[:, None, :, None])
    return le.sum(-1).astype(jnp.int32) - 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RopeLayerKV(LayerKV):
    """A :class:`LayerKV` whose ``k`` holds keys before RoPE. ``shift=False`` reads them rotated at
    their absolute positions (the same attention as the post-RoPE cache, up to float rounding);
    ``shift=True`` reads slot c at position c and rotates each query to its own slot
    (StreamingLLM's position shift)."""

    rope_base: float = dataclasses.field(default=10_000.0, metadata=dict(static=True))
    rope_style: str = dataclasses.field(default="half", metadata=dict(static=True))
    shift: bool = dataclasses.field(default=False, metadata=dict(static=True))

    def append(self, k_BxTxKxD, v_BxTxKxD, positions_BxT, keep_BxT=None):
        k_raw = rotate(k_BxTxKxD, -positions_BxT[:, :, None], self.rope_base, self.rope_style)
        return super().append(k_raw, v_BxTxKxD, positions_BxT, keep_BxT)

    def read_positions(self) -> jax.Array:
        """[B, K, C]: the position each slot's key is rotated to when read."""
        if not self.shift:
            return self.positions
        return jnp.broadcast_to(jnp.arange(self.capacity, dtype=jnp.int32), self.positions.shape)

    def keys_values(self, dtype):
        k = rotate(self.k, self.read_positions(), self.rope_base, self.rope_style)
        return jnp.swapaxes(k, 1, 2).astype(dtype), jnp.swapaxes(self.v, 1, 2).astype(dtype)

    def rotate_queries(self, q_BxTxHxD: jax.Array, positions_BxT: jax.Array) -> jax.Array:
        """Queries rotated at ``positions`` moved to where this layer reads them."""
        if not self.shift:
            return q_BxTxHxD
        b, t, h, d = q_BxTxHxD.shape
        kh = self.n_kv_heads
        delta_BxTxK = jnp.swapaxes(slot_ranks(self.positions, positions_BxT) - positions_BxT[:, None, :], 1, 2)
        q = q_BxTxHxD.reshape(b, t, kh, h // kh, d)
        return rotate(q, delta_BxTxK[..., None], self.rope_base, self.rope_style).reshape(b, t, h, d)


def pre_rope_cache(cache: KVCache, *, rope_base: float, rope_style: str, shift: bool = False) -> KVCache:
    """The same (empty or filled) cache with keys stored before RoPE. A filled post-RoPE cache's
    keys are un-rotated at their positions."""
    layers = []
    for layer in cache.layers:
        if isinstance(layer, RopeLayerKV):
            raise ValueError("pre_rope_cache: cache already stores keys before RoPE")
        k_raw = rotate(layer.k, -layer.positions, rope_base, rope_style)
        layers.append(RopeLayerKV(k=jnp.where(layer.valid[..., None], k_raw, 0).astype(layer.k.dtype), v=layer.v,
                                  positions=layer.positions, counts=layer.counts, read_impl=layer.read_impl,
                                  rope_base=float(rope_base), rope_style=rope_style, shift=bool(shift)))
    return dataclasses.replace(cache, layers=tuple(layers))
