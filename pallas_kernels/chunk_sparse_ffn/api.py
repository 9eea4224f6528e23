"""Which chunk-sparse FFN implementation runs.

``chunk_sparse_ffn(x, a, w_up, w_down, chunk_len=64, impl=...)`` groups the tokens into chunks
(a whole row when ``T <= chunk_len``: decoding and speculative verification; else
``chunk_len`` tokens), builds each chunk's union list and computes
``y = sum_{e in union} (silu(x W_up_e) * a_e) W_down_e``:

* ``reference``: plain jnp over all experts (``reference.py``), everywhere;
* ``portable``: the Pallas kernel (``portable.py``); on a CPU backend it runs in interpret mode;
* ``mosaic_gpu``: the Hopper kernel (``mosaic_gpu.py``); interpret mode on a CPU backend;
* ``auto``: ``mosaic_gpu`` on a Hopper GPU when it applies, else ``portable`` on other GPUs,
  else ``reference``.

A named implementation that does not apply raises ``ValueError`` with the reason. With
``return_reads`` it also returns which experts each chunk computed (``[B, n_chunks, E]`` bool;
the kernels' own record for ``portable``, the union lists for ``mosaic_gpu`` and ``reference``).
"""

from __future__ import annotations

import importlib

import jax

from pallas_kernels.chunk_sparse_ffn import reference
from pallas_kernels.chunk_sparse_ffn.common import (check_inputs, chunk_shape, from_chunks, to_chunks, union_lists,
                                                    union_mask)

IMPLS = ("auto", "reference", "portable", "mosaic_gpu")


def _backend() -> str:
    return jax.default_backend()


def applies(impl: str, x_CxLxD, w_up, w_down) -> tuple[bool, str]:
    if impl in ("reference", "portable"):
        return True, "ok"
    if impl == "mosaic_gpu":
        mod = importlib.import_module("pallas_kernels.chunk_sparse_ffn.mosaic_gpu")
        return mod.applies(x_CxLxD, w_up, w_down, interpret=_backend() == "cpu")
    return False, f"unknown implementation {impl!r}; known: {IMPLS}"


def which_impl(x_CxLxD, w_up, w_down, impl: str = "auto") -> str:
    if impl not in IMPLS:
        raise ValueError(f"chunk_sparse_ffn: impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        ok, why = applies(impl, x_CxLxD, w_up, w_down)
        if not ok:
            raise ValueError(f"chunk_sparse_ffn: impl={impl!r} does not apply: {why}")
        return impl
    if _backend() == "gpu":
        cc = str(getattr(jax.devices()[0], "compute_capability", ""))
        if cc.startswith("9") and applies("mosaic_gpu", x_CxLxD, w_up, w_down)[0]:
            return "mosaic_gpu"
        return "portable"
    return "reference"


def chunk_sparse_ffn(x_BxTxD, a_BxTxE, w_up_ExDxF, w_down_ExFxD, *, chunk_len: int = 64, impl: str = "auto",
                     return_reads: bool = False):
    """``y [B, T, D]`` in x's dtype (and the experts computed per chunk with ``return_reads``)."""
    check_inputs(x_BxTxD, a_BxTxE, w_up_ExDxF, w_down_ExFxD, chunk_len)
    b, t, _ = x_BxTxD.shape
    n, _ = chunk_shape(t, chunk_len)
    x_c, a_c = to_chunks(x_BxTxD, chunk_len), to_chunks(a_BxTxE, chunk_len)
    name = which_impl(x_c, w_up_ExDxF, w_down_ExFxD, impl)
    if name == "reference":
        y_c, reads = reference.chunk_sparse_ffn(x_c, a_c, w_up_ExDxF, w_down_ExFxD), union_mask(a_c)
    else:
        ids, counts = union_lists(a_c)
        mod = importlib.import_module(f"pallas_kernels.chunk_sparse_ffn.{name}")
        interpret = _backend() == "cpu"
        if name == "portable":
            y_c, reads = mod.chunk_sparse_ffn(x_c, a_c, w_up_ExDxF, w_down_ExFxD, ids, counts, interpret=interpret,
                                              return_reads=True)
        else:
            y_c, reads = mod.chunk_sparse_ffn(x_c, a_c, w_up_ExDxF, w_down_ExFxD, ids, counts,
                                              interpret=interpret), union_mask(a_c)
    y = from_chunks(y_c, b, t)
    return (y, reads.reshape(b, n, -1)) if return_reads else y
