"""Routers as pure functions: BlockFFN's ReLU + RMSNorm router, softmax top-k, ReMoE's ReLU router.

Every router reads the hidden state after the pre-FFN RMSNorm (``x_NxD``, tokens flattened or
``[B, T, D]``; the maths is per token) and returns dense activations ``A[..., E]`` (0 =
inactive), the form the metrics and the dense expert path share. Router matmuls run in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def router_logits(x: jax.Array, w_DxE: jax.Array) -> jax.Array:
    """``A0 = x W_r`` in float32."""
    return jnp.einsum("...d,de->...e", x.astype(jnp.float32), w_DxE.astype(jnp.float32))


def blockffn_router(x: jax.Array, w_DxE: jax.Array, gain_E: jax.Array, *, eps: float = 1e-6):
    """BlockFFN (Song et al., 2025, arXiv 2507.08771, section 3.2): ``A0 = x W_r``,
    ``A1 = ReLU(A0)``, ``A = RMSNorm(A1)`` over the experts with a learnable per-expert gain.
    No top-k, no softmax, no capacity: an expert is active where ``A1 > 0``. A token whose
    ``A1`` is all zero gets ``A = 0`` (its FFN output is 0). Returns ``(a0, a1, a)``, float32."""
    a0 = router_logits(x, w_DxE)
    a1 = jax.nn.relu(a0)
    rms = jnp.sqrt(jnp.mean(jnp.square(a1), axis=-1, keepdims=True) + eps)
    a = a1 / rms * gain_E.astype(jnp.float32)
    return a0, a1, a


def remoe_router(x: jax.Array, w_DxE: jax.Array):
    """ReMoE (Wang et al., 2024, arXiv 2412.14711): ``R = ReLU(x W_r)``, used as the gates
    directly. Returns ``(logits, gates)``, float32."""
    logits = router_logits(x, w_DxE)
    return logits, jax.nn.relu(logits)


def topk_route(logits: jax.Array, k: int, *, normalize: bool = True):
    """Softmax top-k routing (Shazeer et al., 2017; Mixtral's renormalised gates when
    ``normalize``): ``probs = softmax(logits)`` over the experts, the k largest per token, their
    gates (``probs`` at the chosen experts, divided by their sum when ``normalize``).
    Returns ``(gates[..., k], experts[..., k] int32, probs[..., E])``."""
    n = logits.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"topk_route: k must be in [1, n_experts={n}], got {k}")
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    gates, experts = jax.lax.top_k(probs, k)
    if normalize:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return gates, experts.astype(jnp.int32), probs


def gates_to_dense(gates_NxK: jax.Array, experts_NxK: jax.Array, n_experts: int) -> jax.Array:
    """Top-k gates as dense activations ``[..., E]`` (0 where an expert is not chosen)."""
    onehot = jax.nn.one_hot(experts_NxK, n_experts, dtype=gates_NxK.dtype)
    return jnp.einsum("...k,...ke->...e", gates_NxK, onehot)
