"""SwiGLU feed-forward module."""

import jax.numpy as jnp
from flax import nnx

from jaxeff.nn.params import param
from jaxeff.ops import swiglu


class SwiGLU(nnx.Module):
    def __init__(self, d_model: int, d_ff: int, *, std: float, out_std: float, dtype: str, param_dtype: str,
                 rngs: nnx.Rngs):
        self.w_gate = param(rngs, (d_model, d_ff), ("embed", "mlp"), std=std, dtype=param_dtype)
        self.w_up = param(rngs, (d_model, d_ff), ("embed", "mlp"), std=std, dtype=param_dtype)
        self.w_down = param(rngs, (d_ff, d_model), ("mlp", "embed"), std=out_std, dtype=param_dtype)
        self.dtype = dtype

    def weight(self, name: str, lora: dict | None = None):
        w = getattr(self, name)[...]
        if lora is not None and name in lora:
            w = w + lora[name].astype(w.dtype)
        return w.astype(jnp.dtype(self.dtype))

    def __call__(self, x_BxTxD, lora: dict | None = None):
        dt = jnp.dtype(self.dtype)
        return swiglu(x_BxTxD.astype(dt), self.weight("w_gate", lora), self.weight("w_up", lora),
                      self.weight("w_down", lora))
