"""H2O, the heavy-hitter oracle (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient
Generative Inference of Large Language Models", arXiv 2306.14048, Algorithm 1 and section 5).

Rule: a slot's score is its accumulated attention, the sum over every query so far (the prompt's
and each decoded token's) of the probability it received, per key/value head (the mean over the
GQA group's query heads). Keep the most recent ``recent`` tokens and the ``budget - recent``
highest scores (heavy hitters). ``recent`` is a fraction of the budget (the paper's equal split:
0.5) or a token count. With a compression every step and a fixed budget this is the paper's
greedy one-eviction-per-step loop.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax.numpy as jnp

from jaxeff.kv.observe import group_mean
from jaxeff.kv.policies.base import ScoringPolicy, check_float, check_int
from jaxeff.kv.select import recent_mask


def recent_count(recent, budget):
    """Tokens of the recent window: ``floor(recent * budget)`` for a fraction, else ``recent``."""
    if isinstance(recent, float):
        return jnp.floor(recent * budget).astype(jnp.int32) if hasattr(budget, "dtype") else math.floor(recent * budget)
    return recent


def check_recent(policy: str, recent) -> None:
    if isinstance(recent, float):
        check_float(policy, "recent", recent, 0.0, 1.0)
    else:
        check_int(policy, "recent", recent)


@dataclasses.dataclass(frozen=True)
class H2O(ScoringPolicy):
    name: ClassVar[str] = "h2o"
    slot_state: ClassVar[tuple[str, ...]] = ("acc",)
    recent: float | int = 0.5

    def __post_init__(self):
        check_recent(self.name, self.recent)

    @property
    def needs_sums(self) -> bool:
        return True

    def protected_slots(self, budget: int) -> int:
        return recent_count(self.recent, budget)

    def init(self, cache, obs=None):
        return tuple({"acc": jnp.zeros(l.positions.shape, jnp.float32)} for l in cache.layers)

    def observe(self, cache, state, obs):
        return tuple({**st, "acc": st["acc"] + group_mean(obs.sums[i], layer.n_kv_heads)}
                     for i, (layer, st) in enumerate(zip(cache.layers, state)))

    def score(self, index, layer, state, obs, lengths_B):
        return state["acc"]

    def protect(self, index, layer, state, obs, lengths_B, budget_B):
        return recent_mask(layer, lengths_B, recent_count(self.recent, budget_B))
