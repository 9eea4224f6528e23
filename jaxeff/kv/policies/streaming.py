"""StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks",
arXiv 2309.17453, section 3.2).

Rule: keep the first ``sinks`` tokens (attention sinks, 4 in the paper) and the most recent
``budget - sinks``; evict the rest. As a score: a slot's position, the sinks protected.
``position_shift=True`` also stores keys before RoPE and reads them at their slot, the query at
its own (the paper's "positions within the cache", :mod:`jaxeff.kv.rope_cache`); the default
keeps each key at its absolute position.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from jaxeff.kv.policies.base import ScoringPolicy, check_int
from jaxeff.kv.rope_cache import pre_rope_cache
from jaxeff.kv.select import sink_mask


@dataclasses.dataclass(frozen=True)
class StreamingLLM(ScoringPolicy):
    name: ClassVar[str] = "streaming_llm"
    sinks: int = 4
    position_shift: bool = False

    def __post_init__(self):
        check_int(self.name, "sinks", self.sinks)
        if not isinstance(self.position_shift, bool):
            raise ValueError(f"policy {self.name!r}: position_shift must be true or false, got {self.position_shift!r}")

    def protected_slots(self, budget: int) -> int:
        return self.sinks

    def prepare(self, cache, model):
        if not self.position_shift:
            return cache
        return pre_rope_cache(cache, rope_base=model.cfg.rope_base, rope_style=model.cfg.rope_style, shift=True)

    def score(self, index, layer, state, obs, lengths_B):
        return layer.positions.astype(jnp.float32)

    def protect(self, index, layer, state, obs, lengths_B, budget_B):
        return sink_mask(layer, self.sinks)
