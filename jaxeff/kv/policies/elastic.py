"""Elastic Cache (Liu et al., 2024, "Efficient Inference of Vision Instruction-Following Models
with Elastic Cache", arXiv 2407.18003, sections 3.2-3.3; liuzuyan/ElasticCache).

After the prompt (importance-driven merging): a slot's importance is its accumulated attention,
the column sums over the prompt's queries averaged over all the layer's heads (one score per
token, so every head keeps the same tokens). The first token and the prompt's last token are
always kept; the ``budget`` most important slots become anchors, and every other slot is merged
into its nearest anchor *by position* (ties to the earlier anchor): an anchor becomes the mean
of itself and the slots merged into it, keys and values alike. The paper's budget is
``floor((1 - gamma) T)``, gamma = 0.2 (``budget=0.8`` here).

During generation (fixed-point elimination): whenever the cache is over budget the slot at index
``count + distance`` is deleted (distance = -25: a token 25 slots back from the newest), one per
step; deleting ``n`` slots at once removes the contiguous run of indices
``[budget + distance + 1, count + distance]``, which is what n single-step deletions remove.

The reference code ranks with ``argsort`` where it needs the inverse permutation (it selects by
argsort indices as if they were ranks); this follows the paper's semantics instead.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from jaxeff.kv.policies.base import ScoringPolicy
from jaxeff.kv.select import keep_top, merge_mean, recent_mask, sink_mask


def nearest_anchor(positions, keep):
    """[B, K, C]: for each slot the kept slot nearest by position (ties: the earlier one)."""
    dist = jnp.abs(positions[:, :, :, None] - positions[:, :, None, :]).astype(jnp.float32)
    dist = jnp.where(keep[:, :, None, :], dist, jnp.inf)
    return jnp.argmin(dist, -1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class ElasticCache(ScoringPolicy):
    name: ClassVar[str] = "elastic_cache"
    kind: ClassVar[str] = "merge"
    slot_state: ClassVar[tuple[str, ...]] = ()
    distance: int = -25
    merge: bool = True

    def __post_init__(self):
        if isinstance(self.distance, bool) or not isinstance(self.distance, int) or self.distance > 0:
            raise ValueError(f"policy {self.name!r}: distance must be an integer <= 0, got {self.distance!r}")

    @property
    def needs_sums(self) -> bool:
        return True

    def protected_slots(self, budget: int) -> int:
        return 2

    def init(self, cache, obs=None):
        return tuple({"importance": obs.sums[i].mean(1)} for i in range(len(cache.layers)))

    def score(self, index, layer, state, obs, lengths_B):
        return jnp.broadcast_to(state["importance"][:, None, :], layer.positions.shape)

    def protect(self, index, layer, state, obs, lengths_B, budget_B):
        return sink_mask(layer, 1) | recent_mask(layer, lengths_B, 1)

    def evict(self, index, layer, state, obs, lengths_B, budget_B):
        if obs.prefill:
            keep = keep_top(self.score(index, layer, state, obs, lengths_B), layer.valid,
                            self.protect(index, layer, state, obs, lengths_B, budget_B), budget_B)
            if self.merge:
                dest = nearest_anchor(layer.positions, keep)
                evicted = layer.valid & ~keep
                layer = merge_mean(layer, jnp.where(evicted, dest, layer.capacity), jnp.ones(dest.shape, jnp.float32))
            return self.apply_keep(index, layer, state, keep, obs)
        count = layer.counts[..., None]
        budget = jnp.broadcast_to(budget_B[:, None, None], count.shape)
        idx = jnp.arange(layer.capacity)[None, None, :]
        lo = jnp.maximum(budget + self.distance + 1, 1)
        hi = count + self.distance
        drop = (count > budget) & (idx >= lo) & (idx <= hi)
        return self.apply_keep(index, layer, state, layer.valid & ~drop, obs)
