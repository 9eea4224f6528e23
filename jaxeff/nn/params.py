"""Parameter creation shared by the modules: initialiser, dtype and logical axes in one place."""

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape: tuple[int, ...], logical_axes: tuple[str, ...], *, std: float | None,
          dtype: str) -> nnx.Param:
    """A parameter drawn from N(0, std^2) (or ones when std is None, for norm scales)."""
    if std is None:
        value = jnp.ones(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=logical_axes)
