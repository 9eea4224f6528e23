"""What every (method, setting) is measured by, on one layer's real q, k, v:

* ``rel_error``: ||o_sparse - o_dense|| / ||o_dense|| over the layer's whole output;
* ``density``: the fraction of blocks computed (over the number of causal blocks for causal
  attention);
* ``recall``: the fraction of the dense attention mass inside the computed elements, from the
  exact block masses (``pallas_kernels.block_mass``; in the permuted order for reordering
  methods, the LSE permuted with the queries).

Plus the baselines: a fixed local window of blocks at a given density (a band |i - j| <= w
around the diagonal; causal: the w previous blocks and the first, sink, block).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.sparse.select import attend
from jaxeff.sparse.select.common import causal_blocks, permute, to_block_mask
from pallas_kernels.block_mass.api import block_mass

IMPL = {"attention": "reference", "block_mass": "reference"}  # run.py's --attention-impl / --block-mass-impl


@jax.jit
def attend_jit(q, k, v, bm, perm):
    return attend(q, k, v, bm, perm, impl=IMPL["attention"])


def _gather_rows(x_BxHxT, perm_BxHxT):
    return jnp.take_along_axis(x_BxHxT, perm_BxHxT, axis=-1)


def recall(q, k, lse, bm, perm, causal: bool) -> float:
    """Fraction of the dense attention mass the BlockMask computes (module docstring)."""
    bq, bk = bm.block_size
    if perm is not None:
        q, k, _ = permute(q, k, k, perm)
        lse = _gather_rows(lse, perm.q)
    mass = _mass_jit(q, k, lse, bq, bk, causal)
    on = np.asarray(bm.block_states()) > 0
    b, h, t = lse.shape
    return float((np.asarray(mass) * np.broadcast_to(on, mass.shape)).sum() / (b * h * t))


_mass_jit = jax.jit(lambda q, k, lse, bq, bk, causal: block_mass(q, k, lse, bq, bk, causal=causal,
                                                                 impl=IMPL["block_mass"]), static_argnums=(3, 4, 5))


def density(bm, causal: bool) -> float:
    st = np.asarray(bm.block_states()) > 0
    if not causal:
        return float(st.mean())
    # computed blocks over the causal ones (a reordering method may compute blocks above the
    # diagonal of its own order; for the others this is the fraction of causal blocks)
    allowed = causal_blocks(*st.shape[-2:], *bm.block_size)
    return float(st.sum() / (allowed.sum() * np.prod(st.shape[:2])))


def rel_error(o, o_dense) -> float:
    o, o_dense = np.asarray(o, np.float64), np.asarray(o_dense, np.float64)
    return float(np.linalg.norm(o - o_dense) / max(np.linalg.norm(o_dense), 1e-30))


def layer_metrics(q, k, v, o_dense, lse, bm, perm, causal: bool) -> tuple[dict, jax.Array]:
    """(metrics, o_sparse) of one layer."""
    o = attend_jit(q, k, v, bm, perm)
    return {"rel_error": rel_error(o, o_dense), "density": density(bm, causal),
            "recall": recall(q, k, lse, bm, perm, causal)}, o


def local_window(t: int, block: int, target: float, *, causal: bool) -> tuple[object, int]:
    """The band BlockMask closest to ``target`` density, and its half-width w in blocks."""
    n = -(-t // block)
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    best = None
    for w in range(n):
        table = (j <= i) & (i - j <= w) | (j == 0) if causal else np.abs(i - j) <= w
        d = table[causal_blocks(n, n, block, block)].mean() if causal else table.mean()
        if best is None or abs(d - target) < abs(best[0] - target):
            best = (d, w, table)
    _, w, table = best
    return to_block_mask(jnp.asarray(table)[None, None], block, block, t, t, causal=causal), w


def timed(fn, *args, reps: int = 3) -> tuple[object, float]:
    """(result, median seconds) of a jitted call after one warm-up call."""
    out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return out, float(np.median(times))


def mean_of(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else float("nan")
