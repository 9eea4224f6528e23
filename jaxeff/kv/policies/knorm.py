"""Key-norm eviction (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV
Cache Compression", arXiv 2406.11430, section 3; kvpress's ``KnormPress``).

Rule: keys with a low L2 norm draw high attention, so a slot's score is ``-||k||`` (of the key as
attention reads it, after RoPE) and each head keeps its ``budget`` lowest-norm keys. Needs no
attention statistics at all, so it runs with any attention implementation. Nothing is protected
(as in kvpress).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jaxeff.kv.observe import key_norms
from jaxeff.kv.policies.base import ScoringPolicy


@dataclasses.dataclass(frozen=True)
class KNorm(ScoringPolicy):
    name: ClassVar[str] = "knorm"

    def score(self, index, layer, state, obs, lengths_B):
        return -key_norms(layer)
