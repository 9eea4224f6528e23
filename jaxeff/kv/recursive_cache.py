"""KV caches for recursive transformers and Mixture-of-Recursions decoding (Bae et al., 2025,
arXiv 2507.10524, section 2.2.2).

Two strategies for the shared blocks:

* recursion-wise caching (``kv_strategy='recursion'``): recursion step r keeps its own cache
  holding only the tokens that reached step r; attention at step r reads only that cache.
* recursive KV sharing (``kv_strategy='share'``): only the first recursion's keys and values are
  stored, and every later recursion attends to them (``kv_share_update``: the tokens a later
  step selects overwrite their own first-step entries).

Every layer is a :class:`~jaxeff.kv.cache.LayerKV`: a token that reaches step r takes the next
free slot of that step's layers, and the slot remembers the token's position (its keys are
already rotated at that position), so causal masking goes by position, not by slot. The first
and last layers of the ``middle_*`` strategies see every token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxeff.kv.cache import LayerKV


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RecursiveCache:
    unique: tuple[LayerKV, ...]  # the first and last layers (middle_* strategies), else empty
    shared: tuple[LayerKV, ...]  # stored recursion s, shared block j at index s * n_shared + j
    lengths: jax.Array  # [B] tokens seen
    n_stored: int = dataclasses.field(metadata=dict(static=True), default=1)

    @property
    def capacity(self) -> int:
        return self.shared[0].capacity

    @property
    def n_shared(self) -> int:
        return len(self.shared) // self.n_stored

    def layer(self, stored: int, block: int) -> LayerKV:
        return self.shared[stored * self.n_shared + block]

    @classmethod
    def empty(cls, *, n_unique: int, stored_capacities: tuple[int, ...], n_shared: int, batch: int, capacity: int,
              n_kv_heads: int, head_dim: int, dtype=jnp.float32) -> "RecursiveCache":
        """``stored_capacities``: the slots of each stored recursion's layers (the first and last
        layers get ``capacity``)."""
        make = lambda c: LayerKV.empty(batch, n_kv_heads, c, head_dim, dtype)
        shared = tuple(make(c) for c in stored_capacities for _ in range(n_shared))
        return cls(unique=tuple(make(capacity) for _ in range(n_unique)), shared=shared,
                   lengths=jnp.zeros((batch,), jnp.int32), n_stored=len(stored_capacities))

    def nbytes(self) -> int:
        """Bytes allocated (every slot, written or not)."""
        return sum(layer.nbytes() for layer in self.unique + self.shared)

    def shared_nbytes(self) -> int:
        """Bytes allocated for the shared (recursion) blocks only."""
        return sum(layer.nbytes() for layer in self.shared)

    def held_entries(self) -> dict[str, int]:
        """Key/value entries written, per layer kind: what a memory-tight cache would hold.

        ``shared`` counts token-layer entries of the shared blocks (each stored recursion's count
        times the blocks it serves); ``unique`` those of the first/last layers."""
        head0 = lambda layer: int(jnp.sum(layer.counts[:, 0]))
        return {"unique": sum(head0(layer) for layer in self.unique),
                "shared": sum(head0(layer) for layer in self.shared),
                "tokens": int(jnp.sum(self.lengths))}
