"""The chunk-sparse FFN as a portable ``pl.pallas_call``.

One program per chunk of L tokens: it reads the chunk's union list (a whole-array int32 input,
read like scalar prefetch: the same idea as the block-sparse attention kernel's block lists),
and for each of its ``counts[c]`` experts (a dynamic trip count) loads that expert's ``W_up``
and ``W_down`` only, computes ``silu(x W_up_e)`` for the L tokens, scales it by the tokens'
``a[:, e]`` (0 for the tokens that do not use e) and accumulates ``h W_down_e`` in float32. The
experts outside the union are never read. With ``return_reads`` the program also marks each
expert it loaded (``[C, E]`` int32), which the tests compare with the union.

On CPU run with ``interpret=True``; on GPU the same code lowers through Pallas' Triton backend
(untested here: the GPU issue); the Hopper kernel is ``mosaic_gpu.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def _whole(x):
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _dot(a, b):
    prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=prec, preferred_element_type=jnp.float32)


def _kernel(ids_ref, counts_ref, x_ref, a_ref, w_up_ref, w_down_ref, y_ref, reads_ref):
    c = pl.program_id(0)
    x = x_ref[0]
    count = counts_ref[c]
    reads_ref[...] = jnp.zeros(reads_ref.shape, jnp.int32)

    def body(j, acc):
        e = ids_ref[c, j]
        up = _dot(x, w_up_ref[e])
        h = jax.nn.silu(up) * a_ref[0, :, pl.ds(e, 1)].astype(jnp.float32)
        reads_ref[0, pl.ds(e, 1)] = jnp.ones((1,), jnp.int32)
        return acc + _dot(h.astype(w_down_ref.dtype), w_down_ref[e])

    acc = jax.lax.fori_loop(0, count, body, jnp.zeros(y_ref.shape[1:], jnp.float32))
    y_ref[0] = acc.astype(y_ref.dtype)


def chunk_sparse_ffn(x_CxLxD, a_CxLxE, w_up_ExDxF, w_down_ExFxD, ids_CxE, counts_C, *, interpret: bool = False,
                     return_reads: bool = False):
    """``y [C, L, D]`` (x's dtype), and the experts read ``[C, E]`` bool when ``return_reads``."""
    c, length, d = x_CxLxD.shape
    e = a_CxLxE.shape[-1]
    y, reads = pl.pallas_call(
        _kernel,
        grid=(c,),
        in_specs=[_whole(ids_CxE), _whole(counts_C), pl.BlockSpec((1, length, d), lambda i: (i, 0, 0)),
                  pl.BlockSpec((1, length, e), lambda i: (i, 0, 0)), _whole(w_up_ExDxF), _whole(w_down_ExFxD)],
        out_specs=[pl.BlockSpec((1, length, d), lambda i: (i, 0, 0)), pl.BlockSpec((1, e), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct((c, length, d), x_CxLxD.dtype), jax.ShapeDtypeStruct((c, e), jnp.int32)],
        interpret=interpret,
    )(ids_CxE, counts_C, x_CxLxD, a_CxLxE, w_up_ExDxF, w_down_ExFxD)
    return (y, reads > 0) if return_reads else y
