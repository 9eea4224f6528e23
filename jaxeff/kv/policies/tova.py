"""TOVA, token omission via attention (Oren et al., 2024, "Transformers are Multi-State RNNs",
arXiv 2401.06104, section 3.3).

Rule: a slot's score is the attention the *last* query gives it, averaged over all the layer's
heads; the lowest-scoring slot is dropped whenever the cache is over budget (so with a
compression every decode step and a fixed budget, one slot per step). Every head keeps the same
tokens (the score is per layer). Nothing is protected; the newest token competes like the others.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from jaxeff.kv.policies.base import ScoringPolicy


@dataclasses.dataclass(frozen=True)
class TOVA(ScoringPolicy):
    name: ClassVar[str] = "tova"

    @property
    def stats_rows(self) -> int:
        return 1

    def score(self, index, layer, state, obs, lengths_B):
        last_BxHxC = obs.probs[index][:, :, -1, :]
        return jnp.broadcast_to(last_BxHxC.mean(1, keepdims=True), layer.positions.shape)
