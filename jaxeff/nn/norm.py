"""RMSNorm module."""

from flax import nnx

from jaxeff.nn.params import param
from jaxeff.ops import rms_norm


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, param_dtype: str, rngs: nnx.Rngs):
        self.scale = param(rngs, (dim,), ("norm",), std=None, dtype=param_dtype)
        self.eps = eps

    def __call__(self, x_BxTxD):
        return rms_norm(x_BxTxD, self.scale[...], self.eps)
