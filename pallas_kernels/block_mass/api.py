"""Which implementation of the block mass runs: ``reference`` (plain jnp, anywhere) or
``pallas`` (portable.py: compiled on GPU, interpret mode on CPU). ``impl="auto"`` takes the
Pallas kernel on GPU and the reference elsewhere.

``block_mass(q, k, lse, block_q, block_kv) -> mass [B, H, nQ, nK]``: the attention mass of each
(query block, key block) tile, ``sum exp(q.k * scale - lse)`` over the tile, from a cached
log-sum-exp ``lse [B, H, T]`` of the same attention (AdaSpa, Xia et al., 2025, Sec. 4: exact
block scores without the full score matrix).
"""

from __future__ import annotations

import jax

NAMES = ("auto", "reference", "pallas")


def which_impl(impl: str = "auto") -> str:
    if impl not in NAMES:
        raise ValueError(f"block_mass: unknown impl {impl!r}; known: {', '.join(NAMES)}")
    if impl == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "reference"
    return impl


def block_mass(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, lse_BxHxT: jax.Array, block_q: int, block_kv: int, *,
               scale: float | None = None, causal: bool = False, impl: str = "auto",
               interpret: bool | None = None) -> jax.Array:
    """mass [B, H, nQ, nK] float32 (see the module docstring). ``causal``: only keys s <= t count."""
    name = which_impl(impl)
    if name == "reference":
        from pallas_kernels.block_mass import reference
        return reference.block_mass(q_BxTxHxD, k_BxSxKxD, lse_BxHxT, block_q, block_kv, scale=scale, causal=causal)
    from pallas_kernels.block_mass import portable
    interp = (jax.default_backend() == "cpu") if interpret is None else bool(interpret)
    return portable.block_mass(q_BxTxHxD, k_BxSxKxD, lse_BxHxT, block_q, block_kv, scale=scale, causal=causal,
                               interpret=interp)
