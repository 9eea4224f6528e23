"""PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
Information Funneling", arXiv 2406.02069, section 3.2; the layer budgets as the authors' code,
``PyramidKVCluster``, computes them).

Rule: SnapKV's scores and window in every layer, with budgets that fall linearly with depth.
For a per-head budget B (window W included) over L layers and a prompt of n tokens, the
non-window part c = B - W gives ``min = floor(c / beta)`` and ``max = 2 c - min``; when
``max >= n - W`` the top is cut to ``max = n - W`` and ``min = 2 c - max`` (the mean stays c).
Layer l keeps ``W + max - l * floor((max - min) / (L - 1))`` slots. ``beta = 20`` (the paper's).
(kvpress instead falls back to SnapKV's uniform budget unless ``n >= max >= min >= W``, which at
beta = 20 and W = 32 needs B >= 672: this follows the paper's code, which always builds the
pyramid.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax.numpy as jnp

from jaxeff.kv.policies.base import check_float
from jaxeff.kv.policies.snapkv import SnapKV


def pyramid_budgets(budget_B, lengths_B, n_layers: int, beta: float, window: int):
    """Per-layer slots per head (a tuple of [B] int32) for a per-head budget ``budget_B``."""
    c = jnp.maximum(budget_B.astype(jnp.int32) - window, 0)
    lo = jnp.floor(c / beta).astype(jnp.int32)
    hi = 2 * c - lo
    cut = hi >= lengths_B - window
    hi = jnp.where(cut, lengths_B - window, hi)
    lo = jnp.where(cut, 2 * c - hi, lo)
    steps = (hi - lo) // max(n_layers - 1, 1)
    return tuple(jnp.maximum(window + hi - l * steps, window).astype(jnp.int32) for l in range(n_layers))


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
        return min(length, max(budget, 2 * budget - self.window))
