"""Per-recursion low-rank deltas on a shared block's weights (Relaxed Recursive Transformers,
Bae et al., 2024, arXiv 2410.20672, section 3.2).

Recursion r of a shared block uses W + A_r B_r for every projection W the block names in
:meth:`jaxeff.nn.Block.lora_targets`: the loops share most parameters but each may drift a
little. B starts at zero, so a fresh relaxation changes nothing until it trains;
:func:`jaxeff.models.recursive_convert.convert_from_vanilla` can instead start A_r B_r at the
truncated SVD of (original layer - shared block).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

# name -> (module attribute, weight shape, leading input dims), as Block.lora_targets() gives it
Targets = dict[str, tuple[str, tuple[int, ...], int]]


def fan_in_out(shape: tuple[int, ...], n_in: int) -> tuple[int, int]:
    """A weight as the matrix [fan_in, fan_out] its first ``n_in`` dims multiply from."""
    return math.prod(shape[:n_in]), math.prod(shape[n_in:])


class BlockLoRA(nnx.Module):
    """LoRA factors ``{name}_a [N_r, fan_in, rank]`` and ``{name}_b [N_r, rank, fan_out]``."""

    def __init__(self, targets: Targets, n_recursions: int, rank: int, *, param_dtype: str, rngs: nnx.Rngs):
        # a tuple keeps the graphdef hashable
        self.shapes = tuple((name, shape, n_in) for name, (_, shape, n_in) in targets.items())
        for name, shape, n_in in self.shapes:
            fin, fout = fan_in_out(shape, n_in)
            a = jax.random.normal(rngs.params(), (n_recursions, fin, rank), jnp.float32) / math.sqrt(fin)
            setattr(self, f"{name}_a", nnx.Param(a.astype(param_dtype), logical_axes=(None, None, None)))
            setattr(self, f"{name}_b", nnx.Param(jnp.zeros((n_recursions, rank, fout), param_dtype),
                                                 logical_axes=(None, None, None)))

    def deltas(self, recursion: int) -> dict[str, jax.Array]:
        """Weight deltas of one recursion, shaped like the weights they add to."""
        out = {}
        for name, shape, _ in self.shapes:
            a = getattr(self, f"{name}_a")[recursion]
            b = getattr(self, f"{name}_b")[recursion]
            out[name] = (a.astype(jnp.float32) @ b.astype(jnp.float32)).reshape(shape)
        return out
