"""A policy with its budget and timing, as the cache transform :func:`jaxeff.generate` runs.

:class:`KVCompression` turns a policy (:mod:`jaxeff.kv.policies`), a :class:`~jaxeff.kv.Budget`
and an interval into a :class:`~jaxeff.kv.transform.CacheTransform`: ``prepare`` installs the
policy's layer type before the prompt, ``after_prefill`` observes the prompt and compresses,
``observe`` sees every decode step and ``__call__`` compresses again every ``every`` steps. The
budget per row comes from the tokens seen (``cache.lengths``) at each compression.
:func:`compress_once` does the prompt part outside ``generate`` (evaluation code).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxeff.kv.budget import Budget, as_budget
from jaxeff.kv.cache import KVCache
from jaxeff.kv.observe import Observation
from jaxeff.kv.policies.base import Policy
from jaxeff.kv.registry import policy as make_policy


@dataclasses.dataclass(frozen=True)
class KVCompression:
    policy: Policy
    budget: Budget | None = None
    every: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "policy", make_policy(self.policy))
        object.__setattr__(self, "budget", as_budget(self.budget))
        if self.policy.uses_budget and self.budget is None:
            raise ValueError(f"kv_budget: policy {self.policy.name!r} needs a budget (a ratio in (0, 1] or a "
                             f"token count)")
        if not self.policy.uses_budget and self.budget is not None and self.budget.value != 1.0:
            raise ValueError(f"kv_budget: policy {self.policy.name!r} ({self.policy.kind}) evicts nothing; give no "
                             f"budget, got {self.budget.value!r}")
        if self.every is not None and (isinstance(self.every, bool) or not isinstance(self.every, int)
                                       or self.every < 1):
            raise ValueError(f"compress_every: must be an integer >= 1 or None, got {self.every!r}")

    # ---- the CacheTransform protocol (and generate's extra hooks)
    @property
    def stats_rows(self) -> int:
        return self.policy.stats_rows

    @property
    def stats_sums(self) -> bool:
        return self.policy.needs_sums

    def prepare(self, cache: KVCache, model) -> KVCache:
        return self.policy.prepare(cache, model)

    def observation(self, cache: KVCache, stats: dict, *, prefill: bool, budget_value=None) -> Observation:
        b = self.budget
        ratio = None
        if b is not None and b.is_ratio:
            v = b.value if budget_value is None else budget_value
            ratio = jnp.broadcast_to(jnp.asarray(v, jnp.float32), cache.lengths.shape)
        if b is None:
            tokens = cache.lengths.astype(jnp.int32)
            per_layer = (tokens,) * len(cache.layers)
            headwise, safeguard = False, 0.2
        else:
            tokens = b.tokens(cache.lengths, budget_value)
            per_layer = b.per_layer(tokens, len(cache.layers))
            headwise, safeguard = b.headwise, b.safeguard
        return Observation.from_stats(stats, budget=tokens, layer_budgets=per_layer, ratio=ratio, prefill=prefill,
                                      headwise=headwise, safeguard=safeguard)

    def init(self, cache: KVCache):  # the plain protocol: generate uses after_prefill instead
        return None

    def after_prefill(self, cache: KVCache, state, stats: dict, budget_value=None):
        obs = self.observation(cache, stats, prefill=True, budget_value=budget_value)
        pstate = self.policy.init(cache, obs)
        pstate = self.policy.observe(cache, pstate, obs)
        return self.policy(cache, pstate, obs)

    def observe(self, cache: KVCache, state, stats: dict, budget_value=None):
        return self.policy.observe(cache, state, self.observation(cache, stats, prefill=False,
                                                                    budget_value=budget_value))

    def __call__(self, cache: KVCache, state, stats: dict, budget_value=None):
        return self.policy(cache, state, self.observation(cache, stats, prefill=False, budget_value=budget_value))

    # ---- static sizing and checks
    def interval(self) -> int | None:
        return self.every if self.every is not None else getattr(self.policy, "default_every", None)

    def capacity(self, prompt_len: int, new_tokens: int, n_kv_heads: int = 1) -> int:
        """Slots a cache needs so that it never overflows: the prompt, and after each compression
        what the policy keeps plus the tokens appended before the next one (with head-wise
        allocation one head may take up to the whole layer's share)."""
        full = prompt_len + new_tokens
        if self.budget is None or not self.policy.uses_budget:
            return full
        every = self.interval()
        tokens = self.budget.max_tokens(full) * (n_kv_heads if self.budget.headwise else 1)
        kept = self.policy.max_kept(tokens, full, 1)
        return min(full, max(prompt_len, kept + (every if every is not None else new_tokens)))

    def check(self, capacity: int, prompt_lengths) -> None:
        """Raises ``ValueError`` naming the argument when the budget cannot be met."""
        if self.budget is None:
            self.policy.check(capacity, None)
            return
        shortest = min(prompt_lengths)
        tokens = self.budget.max_tokens(shortest) if self.budget.is_ratio else self.budget.value
        if not self.budget.is_ratio and tokens > capacity:
            raise ValueError(f"kv_budget: {tokens} slots per head exceed the cache capacity {capacity}")
        self.policy.check(capacity, min(tokens, capacity) if self.budget.is_ratio else tokens)


def compress_once(model, tokens_BxT, lengths_B, transform: KVCompression, capacity: int, *, budget_value=None):
    """Prefills the prompts into a fresh cache of ``capacity`` slots and compresses it (inside
    whatever jit calls this). Returns ``(logits, cache, state)``."""
    cache = transform.prepare(model.init_cache(tokens_BxT.shape[0], capacity), model)
    kw = {"stats_sums": True} if transform.stats_sums else {}
    logits, cache, stats = model.extend(tokens_BxT, cache, valid_lengths=lengths_B, stats_rows=transform.stats_rows,
                                        **kw)
    cache, state = transform.after_prefill(cache, None, stats, budget_value=budget_value)
    return logits, cache, state


def kept_slots(cache: KVCache) -> jax.Array:
    """[L, B, K]: slots in use per layer, row and head."""
    return jnp.stack([layer.counts for layer in cache.layers])
