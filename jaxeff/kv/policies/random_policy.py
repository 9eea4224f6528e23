"""Random eviction: the baseline every scoring rule must beat (kvpress's ``RandomPress``).

Rule: each (row, head, position) gets a fixed pseudo-random score (an integer hash of the
position, the head and ``seed``, so a token keeps its score across compressions); each head keeps
its ``budget`` highest.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from jaxeff.kv.policies.base import ScoringPolicy, check_int


def hash_score(positions, heads, seed: int):
    """A uniform-looking float in [0, 1) from integers (a multiplicative hash, uint32 arithmetic)."""
    x = positions.astype(jnp.uint32) * jnp.uint32(2654435761) + heads.astype(jnp.uint32) * jnp.uint32(40503)
    x = x ^ jnp.uint32(seed * 2246822519 % 2 ** 32)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(2246822519)
    x = x ^ (x >> 13)
    return (x >> 8).astype(jnp.float32) / float(2 ** 24)


@dataclasses.dataclass(frozen=True)
class RandomEviction(ScoringPolicy):
    name: ClassVar[str] = "random"
    seed: int = 0

    def __post_init__(self):
        check_int(self.name, "seed", self.seed)

    def score(self, index, layer, state, obs, lengths_B):
        heads = jnp.arange(layer.n_kv_heads)[None, :, None] + 97 * index
        return hash_score(layer.positions, heads, self.seed)
