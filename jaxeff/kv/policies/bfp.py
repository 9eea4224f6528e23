"""Block floating point keys with K-sort (Trukhanov & Soloveychik, 2024, "Accurate Block
Quantization in LLMs with Outliers", arXiv 2403.20137, sections 3-4).

Keys are stored in BFP: blocks of ``block`` channels share one 8-bit exponent and each value is a
signed ``mantissa_bits``-bit integer (4: the paper's BFP12 layout of 8-bit exponent + 4-bit
mantissas). K-sort: channels are reordered by the norm of W_k's columns, so each block groups
channels of similar scale and outlier channels do not crush the rest of their block. Permuting
W_q and W_k alike leaves q.k unchanged; with RoPE the permutation must not split a rotated
channel pair (it would pair channels that RoPE does not rotate together), so pairs move as units
(:func:`jaxeff.kv.quantized.ksort_permutation`) and the permutation is applied to the rotated
keys as they are written, the inverse as they are read (equivalent to permuting q and k after
RoPE). Values stay in full precision unless ``values=True`` (BFP without sorting). Keys are
quantised as they are written, the prompt's included (the layer is installed before the prompt).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from jaxeff.kv.policies.base import Policy, check_int
from jaxeff.kv.quantized import BFPLayerKV, ksort_permutation


@dataclasses.dataclass(frozen=True)
class BFPKSort(Policy):
    name: ClassVar[str] = "bfp_ksort"
    kind: ClassVar[str] = "quantize"
    uses_budget: ClassVar[bool] = False
    block: int = 32
    mantissa_bits: int = 4
    sort: bool = True
    values: bool = False

    def __post_init__(self):
        check_int(self.name, "block", self.block, 2)
        if self.mantissa_bits not in (2, 4, 8):
            raise ValueError(f"policy {self.name!r}: mantissa_bits must be 2, 4 or 8, got {self.mantissa_bits!r}")
        for f in ("sort", "values"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"policy {self.name!r}: {f} must be true or false, got {getattr(self, f)!r}")

    def check(self, capacity: int, budget: int | None = None) -> None:
        pass

    def prepare(self, cache, model):
        layers = []
        for i, layer in enumerate(cache.layers):
            d = layer.head_dim
            if d % self.block or self.block % 2:
                raise ValueError(f"policy {self.name!r}: block {self.block} must be even and divide the head "
                                 f"dimension {d}")
            if self.sort:
                perm = ksort_permutation(model.blocks[i].attn.wk[...], model.cfg.rope_style)
            else:
                perm = jnp.broadcast_to(jnp.arange(d, dtype=jnp.int32), (layer.n_kv_heads, d))
            layers.append(BFPLayerKV.empty_like(layer, perm, block=self.block, mantissa_bits=self.mantissa_bits,
                                                values=self.values))
        return dataclasses.replace(cache, layers=tuple(layers))
