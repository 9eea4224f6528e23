"""Input checks and padding shared by the block-mass implementations.

Shapes: q ``[B, T, H, D]``, k ``[B, S, K, D]`` (H % K == 0, GQA), lse ``[B, H, T]`` float32 (the
natural-log log-sum-exp of each query's attention; ``-inf`` marks a query with no allowed key).
Output: ``mass [B, H, nQ, nK]`` float32 with ``nQ = ceil(T / block_q)``, ``nK = ceil(S / block_kv)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def check_inputs(q, k, lse, block_q, block_kv, where: str = "block_mass") -> None:
    """Raises ``ValueError`` naming the argument when shapes, dtypes or block sizes do not fit."""
    for name, x in (("q", q), ("k", k)):
        if not hasattr(x, "shape") or len(x.shape) != 4:
            raise ValueError(f"{where}: {name} must be [batch, seq, heads, head_dim], got shape "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{where}: {name} must be a floating-point array, got {x.dtype}")
    b, t, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"{where}: k must be [batch={b}, seq, kv_heads, head_dim={d}] like q, got {k.shape}")
    if h % k.shape[2]:
        raise ValueError(f"{where}: q's heads ({h}) must be a multiple of k's heads ({k.shape[2]})")
    if not hasattr(lse, "shape") or tuple(lse.shape) != (b, h, t):
        raise ValueError(f"{where}: lse must be [batch={b}, heads={h}, seq={t}], got "
                         f"{getattr(lse, 'shape', type(lse).__name__)}")
    for name, blk in (("block_q", block_q), ("block_kv", block_kv)):
        if isinstance(blk, bool) or not isinstance(blk, int) or blk < 1:
            raise ValueError(f"{where}: {name} must be a positive integer, got {blk!r}")
