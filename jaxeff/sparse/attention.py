"""``block_sparse_attention``: attention over the blocks a ``BlockMask`` lists (FlexAttention's
``flex_attention`` in JAX). Validates the inputs, converts the BlockMask into the kernel-side
layout and element mask, and dispatches through ``pallas_kernels.block_sparse_attention.api``.

Indices: ``q_idx`` counts from 0 at the first row of ``q`` and ``kv_idx`` from 0 at the first key,
for the mask and for ``score_mod``; when decoding a chunk against a longer cache, offset inside
the mask function (e.g. ``causal(offset=cache_len)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxeff.sparse.block_mask import BlockMask
from pallas_kernels.block_sparse_attention import api
from pallas_kernels.block_sparse_attention.common import ScoreMod

IMPLS = api.NAMES


def _check(q, k, v, block_mask, scale, score_mod, impl) -> None:
    where = "block_sparse_attention"
    if impl not in IMPLS:
        raise ValueError(f"{where}: unknown impl {impl!r}; known: {', '.join(IMPLS)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or len(x.shape) != 4:
            raise ValueError(f"{where}: {name} must be [batch, seq, heads, head_dim], got shape "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{where}: {name} must be a floating-point array (bf16, fp16, fp32), got {x.dtype}")
    b, t, h, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{where}: k and v must have the same shape, got k {k.shape} and v {v.shape}")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"{where}: k must be [batch={b}, seq, kv_heads, head_dim={d}] like q, got {k.shape}")
    if h % k.shape[2]:
        raise ValueError(f"{where}: q's heads ({h}) must be a multiple of k's heads ({k.shape[2]})")
    if not isinstance(block_mask, BlockMask):
        raise ValueError(f"{where}: block_mask must be a BlockMask (create_block_mask), got {type(block_mask).__name__}")
    bm, hm, ql, kl = block_mask.shape
    if (ql, kl) != (t, k.shape[1]):
        raise ValueError(f"{where}: block_mask was built for Q_LEN={ql}, KV_LEN={kl}, but q has {t} tokens and "
                         f"k {k.shape[1]}")
    if bm not in (1, b) or hm not in (1, h):
        raise ValueError(f"{where}: block_mask has B={bm}, H={hm}; the inputs need B in (1, {b}) and H in (1, {h})")
    bq, bk = block_mask.block_size
    if block_mask.num_blocks != (-(-ql // bq), -(-kl // bk)):
        raise ValueError(f"{where}: block_mask's lists ({block_mask.num_blocks[0]} x {block_mask.num_blocks[1]} "
                         f"blocks) do not match its block_size {block_mask.block_size} for lengths ({ql}, {kl})")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        raise ValueError(f"{where}: scale must be a positive Python number or None, got {scale!r}")
    if score_mod is not None and not callable(score_mod):
        raise ValueError(f"{where}: score_mod must be callable as score_mod(score, b, h, q_idx, kv_idx), "
                         f"got {type(score_mod).__name__}")


def block_sparse_attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, block_mask: BlockMask,
                           *, scale: float | None = None, score_mod: ScoreMod | None = None, impl: str = "auto",
                           return_lse: bool = False, interpret: bool | None = None):
    """softmax(score_mod(q k^T * scale) where mask) v over the blocks ``block_mask`` lists.

    GQA: k/v have K heads, q has H = K * G (query head h reads kv head h // G). ``scale``
    defaults to head_dim ** -0.5; ``score_mod(score, b, h, q_idx, kv_idx)`` acts elementwise on
    float32 scores (e.g. ``jaxeff.sparse.soft_cap(50.0)``). Softmax statistics are float32 for
    every input dtype. A query with no allowed key outputs 0 (LSE -inf, zero gradients).
    ``impl``: "auto", "reference", "pallas", "mosaic_gpu" or "splash" (see
    ``pallas_kernels.block_sparse_attention.api``). Returns o [B, T, H, D] in q's dtype, and with
    ``return_lse`` also the log-sum-exp [B, H, T] float32."""
    _check(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, block_mask, scale, score_mod, impl)
    b, _, h, _ = q_BxTxHxD.shape
    o, lse = api.block_sparse_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, block_mask.layout(),
                                        block_mask.element_mask(batch=b, heads=h), scale=scale, score_mod=score_mod,
                                        impl=impl, return_lse=return_lse, interpret=interpret)
    return (o, lse) if return_lse else o


def which_impl(q, k, v, block_mask: BlockMask, *, impl: str = "auto", score_mod: ScoreMod | None = None,
               interpret: bool | None = None) -> str:
    """The implementation ``block_sparse_attention`` would run for these inputs (arrays or
    ``jax.ShapeDtypeStruct``s), without running it."""
    _check(q, k, v, block_mask, None, score_mod, impl)
    b, _, h, _ = q.shape
    return api.which_impl(q, k, v, block_mask.layout(), block_mask.element_mask(batch=b, heads=h), impl=impl,
                          score_mod=score_mod, interpret=interpret)
