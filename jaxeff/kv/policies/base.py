"""The policy contract, and the scoring eviction most policies are.

A policy is a frozen (hashable) dataclass: its fields are its options, and it is a static
argument of the jitted decode loop. It works on a :class:`~jaxeff.kv.KVCache` and its own state
(a pytree, one entry per layer), given an :class:`~jaxeff.kv.observe.Observation`:

* ``stats_rows`` / ``needs_sums``: which statistics the prefill ``extend`` must return;
* ``prepare(cache, model) -> cache``: before the prompt (a layer type: keys before RoPE, Quest's
  read-time selection, block floating point);
* ``init(cache, obs) -> state`` after the prompt; ``observe(cache, state, obs) -> state`` after every
  ``extend`` (the prompt, then every decode step);
* ``__call__(cache, state, obs) -> (cache, state)``: the compression, to ``obs.layer_budgets``
  slots per head.

:class:`ScoringPolicy` implements ``__call__`` for the policies that score slots: per layer
``score`` ([B, K, C], higher is kept) and ``protect`` ([B, K, C] always kept), then
:func:`jaxeff.kv.select.keep_top` and :func:`~jaxeff.kv.select.compact`, which also moves the
per-slot state named in ``slot_state``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxeff.kv.cache import KVCache, LayerKV
from jaxeff.kv.observe import Observation
from jaxeff.kv.select import compact, keep_top


def check_int(policy: str, name: str, value, lo: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"policy {policy!r}: {name} must be an integer >= {lo}, got {value!r}")


def check_float(policy: str, name: str, value, lo: float, hi: float, *, lo_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (lo < value if lo_open else lo <= value) and value <= hi
    if not ok:
        raise ValueError(f"policy {policy!r}: {name} must be a number in {'(' if lo_open else '['}{lo}, {hi}], "
                         f"got {value!r}")


@dataclasses.dataclass(frozen=True)
class Policy:
    name: ClassVar[str] = "policy"
    kind: ClassVar[str] = "evict"  # 'evict', 'merge', 'select' (read time) or 'quantize'
    uses_budget: ClassVar[bool] = True

    @property
    def stats_rows(self) -> int:
        return 0

    @property
    def needs_sums(self) -> bool:
        return False

    def protected_slots(self, budget: int) -> int:
        """Slots per head this policy always keeps under a per-head ``budget`` (eager checks)."""
        return 0

    def check(self, capacity: int, budget: int | None = None) -> None:
        """Raises ``ValueError`` naming the argument when this policy cannot run on a cache of
        ``capacity`` slots with ``budget`` slots per head."""
        if budget is not None and budget > capacity:
            raise ValueError(f"budget: {budget} slots per head exceed the cache capacity {capacity}")
        if budget is not None and self.protected_slots(budget) > budget:
            raise ValueError(f"budget: {budget} slots per head are fewer than the {self.protected_slots(budget)} "
                             f"slots policy {self.name!r} always keeps")

    def prepare(self, cache: KVCache, model) -> KVCache:
        return cache

    def init(self, cache: KVCache, obs: Observation | None = None) -> Any:
        """The state after the prompt (``obs``: the prompt's observation)."""
        return tuple({} for _ in cache.layers)

    def max_kept(self, budget: int, length: int, n_layers: int) -> int:
        """The most slots any head keeps after compressing a row of ``length`` tokens to a
        per-head ``budget`` (static: it sizes caches)."""
        return min(budget, length) if self.uses_budget else length

    def observe(self, cache: KVCache, state, obs: Observation):
        return state

    def __call__(self, cache: KVCache, state, obs: Observation):
        return cache, state

    def layer_budgets(self, cache: KVCache, state, obs: Observation) -> tuple[jax.Array, ...]:
        """Per-layer slots per head: the budget's schedule (policies with their own allocation
        override this)."""
        return obs.layer_budgets


@dataclasses.dataclass(frozen=True)
class ScoringPolicy(Policy):
    slot_state: ClassVar[tuple[str, ...]] = ()  # per-layer state arrays [B, K, C] that follow the slots
    slot_fill: ClassVar[dict] = {}

    def score(self, index: int, layer: LayerKV, state: dict, obs: Observation, lengths_B: jax.Array) -> jax.Array:
        raise NotImplementedError

    def protect(self, index: int, layer: LayerKV, state: dict, obs: Observation, lengths_B: jax.Array,
                budget_B: jax.Array) -> jax.Array:
        return jnp.zeros(layer.positions.shape, bool)

    def evict(self, index: int, layer: LayerKV, state: dict, obs: Observation, lengths_B, budget_B):
        """One layer's eviction: ``(layer, state)``."""
        keep = keep_top(self.score(index, layer, state, obs, lengths_B), layer.valid,
                        self.protect(index, layer, state, obs, lengths_B, budget_B), budget_B,
                        headwise=obs.headwise, safeguard=obs.safeguard)
        return self.apply_keep(index, layer, state, keep, obs)

    def apply_keep(self, index: int, layer: LayerKV, state: dict, keep, obs: Observation):
        moved = {k: state[k] for k in self.slot_state}
        layer, moved = compact(layer, keep, moved, self.slot_fill)
        return layer, {**state, **moved}

    def __call__(self, cache: KVCache, state, obs: Observation):
        budgets = self.layer_budgets(cache, state, obs)
        layers, states = [], []
        for i, (layer, st) in enumerate(zip(cache.layers, state)):
            layer, st = self.evict(i, layer, st, obs, cache.lengths, budgets[i])
            layers.append(layer)
            states.append(st)
        return dataclasses.replace(cache, layers=tuple(layers)), tuple(states)
