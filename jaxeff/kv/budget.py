"""How many slots a compression keeps: a ratio of the tokens seen or a fixed token count, per
layer (a schedule of relative weights) and per head (uniform, or one layer budget allocated over
the heads, AdaKV-style: :func:`jaxeff.kv.select.keep_top`)."""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Budget:
    """``value``: a float in (0, 1] keeps that fraction of each row's tokens (``floor(value *
    lengths)``, at least 1); an int >= 1 keeps that many slots per head. ``layers``: relative
    per-layer weights (normalised to mean 1, so the total stays ``value`` x layers), ``None`` for
    the same budget in every layer (a policy with its own allocation, PyramidKV or D2O, ignores
    it). ``headwise``: the layer's ``K x budget`` slots go to whichever heads score highest, each
    head first keeping its top ``safeguard x budget``."""

    value: float | int
    layers: tuple[float, ...] | None = None
    headwise: bool = False
    safeguard: float = 0.2

    def __post_init__(self):
        v = self.value
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ValueError(f"budget: must be a ratio in (0, 1] or a token count >= 1, got {v!r}")
        if isinstance(v, numbers.Integral):
            if v < 1:
                raise ValueError(f"budget: a token count must be >= 1, got {v}")
            object.__setattr__(self, "value", int(v))
        elif not (math.isfinite(v) and 0.0 < v <= 1.0):
            raise ValueError(f"budget: a ratio must be in (0, 1], got {v!r} (give an int for a token count)")
        if self.layers is not None:
            w = tuple(float(x) for x in self.layers)
            if not w or any(not math.isfinite(x) or x <= 0 for x in w):
                raise ValueError(f"budget: layer weights must be positive numbers, got {self.layers!r}")
            object.__setattr__(self, "layers", w)
        if not 0.0 <= self.safeguard <= 1.0:
            raise ValueError(f"budget: safeguard must be in [0, 1], got {self.safeguard!r}")

    @property
    def is_ratio(self) -> bool:
        return isinstance(self.value, float)

    def tokens(self, lengths_B: jax.Array, value: jax.Array | None = None) -> jax.Array:
        """[B] int32 slots per head (the layer average) for rows that have seen ``lengths``.
        ``value`` overrides ``self.value`` with a traced number of the same kind (one compiled
        program for every budget)."""
        return budget_tokens(self.value if value is None else value, self.is_ratio, lengths_B)

    def per_layer(self, tokens_B: jax.Array, n_layers: int) -> tuple[jax.Array, ...]:
        """Per-layer slots per head: ``floor(tokens * w_l / mean(w))``, at least 1."""
        if self.layers is None:
            return (tokens_B,) * n_layers
        if len(self.layers) != n_layers:
            raise ValueError(f"budget: {len(self.layers)} layer weights for a cache of {n_layers} layers")
        mean = sum(self.layers) / n_layers
        return tuple(jnp.maximum(jnp.floor(tokens_B * (w / mean)), 1).astype(jnp.int32) for w in self.layers)

    def max_tokens(self, length: int) -> int:
        """The largest per-head budget for a row of ``length`` tokens (static, for capacities)."""
        base = math.floor(self.value * length) if self.is_ratio else self.value
        if self.layers is not None:
            base = math.floor(base * max(self.layers) / (sum(self.layers) / len(self.layers)))
        return max(int(base), 1)


def budget_tokens(value, is_ratio: bool, lengths_B: jax.Array) -> jax.Array:
    lengths_B = jnp.asarray(lengths_B, jnp.int32)
    if is_ratio:
        return jnp.maximum(jnp.floor(jnp.asarray(value, jnp.float32) * lengths_B), 1).astype(jnp.int32)
    return jnp.broadcast_to(jnp.asarray(value, jnp.int32), lengths_B.shape)


def as_budget(budget) -> Budget | None:
    """A :class:`Budget` from a number or a Budget (None stays None)."""
    if budget is None or isinstance(budget, Budget):
        return budget
    return Budget(budget)
