"""Per-recursion low-rank deltas on a shared block's weights (Relaxed Recursive Transformers,
Bae et al., 2024, arXiv 2410.20672, section 3.2).

Recursion r of a shared block uses W + A_r B_r for every projection W: the loops share most
parameters but each may drift a little. B starts at zero, so a fresh relaxation changes nothing
until it trains; :func:`jaxeff.models.recursive_convert.convert_from_vanilla` can instead start
A_r B_r at the truncated SVD of (original layer - shared block).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.config import ModelConfig

# name -> (module attribute holding it, number of leading input dims) for one Block's weights
LORA_TARGETS = {"wq": ("attn", 1), "wk": ("attn", 1), "wv": ("attn", 1), "wo": ("attn", 2),
                "w_gate": ("mlp", 1), "w_up": ("mlp", 1), "w_down": ("mlp", 1)}


def target_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, h, k, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.d_ff
    return {"wq": (d, h, hd), "wk": (d, k, hd), "wv": (d, k, hd), "wo": (h, hd, d),
            "w_gate": (d, f), "w_up": (d, f), "w_down": (f, d)}


def fan_in_out(name: str, shape: tuple[int, ...]) -> tuple[int, int]:
    n_in = LORA_TARGETS[name][1]
    return math.prod(shape[:n_in]), math.prod(shape[n_in:])


class BlockLoRA(nnx.Module):
    """LoRA factors ``{name}_a [N_r, fan_in, rank]`` and ``{name}_b [N_r, rank, fan_out]``."""

    def __init__(self, cfg: ModelConfig, n_recursions: int, rank: int, *, rngs: nnx.Rngs):
        self.shapes = tuple(target_shapes(cfg).items())  # a tuple keeps the graphdef hashable
        for name, shape in self.shapes:
            fin, fout = fan_in_out(name, shape)
            a = jax.random.normal(rngs.params(), (n_recursions, fin, rank), jnp.float32) / math.sqrt(fin)
            setattr(self, f"{name}_a", nnx.Param(a.astype(cfg.param_dtype), logical_axes=(None, None, None)))
            setattr(self, f"{name}_b", nnx.Param(jnp.zeros((n_recursions, rank, fout), cfg.param_dtype),
                                                 logical_axes=(None, None, None)))

    def deltas(self, recursion: int) -> dict[str, jax.Array]:
        """Weight deltas of one recursion, shaped like the weights they add to."""
        out = {}
        for name, shape in self.shapes:
            a = getattr(self, f"{name}_a")[recursion]
            b = getattr(self, f"{name}_b")[recursion]
            out[name] = (a.astype(jnp.float32) @ b.astype(jnp.float32)).reshape(shape)
        return out
