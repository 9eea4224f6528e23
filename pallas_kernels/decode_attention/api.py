"""Which decode-attention implementation runs.

``decode_attention(q, k, v, kv_positions, q_positions, counts, impl=...)``:

* ``reference``: plain jnp (``reference.py``), everywhere;
* ``portable``: the Pallas kernel (``portable.py``); on a CPU backend it runs in interpret mode;
* ``mosaic_gpu``: the Hopper kernel (``mosaic_gpu.py``); interpret mode on a CPU backend;
* ``auto``: ``mosaic_gpu`` on a Hopper GPU when it applies, else ``portable`` on other GPUs, else
  ``reference``.

A named implementation that does not apply raises ``ValueError`` with the reason.
"""

from __future__ import annotations

import importlib

import jax

IMPLS = ("auto", "reference", "portable", "mosaic_gpu")


def _backend() -> str:
    return jax.default_backend()


def applies(impl: str, q, k, v) -> tuple[bool, str]:
    if impl in ("reference", "portable"):
        return True, "ok"
    if impl == "mosaic_gpu":
        mod = importlib.import_module("pallas_kernels.decode_attention.mosaic_gpu")
        return mod.applies(q, k, v, interpret=_backend() == "cpu")
    return False, f"unknown implementation {impl!r}; known: {IMPLS}"


def which_impl(q, k, v, impl: str = "auto") -> str:
    if impl not in IMPLS:
        raise ValueError(f"decode_attention: impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        ok, why = applies(impl, q, k, v)
        if not ok:
            raise ValueError(f"decode_attention: impl={impl!r} does not apply: {why}")
        return impl
    if _backend() == "gpu":
        cc = str(getattr(jax.devices()[0], "compute_capability", ""))
        if cc.startswith("9") and applies("mosaic_gpu", q, k, v)[0]:
            return "mosaic_gpu"
        return "portable"
    return "reference"


def decode_attention(q, k, v, kv_positions, q_positions, counts=None, *, impl: str = "auto", scale=None,
                     return_lse: bool = False, **kw):
    name = which_impl(q, k, v, impl)
    if name == "reference":
        from pallas_kernels.decode_attention import reference
        return reference.decode_attention(q, k, v, kv_positions, q_positions, counts, scale=scale,
                                          return_lse=return_lse)
    mod = importlib.import_module(f"pallas_kernels.decode_attention.{name}")
    return mod.decode_attention(q, k, v, kv_positions, q_positions, counts, scale=scale, return_lse=return_lse,
                                interpret=_backend() == "cpu", **kw)
