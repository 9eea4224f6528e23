"""Feed-forward ops."""

import jax
import jax.numpy as jnp


def swiglu(x_BxTxD: jax.Array, w_gate_DxF: jax.Array, w_up_DxF: jax.Array, w_down_FxD: jax.Array, *,
           fuse_gate_up: bool = False) -> jax.Array:
    """SwiGLU MLP (Shazeer, 2020, eq. 6): (silu(x W_gate) * x W_up) W_down.

    ``fuse_gate_up`` computes both projections as one matmul against the two weights stacked on a
    new axis ([D, 2, F]: a tensor-parallel split of F stays a split of each weight). The backward
    pass then writes the gradient of both projections in one elementwise pass and needs one matmul
    for the input's gradient, instead of reading the hidden activations twice. Same values as the
    two-matmul form (the default) up to the matmul's summation order. Off by default: on one H100
    it ran the ``small`` preset's step 0.1% faster, inside the noise (BENCHMARKS.md).
    """
    if fuse_gate_up:
        w_Dx2xF = jnp.stack([w_gate_DxF, w_up_DxF], axis=1)
        gate_up_BxTx2xF = jnp.einsum("btd,dkf->btkf", x_BxTxD, w_Dx2xF)
        gate_BxTxF, up_BxTxF = gate_up_BxTx2xF[..., 0, :], gate_up_BxTx2xF[..., 1, :]
    else:
        gate_BxTxF = jnp.einsum("btd,df->btf", x_BxTxD, w_gate_DxF)
        up_BxTxF = jnp.einsum("btd,df->btf", x_BxTxD, w_up_DxF)
    return jnp.einsum("btf,fd->btd", jax.nn.silu(gate_BxTxF) * up_BxTxF, w_down_FxD)
