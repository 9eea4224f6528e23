"""A fixed-capacity key/value cache as a plain pytree, so decoding stays inside ``jax.jit``.

Slot s of row b holds the key/value of the token at position s. ``lengths[b]`` counts the slots
written; new tokens go to slots ``lengths[b] ..``, so rows of a batch may hold different lengths
(ragged prompts) and attention masks every slot beyond the query's own position.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, S, K, D]
    v: tuple[jax.Array, ...]  # per layer [B, S, K, D]
    lengths: jax.Array  # [B] int32, slots written per row

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @classmethod
    def empty(cls, n_layers: int, batch: int, capacity: int, n_kv_heads: int, head_dim: int,
              dtype=jnp.float32) -> "KVCache":
        shape = (batch, capacity, n_kv_heads, head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(n_layers))
        return cls(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(n_layers)),
                   lengths=jnp.zeros((batch,), jnp.int32))

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in self.k + self.v)


def write_rows(cache_BxSxKxD: jax.Array, new_BxTxKxD: jax.Array, start_B: jax.Array) -> jax.Array:
    """Writes each row's T new entries at its own start slot."""
    def one(c, u, i):
        return jax.lax.dynamic_update_slice(c, u.astype(c.dtype), (i, 0, 0))
    return jax.vmap(one)(cache_BxSxKxD, new_BxTxKxD, start_B)
