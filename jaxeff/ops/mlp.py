"""Feed-forward ops."""

import jax
import jax.numpy as jnp


def swiglu(x_BxTxD: jax.Array, w_gate_DxF: jax.Array, w_up_DxF: jax.Array, w_down_FxD: jax.Array) -> jax.Array:
    """SwiGLU MLP (Shazeer, 2020, eq. 6): (silu(x W_gate) * x W_up) W_down."""
    gate_BxTxF = jnp.einsum("btd,df->btf", x_BxTxD, w_gate_DxF)
    up_BxTxF = jnp.einsum("btd,df->btf", x_BxTxD, w_up_DxF)
    return jnp.einsum("btf,fd->btd", jax.nn.silu(gate_BxTxF) * up_BxTxF, w_down_FxD)
