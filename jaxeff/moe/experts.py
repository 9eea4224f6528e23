"""Expert maths: ``y = sum_e A_e * E_e(x)``, with ``E_e(x) = silu(x W_up_e) W_down_e`` (BlockFFN's
non-gated experts) or ``(silu(x W_gate_e) * x W_up_e) W_down_e`` (gated, the ablation).

Three ways to compute it, one reference and two fast paths:

* :func:`dense_experts` — every expert on every token, weighted by the dense activations
  ``A [N, E]`` (0 for inactive experts): the reference, and the training path of the ReLU
  routers (BlockFFN, ReMoE), whose number of active experts is data dependent;
* :func:`ragged_experts` — dropless top-k as a grouped matmul: the N*k (token, expert)
  assignments sorted by expert and multiplied group by group with ``jax.lax.ragged_dot``
  (or tokamax's Mosaic GPU ``ragged_dot`` when it is installed and asked for);
* :func:`capacity_experts` — top-k with a capacity factor: each expert takes at most
  ``ceil(cf * N * k / E)`` assignments (first choices before second choices, then token order,
  as GShard / Switch), the rest are dropped (the residual carries those tokens).

The scaling by A is applied to the hidden activations before the down projection (the same
product, and what the chunk-sparse kernel fuses). Matmuls accumulate in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _hidden(x, w_up, w_gate, spec: str):
    up = jnp.einsum(spec, x, w_up, preferred_element_type=jnp.float32)
    if w_gate is None:
        return jax.nn.silu(up)
    return jax.nn.silu(jnp.einsum(spec, x, w_gate, preferred_element_type=jnp.float32)) * up


def dense_experts(x_NxD: jax.Array, a_NxE: jax.Array, w_up_ExDxF: jax.Array, w_down_ExFxD: jax.Array,
                  w_gate_ExDxF: jax.Array | None = None) -> jax.Array:
    """``sum_e a[n, e] * E_e(x[n])`` over all experts (float32 result)."""
    h_NxExF = _hidden(x_NxD, w_up_ExDxF, w_gate_ExDxF, "nd,edf->nef")
    h_NxExF = (h_NxExF * a_NxE.astype(jnp.float32)[..., None]).astype(w_down_ExFxD.dtype)
    return jnp.einsum("nef,efd->nd", h_NxExF, w_down_ExFxD, preferred_element_type=jnp.float32)


def _tokamax_ragged_dot():
    try:
        import tokamax  # noqa: PLC0415 - optional GPU dependency
    except ImportError:
        return None
    return getattr(tokamax, "ragged_dot", None)


def ragged_dot_impl(impl: str):
    """The grouped matmul for ``impl``: ``'tokamax'`` (raises when not installed), ``'ragged'``
    (``jax.lax.ragged_dot``) or ``'auto'`` (tokamax on a GPU when installed, else lax). tokamax
    picks its kernel (Mosaic GPU on Hopper); shapes its kernels refuse (``NotImplementedError``
    at trace time) go to ``jax.lax.ragged_dot``."""
    if impl in ("tokamax", "auto"):
        fn = _tokamax_ragged_dot() if (impl == "tokamax" or jax.default_backend() == "gpu") else None
        if fn is not None:
            def dot(lhs, rhs, group_sizes, preferred_element_type=None):
                # tokamax's kernels take operands of one half dtype, and its VJP multiplies the
                # output's cotangent with them: a float32 output would make a float32 cotangent
                # its backward refuses. So the output keeps the operands' dtype (the kernel still
                # accumulates in float32) and is cast afterwards.
                try:
                    out = fn(lhs, rhs, group_sizes)
                    return out if preferred_element_type is None else out.astype(preferred_element_type)
                except NotImplementedError:
                    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=preferred_element_type)
            return dot
        if impl == "tokamax":
            raise ValueError("MoEConfig.expert_impl='tokamax' needs the tokamax package (pip install tokamax)")
    return jax.lax.ragged_dot


def ragged_experts(x_NxD: jax.Array, gates_NxK: jax.Array, experts_NxK: jax.Array, w_up_ExDxF: jax.Array,
                   w_down_ExFxD: jax.Array, w_gate_ExDxF: jax.Array | None = None, *, impl: str = "ragged"):
    """Dropless top-k: the assignments sorted by expert, two grouped matmuls over the expert
    groups (sizes = tokens per expert), each result scaled by its gate and summed back per
    token (float32 result)."""
    n, k = experts_NxK.shape
    e = w_up_ExDxF.shape[0]
    dot = ragged_dot_impl(impl)
    flat_e = experts_NxK.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    token = order // k
    sizes = jnp.bincount(flat_e, length=e).astype(jnp.int32)
    xs = x_NxD[token]
    up = dot(xs, w_up_ExDxF, sizes, preferred_element_type=jnp.float32)
    if w_gate_ExDxF is None:
        h = jax.nn.silu(up)
    else:
        h = jax.nn.silu(dot(xs, w_gate_ExDxF, sizes, preferred_element_type=jnp.float32)) * up
    h = (h * gates_NxK.reshape(-1)[order].astype(jnp.float32)[:, None]).astype(w_down_ExFxD.dtype)
    out = dot(h, w_down_ExFxD, sizes, preferred_element_type=jnp.float32)
    return jnp.zeros((n, out.shape[-1]), jnp.float32).at[token].add(out)


def expert_capacity(n_tokens: int, k: int, n_experts: int, capacity_factor: float) -> int:
    return max(1, math.ceil(capacity_factor * n_tokens * k / n_experts))


def capacity_slots(experts_NxK: jax.Array, n_experts: int, capacity: int):
    """Each assignment's slot in its expert's buffer ``[N, k]`` and whether it fits (slot <
    capacity): slots are handed out to all first choices in token order, then second choices..."""
    n, k = experts_NxK.shape
    onehot = jax.nn.one_hot(experts_NxK.T.reshape(-1), n_experts, dtype=jnp.int32)  # choice-major
    slot = jnp.sum(jnp.cumsum(onehot, axis=0) * onehot, axis=-1) - 1
    slot = slot.reshape(k, n).T
    return slot, slot < capacity


def capacity_experts(x_NxD: jax.Array, gates_NxK: jax.Array, experts_NxK: jax.Array, w_up_ExDxF: jax.Array,
                     w_down_ExFxD: jax.Array, w_gate_ExDxF: jax.Array | None = None, *, capacity: int):
    """Top-k with fixed expert buffers ``[E, C, D]`` (GShard / Switch): assignments beyond an
    expert's capacity are dropped. Returns ``(y [N, D] float32, kept [N, k] bool)``."""
    n, k = experts_NxK.shape
    e, d, _ = w_up_ExDxF.shape
    slot, kept = capacity_slots(experts_NxK, e, capacity)
    buf_e = jnp.where(kept, experts_NxK, e)  # dropped assignments scatter out of range
    tokens = jnp.broadcast_to(jnp.arange(n)[:, None], (n, k))
    buf = jnp.zeros((e, capacity, d), x_NxD.dtype).at[buf_e, slot].set(x_NxD[tokens], mode="drop")
    h = _hidden(buf, w_up_ExDxF, w_gate_ExDxF, "ecd,edf->ecf").astype(w_down_ExFxD.dtype)
    out_ExCxD = jnp.einsum("ecf,efd->ecd", h, w_down_ExFxD, preferred_element_type=jnp.float32)
    picked = out_ExCxD.at[buf_e, slot].get(mode="fill", fill_value=0.0)  # [N, k, D]
    y = jnp.einsum("nk,nkd->nd", jnp.where(kept, gates_NxK, 0.0).astype(jnp.float32), picked)
    return y, kept


def chunk_sparse_experts(x_BxTxD: jax.Array, a_BxTxE: jax.Array, w_up_ExDxF: jax.Array, w_down_ExFxD: jax.Array,
                         *, chunk_len: int = 64, impl: str = "auto") -> jax.Array:
    """``dense_experts`` through the chunk-sparse kernel (``pallas_kernels.chunk_sparse_ffn``):
    each chunk of tokens computes only the union of the experts it activates. The kernels have
    no backward pass, so the gradient is the dense path's (same values): the kernel can stay on
    in a model that is also trained. Float32 ``[B, T, D]``."""
    from pallas_kernels.chunk_sparse_ffn.api import chunk_sparse_ffn  # noqa: PLC0415 - kernels load on use

    def dense(x, a, w_up, w_down):
        b, t, d = x.shape
        return dense_experts(x.reshape(b * t, d), a.reshape(b * t, -1), w_up, w_down).reshape(b, t, d)

    @jax.custom_vjp
    def run(x, a, w_up, w_down):
        return chunk_sparse_ffn(x, a.astype(jnp.float32), w_up, w_down, chunk_len=chunk_len,
                                impl=impl).astype(jnp.float32)

    def fwd(x, a, w_up, w_down):
        return run(x, a, w_up, w_down), (x, a, w_up, w_down)

    def bwd(res, g):
        return jax.vjp(dense, *res)[1](g)

    run.defvjp(fwd, bwd)
    return run(x_BxTxD, a_BxTxE, w_up_ExDxF, w_down_ExFxD)
