"""Normalisation ops."""

import jax
import jax.numpy as jnp


def rms_norm(x_BxTxD: jax.Array, scale_D: jax.Array, eps: float = 1e-5) -> jax.Array:
    """RMSNorm (Zhang & Sennrich, 2019): x / sqrt(mean(x^2) + eps) * scale.

    The statistics are taken in float32 whatever the input dtype, because bf16 sums of squares
    over a few thousand channels lose the precision that makes the norm a norm.
    """
    x32 = x_BxTxD.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * inv * scale_D.astype(jnp.float32)).astype(x_BxTxD.dtype)
