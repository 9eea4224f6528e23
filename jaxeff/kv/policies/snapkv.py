"""SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation",
arXiv 2404.14469, section 4.2 and Listing 1; kvpress's ``SnapKVPress``).

Rule: the last ``window`` queries (the observation window) vote: slot j scores
``s_j = sum_{i in window} A_{h,i,j}`` (softmax over all slots, causal), averaged over the query
heads of each key/value head (GQA, as kvpress), the window's own columns left out; the scores
are smoothed by a 1-D pooling of width ``kernel`` along the slots (``avg``: zero padding,
divided by ``kernel``, torch's ``avg_pool1d``; or ``max``); each head keeps the window and its
``budget - window`` best other slots.

During decoding the window slides: the policy keeps the last ``window`` queries of every layer
(with their positions) in its state and recomputes their attention over the current cache at
each compression (:func:`jaxeff.kv.observe.window_probs`), so compressing during generation
needs no prompt statistics.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from jaxeff.kv.observe import group_mean, window_probs
from jaxeff.kv.policies.base import ScoringPolicy, check_int
from jaxeff.kv.select import recent_mask


def pool_slots(x_BxKxC, kernel: int, pooling: str):
    """1-D pooling along the slot axis, stride 1, ``kernel // 2`` padding (zeros for avg,
    -inf for max), output length C (odd kernel)."""
    if kernel == 1:
        return x_BxKxC
    pad = kernel // 2
    fill = 0.0 if pooling == "avg" else -jnp.inf
    xp = jnp.pad(x_BxKxC, ((0, 0), (0, 0), (pad, pad)), constant_values=fill)
    c = x_BxKxC.shape[-1]
    shifted = jnp.stack([xp[..., j: j + c] for j in range(kernel)], axis=0)
    return shifted.sum(0) / kernel if pooling == "avg" else shifted.max(0)


@dataclasses.dataclass(frozen=True)
class SnapKV(ScoringPolicy):
    name: ClassVar[str] = "snapkv"
    window: int = 32
    kernel: int = 5
    pooling: str = "avg"

    def __post_init__(self):
        check_int(self.name, "window", self.window, 1)
        check_int(self.name, "kernel", self.kernel, 1)
        if self.kernel % 2 == 0:
            raise ValueError(f"policy {self.name!r}: kernel must be odd (a centred pooling window), got {self.kernel}")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"policy {self.name!r}: pooling must be 'avg' or 'max', got {self.pooling!r}")

    @property
    def stats_rows(self) -> int:
        return self.window

    def protected_slots(self, budget: int) -> int:
        return self.window

    def check(self, capacity: int, budget: int | None = None) -> None:
        if self.window > capacity:
            raise ValueError(f"policy {self.name!r}: window {self.window} exceeds the cache capacity {capacity}")
        super().check(capacity, budget)

    def init(self, cache, obs=None):
        return tuple({"q": obs.queries[i], "q_pos": obs.q_positions} for i in range(len(cache.layers)))

    def observe(self, cache, state, obs):
        if obs.prefill:
            return tuple({"q": obs.queries[i], "q_pos": obs.q_positions} for i in range(len(state)))
        out = []
        for i, st in enumerate(state):
            q = jnp.concatenate([st["q"], obs.queries[i]], axis=1)[:, -self.window:]
            pos = jnp.concatenate([st["q_pos"], obs.q_positions], axis=1)[:, -self.window:]
            out.append({"q": q, "q_pos": pos})
        return tuple(out)

    def window_scores(self, layer, state, lengths_B):
        """[B, K, C]: the window's summed attention, outside the window, pooled."""
        probs = window_probs(layer, state["q"], state["q_pos"])  # [B, H, W, C]
        votes = group_mean(probs.sum(2), layer.n_kv_heads)
        votes = jnp.where(recent_mask(layer, lengths_B, self.window), 0.0, votes)
        return pool_slots(votes, self.kernel, self.pooling)

    def score(self, index, layer, state, obs, lengths_B):
        return self.window_scores(layer, state, lengths_B)

    def protect(self, index, layer, state, obs, lengths_B, budget_B):
        return recent_mask(layer, lengths_B, self.window)
