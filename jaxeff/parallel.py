"""Device meshes and logical axis rules (the MaxText pattern).

Every parameter carries logical axis names (``('embed', 'mlp')``); one rule table maps each name to
mesh axes. Changing the parallel layout means changing the mesh shape, never the model code.
Mesh axes: ``data`` (replicated parameters, split batch), ``fsdp`` (split batch and parameters,
gathered per layer), ``expert`` (split the experts of mixture-of-experts layers; the batch is
split over it too, as tokens are exchanged between its devices) and ``tensor`` (split heads / MLP
hidden / vocabulary).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxeff.config import MeshConfig

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical name -> mesh axes, in order of preference. A dimension that a mesh axis does not divide
# stays replicated along that axis rather than failing.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),
    "expert": ("expert",),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "head_dim": (),
    "norm": (),
    "seq": (),
    "act_embed": (),
    "layers": (),
}


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, expert, tensor) mesh over ``devices`` (default: all), axes in Auto mode so XLA's
    sharding propagation fills in the activations between the constraints we place."""
    cfg = cfg or MeshConfig()
    devices = list(devices if devices is not None else jax.devices())
    sizes = cfg.resolve(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh_shape: dict[str, int],
                    rules: dict[str, tuple[str, ...]] = LOGICAL_RULES) -> P:
    """PartitionSpec for an array with the given logical axes under ``rules`` on a mesh."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match array rank {len(shape)}")
    used: set[str] = set()
    spec: list[Any] = []
    for name, dim in zip(logical_axes, shape):
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        axes = [a for a in (rules.get(name, ()) if name else ()) if mesh_shape.get(a, 1) > 1 and a not in used]
        # Keep only the prefix of axes whose product divides the dimension.
        kept: list[str] = []
        for a in axes:
            if dim % (math.prod(mesh_shape[x] for x in kept) * mesh_shape[a]) == 0:
                kept.append(a)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*spec)


def _mesh_shape(mesh: Mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape))


def state_shardings(state: nnx.State, mesh: Mesh) -> Any:
    """A NamedSharding for every Variable of an NNX state, from its ``logical_axes`` metadata
    (variables without it are replicated). Returns a pytree matching ``nnx.to_pure_dict(state)``."""
    shape = _mesh_shape(mesh)

    def one(var):
        axes = getattr(var, "logical_axes", None)
        value = var.get_value() if hasattr(var, "get_value") else var.value
        if axes is None:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, logical_to_spec(axes, np.shape(value), shape))

    return nnx.to_pure_dict(jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch arrays split on their leading axis over the mesh axes of the ``batch`` rule."""
    return NamedSharding(mesh, P(LOGICAL_RULES["batch"], *([None] * (ndim - 1))))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint from logical axes under the current mesh (``jax.set_mesh``); a no-op
    when no mesh is set, so models run unchanged on one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return x
    spec = logical_to_spec(logical_axes, x.shape, dict(zip(mesh.axis_names, mesh.axis_sizes)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
