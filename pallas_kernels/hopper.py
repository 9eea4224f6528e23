"""What the Hopper (sm90) kernels on Pallas Mosaic GPU share in their ``applies()`` checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

HALF_DTYPES = (jnp.bfloat16, jnp.float16)


def not_hopper(interpret: bool = False) -> str | None:
    """None when the default device is a Hopper GPU or interpret mode is asked for, else why not."""
    if interpret:
        return None
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return "no device"
    cc = getattr(dev, "compute_capability", None)
    if dev.platform != "gpu" or cc is None or not str(cc).startswith("9"):
        return f"needs a Hopper GPU (sm90), found {dev.platform} {getattr(dev, 'device_kind', '')} cc={cc}"
    return None


def not_one_half_dtype(names: str, *arrays) -> str | None:
    """None when ``arrays`` are all bfloat16 or all float16, else why not (``names`` names them)."""
    dts = {jnp.dtype(x.dtype) for x in arrays}
    if len(dts) != 1 or dts.pop() not in map(jnp.dtype, HALF_DTYPES):
        return f"{names} must all be bfloat16 or all float16, got {', '.join(str(x.dtype) for x in arrays)}"
    return None
