"""The plain-jnp oracle of the chunk-sparse FFN: ``y = sum_e a_e * silu(x W_up_e) W_down_e`` over
all experts (an inactive expert's a_e is 0, so the union restriction changes nothing), and the
set of experts a chunk-sparse kernel must read: each chunk's union (:func:`experts_read`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.chunk_sparse_ffn.common import union_mask


def chunk_sparse_ffn(x_CxLxD, a_CxLxE, w_up_ExDxF, w_down_ExFxD):
    """``[C, L, D]`` in x's dtype (float32 accumulation, full-precision float32 matmuls)."""
    prec = jax.lax.Precision.HIGHEST
    h = jnp.einsum("cld,edf->clef", x_CxLxD.astype(jnp.float32), w_up_ExDxF.astype(jnp.float32), precision=prec)
    h = jax.nn.silu(h) * a_CxLxE.astype(jnp.float32)[..., None]
    y = jnp.einsum("clef,efd->cld", h, w_down_ExFxD.astype(jnp.float32), precision=prec)
    return y.astype(x_CxLxD.dtype)


def experts_read(a_CxLxE):
    """``[C, E]`` bool: the union of the experts each chunk activates."""
    return union_mask(a_CxLxE)
