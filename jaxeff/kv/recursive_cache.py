"""KV caches for recursive transformers and Mixture-of-Recursions decoding (Bae et al., 2025,
arXiv 2507.10524, section 2.2.2).

Two strategies for the shared blocks:

* recursion-wise caching (``kv_strategy='recursion'``): recursion step r keeps its own cache
  holding only the tokens that reached step r; attention at step r reads only that cache.
* recursive KV sharing (``kv_strategy='share'``): only the first recursion's keys and values are
  stored, and every later recursion attends to them (``kv_share_update``: the tokens a later
  step selects overwrite their own first-step entries).

Shared-block caches are compacted: a token that reaches step r takes the next free slot of that
step's cache, and the slot remembers the token's position (its keys are already rotated at that
position), so causal masking goes by position, not by slot. The first and last layers of the
``middle_*`` strategies see every token and use plain position-indexed caches.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

EMPTY_POSITION = 2 ** 30  # slots not yet written sit "in the future" of every query


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RecursiveCache:
    unique_k: tuple[jax.Array, ...]  # first/last layers, [B, S, K, D], slot = position
    unique_v: tuple[jax.Array, ...]
    k: tuple[jax.Array, ...]  # stored recursion s, shared block j at index s * n_shared + j: [B, S, K, D]
    v: tuple[jax.Array, ...]
    positions: tuple[jax.Array, ...]  # per stored recursion: [B, S] position held by each slot
    counts: jax.Array  # [n_stored, B] slots written per stored recursion
    lengths: jax.Array  # [B] tokens seen

    @property
    def capacity(self) -> int:
        return self.positions[0].shape[1]

    @property
    def n_stored(self) -> int:
        return len(self.positions)

    @classmethod
    def empty(cls, *, n_unique: int, n_stored: int, n_shared: int, batch: int, capacity: int, n_kv_heads: int,
              head_dim: int, dtype=jnp.float32) -> "RecursiveCache":
        shape = (batch, capacity, n_kv_heads, head_dim)
        zeros = lambda n: tuple(jnp.zeros(shape, dtype) for _ in range(n))
        return cls(unique_k=zeros(n_unique), unique_v=zeros(n_unique), k=zeros(n_stored * n_shared),
                   v=zeros(n_stored * n_shared),
                   positions=tuple(jnp.full((batch, capacity), EMPTY_POSITION, jnp.int32) for _ in range(n_stored)),
                   counts=jnp.zeros((n_stored, batch), jnp.int32), lengths=jnp.zeros((batch,), jnp.int32))

    def nbytes(self) -> int:
        """Bytes allocated (every slot, written or not)."""
        return sum(x.size * x.dtype.itemsize for x in self.unique_k + self.unique_v + self.k + self.v)

    def held_entries(self) -> dict[str, int]:
        """Key/value entries written, per layer kind: what a memory-tight cache would hold.

        ``shared`` counts token-layer entries of the shared blocks (each stored recursion's count
        times the blocks it serves); ``unique`` those of the first/last layers."""
        n_shared = len(self.k) // max(self.n_stored, 1)
        lengths = int(jnp.sum(self.lengths))
        return {"unique": len(self.unique_k) * lengths,
                "shared": n_shared * int(jnp.sum(self.counts)),
                "tokens": lengths}


def compact_slots(decide_BxT: jax.Array, counts_B: jax.Array, capacity: int) -> jax.Array:
    """Slot of each deciding token: the row's next free slots in token order; ``capacity``
    (out of range, dropped on write) for the others."""
    rank_BxT = jnp.cumsum(decide_BxT.astype(jnp.int32), axis=1) - 1
    return jnp.where(decide_BxT, counts_B[:, None] + rank_BxT, capacity)


def write_slots(cache_BxSx: jax.Array, new_BxTx: jax.Array, slots_BxT: jax.Array) -> jax.Array:
    rows_Bx1 = jnp.arange(cache_BxSx.shape[0])[:, None]
    return cache_BxSx.at[rows_Bx1, slots_BxT].set(new_BxTx.astype(cache_BxSx.dtype), mode="drop")
