"""Expert parallelism: the experts of a layer split over the ``expert`` mesh axis (the logical
axis ``expert`` of the expert weights maps to it, :data:`jaxeff.parallel.LOGICAL_RULES`), the
tokens split over the same axis as part of the batch, and the two exchanged inside
``jax.shard_map``.

* Top-k (:func:`ep_topk_experts`, GShard-style): each device fills fixed buffers ``[E, C, D]``
  with its tokens' assignments, one ``all_to_all`` sends each expert's buffer to the device
  holding it, the local experts run on everything they received, and a second ``all_to_all``
  brings the results home. ``capacity=None`` is dropless: C = the device's token count, the
  worst case (a token uses an expert at most once), so nothing is dropped (exact, not lean:
  a ``ragged_all_to_all`` that sends only the real assignments is for the GPU issue).
* ReLU routers (:func:`ep_dense_experts`, BlockFFN, ReMoE): every token may use any expert, so
  each device gathers the tokens of its expert group (``all_gather``), runs its local experts on
  them weighted by their activations, and the partial outputs are summed back to the tokens'
  devices (``psum_scatter``).

Both equal the unsharded layer in values and gradients (tests/moe/test_parallel.py runs them on
8 simulated CPU devices). The batch must split over the expert axis; ``n_experts`` must be a
multiple of its size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxeff.moe.experts import capacity_slots, dense_experts, expert_capacity
from jaxeff.parallel import LOGICAL_RULES

EXPERT_AXIS = "expert"


def current_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def expert_axis_size(mesh=None) -> int:
    mesh = current_mesh() if mesh is None else mesh
    if mesh is None or EXPERT_AXIS not in mesh.axis_names:
        return 1
    return dict(zip(mesh.axis_names, mesh.axis_sizes))[EXPERT_AXIS]


def check_expert_split(n_experts: int, n_shards: int) -> None:
    if n_shards > 1 and n_experts % n_shards:
        raise ValueError(f"MoEConfig.n_experts={n_experts} must be divisible by the mesh's expert axis "
                         f"(mesh.expert={n_shards})")


def _batch_axes(mesh, batch: int) -> tuple[str, ...]:
    """The batch axes of the mesh (size > 1) the token batch is split over; the expert axis must be one."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    axes = tuple(a for a in LOGICAL_RULES["batch"] if sizes.get(a, 1) > 1)
    split = 1
    for a in axes:
        split *= sizes[a]
    if batch % split:
        raise ValueError(f"expert parallelism: the batch of {batch} rows must split over the mesh axes "
                         f"{' x '.join(axes)} = {split} devices (the tokens are exchanged along '{EXPERT_AXIS}')")
    return axes


def ep_dense_experts(x_BxTxD, a_BxTxE, w_up_ExDxF, w_down_ExFxD, w_gate_ExDxF=None):
    """``dense_experts`` with the experts split over the expert axis (all_gather the tokens of the
    expert group, local experts, psum_scatter the partial outputs). Float32 ``[B, T, D]``."""
    mesh = current_mesh()
    n = expert_axis_size(mesh)
    e = w_up_ExDxF.shape[0]
    check_expert_split(e, n)
    b, t, d = x_BxTxD.shape
    axes = _batch_axes(mesh, b)
    tok, wspec = P(axes, None, None), P(EXPERT_AXIS, None, None)
    gated = w_gate_ExDxF is not None

    def local(x, a, w_up, w_down, *w_gate):
        e_loc = w_up.shape[0]
        xs = jax.lax.all_gather(x, EXPERT_AXIS, axis=0, tiled=True)
        a_all = jax.lax.all_gather(a, EXPERT_AXIS, axis=0, tiled=True)
        first = jax.lax.axis_index(EXPERT_AXIS) * e_loc
        a_loc = jax.lax.dynamic_slice_in_dim(a_all, first, e_loc, axis=2)
        bl, tl = xs.shape[:2]
        y = dense_experts(xs.reshape(bl * tl, d), a_loc.reshape(bl * tl, e_loc), w_up, w_down,
                          w_gate[0] if gated else None).reshape(bl, tl, d)
        return jax.lax.psum_scatter(y, EXPERT_AXIS, scatter_dimension=0, tiled=True)

    args = (x_BxTxD, a_BxTxE, w_up_ExDxF, w_down_ExFxD) + ((w_gate_ExDxF,) if gated else ())
    specs = (tok, tok, wspec, wspec) + ((wspec,) if gated else ())
    return jax.shard_map(local, in_specs=specs, out_specs=tok)(*args)


def ep_topk_experts(x_BxTxD, gates_BxTxK, experts_BxTxK, w_up_ExDxF, w_down_ExFxD, w_gate_ExDxF=None, *,
                    capacity_factor: float = 0.0):
    """Top-k experts split over the expert axis, tokens exchanged with two ``all_to_all``s.
    ``capacity_factor`` 0: dropless (buffers of the device's token count); > 0: each device
    gives each expert ``ceil(cf * N_local * k / E)`` slots (capacity per device, as MaxText).
    Returns ``(y [B, T, D] float32, kept [B, T, K])``."""
    mesh = current_mesh()
    n = expert_axis_size(mesh)
    e, d, _ = w_up_ExDxF.shape
    check_expert_split(e, n)
    b, t, _ = x_BxTxD.shape
    k = gates_BxTxK.shape[-1]
    axes = _batch_axes(mesh, b)
    tok, wspec = P(axes, None, None), P(EXPERT_AXIS, None, None)
    gated = w_gate_ExDxF is not None

    def local(x, gates, experts, w_up, w_down, *w_gate):
        bl, tl = x.shape[:2]
        nl = bl * tl
        cap = nl if capacity_factor <= 0 else expert_capacity(nl, k, e, capacity_factor)
        xf, g, ex = x.reshape(nl, d), gates.reshape(nl, k), experts.reshape(nl, k)
        slot, kept = capacity_slots(ex, e, cap)
        buf_e = jnp.where(kept, ex, e)
        tokens = jnp.broadcast_to(jnp.arange(nl)[:, None], (nl, k))
        buf = jnp.zeros((e, cap, d), x.dtype).at[buf_e, slot].set(xf[tokens], mode="drop")
        e_loc = e // n
        # [n destinations, E_loc, C, D] -> each device receives [n sources, E_loc, C, D]
        recv = jax.lax.all_to_all(buf.reshape(n, e_loc, cap, d), EXPERT_AXIS, 0, 0, tiled=True)
        xs = jnp.swapaxes(recv.reshape(n, e_loc, cap, d), 0, 1).reshape(e_loc, n * cap, d)
        up = jnp.einsum("ecd,edf->ecf", xs, w_up, preferred_element_type=jnp.float32)
        if gated:
            up = jax.nn.silu(jnp.einsum("ecd,edf->ecf", xs, w_gate[0], preferred_element_type=jnp.float32)) * up
        else:
            up = jax.nn.silu(up)
        out = jnp.einsum("ecf,efd->ecd", up.astype(w_down.dtype), w_down, preferred_element_type=jnp.float32)
        out = jnp.swapaxes(out.reshape(e_loc, n, cap, d), 0, 1)  # [n sources, E_loc, C, D]
        back = jax.lax.all_to_all(out, EXPERT_AXIS, 0, 0, tiled=True).reshape(e, cap, d)
        picked = back.at[buf_e, slot].get(mode="fill", fill_value=0.0)
        y = jnp.einsum("nk,nkd->nd", jnp.where(kept, g, 0.0).astype(jnp.float32), picked)
        return y.reshape(bl, tl, d), kept.reshape(bl, tl, k)

    args = (x_BxTxD, gates_BxTxK, experts_BxTxK, w_up_ExDxF, w_down_ExFxD) + ((w_gate_ExDxF,) if gated else ())
    specs = (tok, tok, tok, wspec, wspec) + ((wspec,) if gated else ())
    return jax.shard_map(local, in_specs=specs, out_specs=(tok, tok))(*args)
