"""The SwiGLU feed-forward module (the dense FFN of every jaxeff model)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.nn.params import param
from jaxeff.ops import swiglu


class SwiGLU(nnx.Module):
    """FFN contract: ``ffn(x_BxTxD, lora=None) -> (y_BxTxD, aux)`` (aux: losses and metrics, empty
    here); ``lora_targets()`` names the weights a per-recursion LoRA may relax."""

    def __init__(self, d_model: int, d_ff: int, *, std: float, out_std: float, dtype: str, param_dtype: str,
                 rngs: nnx.Rngs, fuse_gate_up: bool = False):
        self.w_gate = param(rngs, (d_model, d_ff), ("embed", "mlp"), std=std, dtype=param_dtype)
        self.w_up = param(rngs, (d_model, d_ff), ("embed", "mlp"), std=std, dtype=param_dtype)
        self.w_down = param(rngs, (d_ff, d_model), ("mlp", "embed"), std=out_std, dtype=param_dtype)
        self.dtype, self.fuse_gate_up = dtype, fuse_gate_up

    @staticmethod
    def matmul_params(d_model: int, d_ff: int) -> int:
        """Multiply-accumulate parameters each token passes through (FLOPs = 2x this, forward)."""
        return 3 * d_model * d_ff

    def lora_targets(self) -> dict[str, tuple[tuple[int, ...], int]]:
        """name -> (weight shape, number of leading input dims)."""
        return {name: (getattr(self, name).shape, 1) for name in ("w_gate", "w_up", "w_down")}

    def weight(self, name: str, lora: dict | None = None) -> jax.Array:
        w = getattr(self, name)[...]
        if lora is not None and name in lora:
            w = w + lora[name].astype(w.dtype)
        return w.astype(jnp.dtype(self.dtype))

    def __call__(self, x_BxTxD: jax.Array, lora: dict | None = None) -> tuple[jax.Array, dict]:
        dt = jnp.dtype(self.dtype)
        y_BxTxD = swiglu(x_BxTxD.astype(dt), self.weight("w_gate", lora), self.weight("w_up", lora),
                         self.weight("w_down", lora), fuse_gate_up=self.fuse_gate_up)
        return y_BxTxD, {}
