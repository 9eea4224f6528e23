"""LazyEviction (arXiv 2506.15969, "LazyEviction: Lagged KV Eviction with Attention Pattern
Observation for Efficient Long Reasoning", section 3 and Algorithm 1).

State per (layer, head, slot): ``t_last``, the last step the slot was attended, and ``MRI``, its
maximum recurrence interval. After every step t, where the attention ``a >= alpha`` (per
key/value head: the mean over its GQA group's query heads): ``period = t - t_last``,
``t_last = t``, ``MRI = max(MRI, period)`` (a slot not attended yet counts from its own
position). Eviction happens lagged, every ``window`` (W) steps and only when the cache is over
budget: keep the last W tokens and the ``budget - W`` best by

    S = 2 sigmoid(-(1 + (t - t_last) / (MRI + 1e-5))) + 1[MRI > 0] * 2 sigmoid(-(MRI - 1))

(recently attended relative to its own rhythm, and recurring at all). ``alpha``: 5e-4 (the
paper's Llama value; 1e-4 for Qwen). Between evictions the cache grows by up to W slots, so it
peaks at budget + W. The prompt's last W queries are observed in order (the prefill window).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxeff.kv.observe import group_mean
from jaxeff.kv.policies.base import ScoringPolicy, check_float, check_int
from jaxeff.kv.select import recent_mask


def lazy_update(t_last, mri, positions, a_BxKxC, t_B, alpha):
    """One step of the recurrence tracking (t_last = -1: never attended yet)."""
    valid = positions >= 0
    hit = valid & (a_BxKxC >= alpha) & (t_B >= 0)[:, None, None]
    since = jnp.where(t_last < 0, positions, t_last)
    period = t_B[:, None, None] - since
    return jnp.where(hit, t_B[:, None, None], t_last), jnp.where(hit, jnp.maximum(mri, period), mri)


def lazy_score(t_last, mri, positions, t_B):
    since = jnp.where(t_last < 0, positions, t_last).astype(jnp.float32)
    mri = mri.astype(jnp.float32)
    gap = t_B[:, None, None].astype(jnp.float32) - since
    return (2 * jax.nn.sigmoid(-(1 + gap / (mri + 1e-5)))
            + jnp.where(mri > 0, 2 * jax.nn.sigmoid(-(mri - 1)), 0.0))


@dataclasses.dataclass(frozen=True)
class LazyEviction(ScoringPolicy):
    name: ClassVar[str] = "lazy_eviction"
    slot_state: ClassVar[tuple[str, ...]] = ("t_last", "mri")
    slot_fill: ClassVar[dict] = {"t_last": -1, "mri": 0}
    window: int = 32
    alpha: float = 5e-4

    def __post_init__(self):
        check_int(self.name, "window", self.window, 1)
        check_float(self.name, "alpha", self.alpha, 0.0, 1.0)

    @property
    def stats_rows(self) -> int:
        return self.window

    @property
    def default_every(self) -> int:
        return self.window

    def protected_slots(self, budget: int) -> int:
        return self.window

    def check(self, capacity: int, budget: int | None = None) -> None:
        if self.window > capacity:
            raise ValueError(f"policy {self.name!r}: window {self.window} exceeds the cache capacity {capacity}")
        super().check(capacity, budget)

    def init(self, cache, obs=None):
        return tuple({"t_last": jnp.full(l.positions.shape, -1, jnp.int32), "mri": jnp.zeros(l.positions.shape, jnp.int32)}
                     for l in cache.layers)

    def observe(self, cache, state, obs):
        out = []
        for i, (layer, st) in enumerate(zip(cache.layers, state)):
            a = group_mean(obs.probs[i], layer.n_kv_heads)  # [B, K, R, C]

            def row(carry, xs):
                a_BxKxC, t_B = xs
                return lazy_update(*carry, layer.positions, a_BxKxC, t_B, self.alpha), None

            (t_last, mri), _ = jax.lax.scan(row, (st["t_last"], st["mri"]),
                                            (jnp.moveaxis(a, 2, 0), jnp.moveaxis(obs.q_positions, 1, 0)))
            out.append({"t_last": t_last, "mri": mri})
        return tuple(out)

    def score(self, index, layer, state, obs, lengths_B):
        return lazy_score(state["t_last"], state["mri"], layer.positions, lengths_B - 1)

    def protect(self, index, layer, state, obs, lengths_B, budget_B):
        return recent_mask(layer, lengths_B, self.window)
