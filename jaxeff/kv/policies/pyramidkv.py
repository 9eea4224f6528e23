"""PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
Information Funneling", arXiv 2406.02069, section 3.2; the layer budgets as kvpress's
``PyramidKVPress.get_layer_budget`` computes them).

Rule: SnapKV's scores and window in every layer, with budgets that fall linearly with depth.
For a mean per-head budget B over L layers: ``min = B / beta``, ``max = 2 B - min``, and layer
l keeps ``round(max - l (max - min) / (L - 1))`` slots, so the layers' mean stays B. Where that
would not fit (``not length >= max >= min >= window``) every layer keeps B (SnapKV), as kvpress
falls back. ``beta = 20`` (the paper's).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax.numpy as jnp

from jaxeff.kv.policies.base import check_float
from jaxeff.kv.policies.snapkv import SnapKV


def pyramid_budgets(budget_B, lengths_B, n_layers: int, beta: float, window: int):
    """Per-layer slots per head (a tuple of [B] int32) for a mean budget ``budget_B``."""
    b = budget_B.astype(jnp.float32)
    lo = b / beta
    hi = 2.0 * b - lo
    fits = (lengths_B >= hi) & (hi >= lo) & (lo >= window)
    steps = (hi - lo) / max(n_layers - 1, 1)
    return tuple(jnp.where(fits, jnp.round(hi - l * steps), b).astype(jnp.int32) for l in range(n_layers))


@dataclasses.dataclass(frozen=True)
class PyramidKV(SnapKV):
    name: ClassVar[str] = "pyramidkv"
    beta: float = 20.0

    def __post_init__(self):
        super().__post_init__()
        check_float(self.name, "beta", self.beta, 1.0, math.inf)

    def layer_budgets(self, cache, state, obs):
        return pyramid_budgets(obs.budget, cache.lengths, len(cache.layers), self.beta, self.window)

    def max_kept(self, budget: int, length: int, n_layers: int) -> int:
        return min(length, max(budget, round(2 * budget - budget / self.beta)))
