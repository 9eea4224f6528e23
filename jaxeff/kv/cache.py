"""A fixed-capacity key/value cache whose slots carry their positions, as a plain pytree, so
decoding (and any transform of the cache: eviction, merging, quantisation) stays inside
``jax.jit``.

Per layer (:class:`LayerKV`): keys and values ``[B, K, C, D]`` (K key/value heads, static
capacity C), the absolute position each slot holds ``[B, K, C]`` (-1: empty) and the slots in
use per head ``[B, K]``. New tokens take each head's next free slots, so a slot's index says
nothing about its token: attention masks by validity and position (a query at position p sees
the slots holding positions <= p), never by slot index. Heads may hold different tokens (after
a per-head eviction). :class:`KVCache` adds the tokens seen per row, ``lengths [B]``: the next
token's position, however many slots survive.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxeff.ops.attention_mask import AttentionMask


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerKV:
    k: jax.Array  # [B, K, C, D]
    v: jax.Array  # [B, K, C, D]
    positions: jax.Array  # [B, K, C] int32, -1 where the slot is empty
    counts: jax.Array  # [B, K] int32, slots in use (the used slots are 0 .. counts - 1)
    # How cache reads attend (jaxeff.nn.cache_attend): 'xla' (the jaxeff.ops attention dispatch) or
    # a pallas_kernels.decode_attention implementation for decode-sized queries ('reference',
    # 'portable', 'mosaic_gpu'); see jaxeff.kv.with_decode_kernel.
    read_impl: str = dataclasses.field(default="xla", metadata=dict(static=True))

    @classmethod
    def empty(cls, batch: int, n_kv_heads: int, capacity: int, head_dim: int, dtype=jnp.float32) -> "LayerKV":
        shape = (batch, n_kv_heads, capacity, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   positions=jnp.full(shape[:3], -1, jnp.int32), counts=jnp.zeros(shape[:2], jnp.int32))

    @property
    def capacity(self) -> int:
        return self.positions.shape[2]

    @property
    def n_kv_heads(self) -> int:
        return self.positions.shape[1]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    @property
    def valid(self) -> jax.Array:
        """[B, K, C] bool: the slots that hold a token."""
        return self.positions >= 0

    def append(self, k_BxTxKxD: jax.Array, v_BxTxKxD: jax.Array, positions_BxT: jax.Array,
               keep_BxT: jax.Array | None = None) -> tuple["LayerKV", jax.Array]:
        """Writes the kept tokens (default: all) into each head's next free slots, in token
        order. Returns the new layer and each token's slot ``[B, K, T]`` (``capacity`` for a
        token not kept). Tokens beyond the capacity are dropped."""
        b, t = positions_BxT.shape
        keep_BxT = jnp.ones((b, t), bool) if keep_BxT is None else keep_BxT
        rank_BxT = jnp.cumsum(keep_BxT.astype(jnp.int32), axis=1) - 1
        slots_BxKxT = jnp.where(keep_BxT[:, None, :], self.counts[:, :, None] + rank_BxT[:, None, :], self.capacity)
        layer = self.write(k_BxTxKxD, v_BxTxKxD, slots_BxKxT, positions_BxT)
        added_B = keep_BxT.sum(axis=1).astype(jnp.int32)
        counts = jnp.minimum(self.counts + added_B[:, None], self.capacity)
        return dataclasses.replace(layer, counts=counts), slots_BxKxT

    def write(self, k_BxTxKxD: jax.Array, v_BxTxKxD: jax.Array, slots_BxKxT: jax.Array,
              positions_BxT: jax.Array | None = None) -> "LayerKV":
        """Overwrites the given slots (``capacity``: skip) with new keys/values (and positions)."""
        rows = jnp.arange(self.k.shape[0])[:, None, None]
        heads = jnp.arange(self.k.shape[1])[None, :, None]
        put = lambda cache, new: cache.at[rows, heads, slots_BxKxT].set(new.astype(cache.dtype), mode="drop")
        k = put(self.k, jnp.swapaxes(k_BxTxKxD, 1, 2))
        v = put(self.v, jnp.swapaxes(v_BxTxKxD, 1, 2))
        positions = self.positions
        if positions_BxT is not None:
            positions = put(positions, jnp.broadcast_to(positions_BxT[:, None, :], slots_BxKxT.shape))
        return dataclasses.replace(self, k=k, v=v, positions=positions)

    def keys_values(self, dtype) -> tuple[jax.Array, jax.Array]:
        """Keys and values in attention's ``[B, C, K, D]`` layout and the compute dtype."""
        return jnp.swapaxes(self.k, 1, 2).astype(dtype), jnp.swapaxes(self.v, 1, 2).astype(dtype)

    def mask(self, q_positions_BxT: jax.Array, *, pattern: str = "causal") -> AttentionMask:
        """Queries at ``q_positions`` against this layer's slots (per head, by position)."""
        return AttentionMask.by_position(q_positions_BxT, self.positions, pattern=pattern)

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in (self.k, self.v, self.positions, self.counts))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    layers: tuple[LayerKV, ...]
    lengths: jax.Array  # [B] int32, tokens seen per row: the position of the next token

    @classmethod
    def empty(cls, n_layers: int, batch: int, capacity: int, n_kv_heads: int, head_dim: int,
              dtype=jnp.float32) -> "KVCache":
        return cls(layers=tuple(LayerKV.empty(batch, n_kv_heads, capacity, head_dim, dtype) for _ in range(n_layers)),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def capacity(self) -> int:
        return self.layers[0].capacity

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def nbytes(self) -> int:
        """Bytes allocated (every slot, used or not)."""
        return sum(layer.nbytes() for layer in self.layers) + self.lengths.size * 4
