"""The common interface of the block selectors:

    block_mask, perm, state = select(q, k, method="svg2", threshold=0.9, state=state, **options)
    o = attend(q, k, v, block_mask, perm)          # permute, block-sparse attention, permute back

``select(q, k, *, method, density=None, threshold=None, state=None, **options)`` returns a
:class:`~jaxeff.sparse.BlockMask` (over the permuted tokens when the method reorders them), a
:class:`~jaxeff.sparse.select.Permutation` or None, and the method's state for the next call
(SVG2's centroids, PARO's calibration, AdaSpa's cached table and step; None for the stateless
ones). ``density`` is a block budget and ``threshold`` a mass to reach; each method says how it
reads them (and rejects the one it has no use for). Everything is traceable: under ``jax.jit``
with ``method``, the knobs and the options static, a new q/k/state of the same shapes does not
retrace; :func:`init_state` gives the state's structure before the first call, so a jitted loop
traces once.

Methods (one file each): ``svg2`` (Sparse VideoGen2), ``paro`` (PAROAttention), ``adaspa``
(AdaSpa), ``efficient_vdit`` (Efficient-vDiT), ``xattention`` (XAttention), ``minference``
(MInference vertical-slash).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import jax

from jaxeff.sparse.attention import block_sparse_attention
from jaxeff.sparse.block_mask import BlockMask
from jaxeff.sparse.select.adaspa import adaspa, init_state as adaspa_state
from jaxeff.sparse.select.efficient_vdit import efficient_vdit
from jaxeff.sparse.select.minference import minference
from jaxeff.sparse.select.paro import init_state as paro_state, paro
from jaxeff.sparse.select.svg2 import init_state as svg2_state, svg2
from jaxeff.sparse.select.xattention import xattention
from jaxeff.sparse.select.common import Permutation, permute, unpermute


@dataclasses.dataclass(frozen=True)
class Method:
    fn: Callable
    init_state: Callable | None  # (q, k, **options) -> state, None: stateless
    reorders: bool
    summary: str

    def options(self) -> tuple[str, ...]:
        skip = {"density", "threshold", "state"}
        params = list(inspect.signature(self.fn).parameters.values())[2:]
        return tuple(p.name for p in params if p.name not in skip)


METHODS: dict[str, Method] = {
    "svg2": Method(svg2, svg2_state, True, "k-means clusters of Q and K, top-p per query cluster"),
    "paro": Method(paro, paro_state, True, "per-head axis order of the (F, H, W) grid, static mask"),
    "adaspa": Method(adaspa, adaspa_state, False, "exact block mass from the LSE, reused across steps"),
    "efficient_vdit": Method(efficient_vdit, None, False, "own frame + k reference frames"),
    "xattention": Method(xattention, None, False, "antidiagonal block scores, threshold tau"),
    "minference": Method(minference, None, False, "vertical-slash lines from the last queries"),
}


def _method(method: str, options: dict) -> Method:
    if method not in METHODS:
        raise ValueError(f"select: unknown method {method!r}; known: {', '.join(METHODS)}")
    m = METHODS[method]
    bad = sorted(set(options) - set(m.options()))
    if bad:
        raise ValueError(f"select: method {method!r} takes no option {', '.join(map(repr, bad))}; its options: "
                         f"{', '.join(m.options())}")
    return m


def select(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, *, method: str, density: float | None = None,
           threshold: float | None = None, state: Any = None,
           **options) -> tuple[BlockMask, Permutation | None, Any]:
    """(BlockMask, permutation or None, state) from ``method`` (module docstring)."""
    m = _method(method, options)
    return m.fn(q_BxTxHxD, k_BxSxKxD, density=density, threshold=threshold, state=state, **options)


def init_state(method: str, q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, **options) -> Any:
    """The state ``select`` would hand back, before any call (None for stateless methods).
    Takes the same keywords as ``select`` (``density`` / ``threshold`` are ignored)."""
    options = {k: v for k, v in options.items() if k not in ("density", "threshold")}
    m = _method(method, options)
    return None if m.init_state is None else m.init_state(q_BxTxHxD, k_BxSxKxD, **options)


def attend(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, block_mask: BlockMask,
           perm: Permutation | None = None, **kwargs) -> jax.Array:
    """Attention under a selector's result: q/k/v permuted, ``block_sparse_attention`` (kwargs:
    ``impl``, ``scale``, ...), the output permuted back to the original token order."""
    qp, kp, vp = permute(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, perm)
    return unpermute(block_sparse_attention(qp, kp, vp, block_mask, **kwargs), perm)
