"""KIVI as a cache transform (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit
Quantization for KV Cache", arXiv 2402.02750, section 3.3 and Algorithm 1).

After the prompt (attended in full precision, as in the paper) every layer becomes a
:class:`jaxeff.kv.quantized.KIVILayerKV`: keys quantised per channel over groups of ``group``
tokens, values per token over groups of ``group`` channels, ``bits`` = 2 or 4, asymmetric
(min and scale, float16), the newest ``residual`` (to ``residual + group - 1``) tokens kept in
full precision; later appends quantise whole groups as they leave the residual window. Nothing
is evicted; the budget does not apply.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jaxeff.kv.policies.base import Policy, check_int
from jaxeff.kv.quantized import KIVILayerKV


@dataclasses.dataclass(frozen=True)
class KIVI(Policy):
    name: ClassVar[str] = "kivi"
    kind: ClassVar[str] = "quantize"
    uses_budget: ClassVar[bool] = False
    bits: int = 2
    group: int = 32
    residual: int = 32

    def __post_init__(self):
        if self.bits not in (2, 4, 8):
            raise ValueError(f"policy {self.name!r}: bits must be 2, 4 or 8, got {self.bits!r}")
        check_int(self.name, "group", self.group, 1)
        check_int(self.name, "residual", self.residual)

    def check(self, capacity: int, budget: int | None = None) -> None:
        pass

    def __call__(self, cache, state, obs):
        if all(isinstance(layer, KIVILayerKV) for layer in cache.layers):
            return cache, state  # appends quantise as tokens leave the residual window
        for layer in cache.layers:
            if layer.head_dim % self.group:
                raise ValueError(f"policy {self.name!r}: group {self.group} must divide the head dimension "
                                 f"{layer.head_dim}")
        layers = tuple(KIVILayerKV.from_layer(layer, bits=self.bits, group=self.group, residual=self.residual)
                       for layer in cache.layers)
        return dataclasses.replace(cache, layers=layers), state
