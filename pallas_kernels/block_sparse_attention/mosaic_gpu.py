"""Block-sparse attention for Hopper (sm90) on Pallas Mosaic GPU: the entry point.

The forward kernel and the pieces both passes share are in ``mosaic_gpu_fwd.py`` (its docstring
describes the design), the dQ and dK/dV kernels in ``mosaic_gpu_bwd.py``; this module ties them
into one differentiable function (``jax.custom_vjp``) and re-exports what callers use.
"""

from __future__ import annotations

import functools
import math

import jax

from pallas_kernels.block_sparse_attention import mosaic_gpu_bwd
from pallas_kernels.block_sparse_attention.common import ElementMask, ScoreMod, SparseLayout
from pallas_kernels.block_sparse_attention.mosaic_gpu_fwd import (BLOCK_KV, BLOCK_Q, SUPPORTED_DTYPES, TUNING, Tuning,
                                                                  applies, fold_segments_into_dense, forward, mma,
                                                                  smem_bytes)

__all__ = ["BLOCK_KV", "BLOCK_Q", "SUPPORTED_DTYPES", "TUNING", "Tuning", "applies", "block_sparse_attention",
           "fold_segments_into_dense", "forward", "mma", "smem_bytes"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, layout, em, scale, score_mod, interpret):
    return forward(q, k, v, layout, em, scale, score_mod, interpret)


def _attention_fwd(q, k, v, layout, em, scale, score_mod, interpret):
    o, lse = forward(q, k, v, layout, em, scale, score_mod, interpret)
    return (o, lse), (q, k, v, layout, em, o, lse)


def _attention_bwd(scale, score_mod, interpret, res, cts):
    q, k, v, layout, em, o, lse = res
    do, dlse = cts
    dq, dk, dv = mosaic_gpu_bwd.backward(q, k, v, layout, em, o, lse, do, dlse, scale, score_mod, interpret)
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def block_sparse_attention(q, k, v, layout: SparseLayout, element_mask: ElementMask | None = None, *, scale=None,
                           score_mod: ScoreMod | None = None, return_lse: bool = False, interpret: bool = False):
    """Block-sparse attention on a Hopper GPU; see the module docstring. q [B, T, H, D], k/v
    [B, S, K, D] (H % K == 0). Returns (o [B, T, H, D] in q's dtype, lse [B, H, T] float32 or
    None). Differentiable in q, k, v (and through lse when it is returned)."""
    em = fold_segments_into_dense(element_mask if element_mask is not None else ElementMask())
    ok, why = applies(q, k, v, layout, em, interpret=interpret, score_mod=score_mod)
    if not ok:
        raise ValueError(f"mosaic_gpu block_sparse_attention: {why}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    o, lse = _attention(q, k, v, layout, em, float(scale), score_mod, bool(interpret))
    return o, (lse if return_lse else None)
