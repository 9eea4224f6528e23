"""AdaSpa: adaptive block selection from exact block attention mass, reused across denoising
steps (Xia et al., 2025, "Training-free and Adaptive Sparse Attention for Efficient Long Video
Generation", arXiv 2502.21079).

The rule (paper Sec. 4):

* Exact block scores from a cached log-sum-exp ("online precise search"): with ``lse`` the LSE of
  each query's (dense) attention, ``mass[b, h, i, j] = sum_{t in block i, s in block j}
  exp(q_t . k_s * scale - lse_t)`` is the exact attention mass of every block, computed block by
  block without the T x S matrix (``pallas_kernels.block_mass``: a jnp pass or a Pallas kernel).
  ``lse`` may come from the caller (the dense step that produced it, e.g. ``return_lse=True``);
  else it is computed here, also without the score matrix.
* Blocks of 64, top blocks per row under a budget: ``density`` d gives each head
  ``d * nQ * nK`` blocks (``budget="head"``: AdaSpa's per-head budgets; rows take blocks in
  order of mass, so a row with spread attention gets more), or all heads of a batch row share
  one (``"global"``: a head with concentrated attention frees blocks for the others), or every
  row the same ``d * nK`` (``"row"``). ``threshold`` p instead keeps, per row, the fewest blocks
  holding p of its mass. Every row keeps at least its best block.
* Reuse across denoising steps: the block pattern is stable over consecutive steps, so the
  search runs at a refresh schedule and the mask is reused in between (``state``: the cached
  table and a step counter). Refresh when ``step % refresh_every == 0``, or only at
  ``refresh_steps`` (a tuple; step 0 always). Under ``jax.jit`` the search is a ``lax.cond``
  branch: steps that reuse pay nothing for it.

GQA: the mass of query head h is computed against its kv head h // G (K not repeated); the
table has one row per query head.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.sparse.block_mask import BlockMask
from jaxeff.sparse.select.common import (budget_select, causal_blocks, check_block, check_int, check_knobs, check_qk,
                                         keep_sink_and_diagonal, log_sum_exp, to_block_mask, top_p_rows)
from pallas_kernels.block_mass.api import block_mass

DEFAULTS = dict(density=0.25, block=64, budget="head", refresh_every=1)
WHERE = "adaspa"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdaSpaState:
    table: jax.Array  # [B, H, nQ, nK] bool, the cached selection
    step: jax.Array  # [] int32, calls so far (denoising steps)


def init_state(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, *, block=DEFAULTS["block"], **_) -> AdaSpaState:
    """Step 0 with no table yet: the first call searches."""
    b, t, h, d, s, kh = check_qk(WHERE, q_BxTxHxD, k_BxSxKxD)
    bq, bk = check_block(WHERE, block, t, s)
    return AdaSpaState(jnp.zeros((b, h, -(-t // bq), -(-s // bk)), bool), jnp.asarray(0, jnp.int32))


def adaspa_mass(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, *, block=DEFAULTS["block"], lse: jax.Array | None = None,
                causal: bool = False, scale: float | None = None, impl: str = "auto") -> jax.Array:
    """The exact block mass [B, H, nQ, nK], each row divided by its block's queries (so a row sums
    to 1: the fraction of the block's attention in each key block)."""
    b, t, h, d, s, kh = check_qk(WHERE, q_BxTxHxD, k_BxSxKxD)
    bq, bk = check_block(WHERE, block, t, s)
    if lse is None:
        lse = log_sum_exp(q_BxTxHxD, k_BxSxKxD, scale=scale, causal=causal)
    mass = block_mass(q_BxTxHxD, k_BxSxKxD, lse, bq, bk, scale=scale, causal=causal, impl=impl)
    rows = np.minimum(bq, t - bq * np.arange(mass.shape[2])).astype(np.float32)
    return mass / jnp.asarray(rows)[:, None]


def search(mass: jax.Array, bq: int, bk: int, *, density: float | None, threshold: float | None, budget: str,
           causal: bool) -> jax.Array:
    """The selection from block masses (module docstring)."""
    nq, nk = mass.shape[-2:]
    allowed = causal_blocks(nq, nk, bq, bk) if causal else None
    if threshold is not None:
        table = top_p_rows(mass, threshold, 1)
        table = table if allowed is None else table & jnp.asarray(allowed)
    else:
        table = budget_select(mass, density, budget=budget, allowed=allowed, where=WHERE)
    if causal:  # each query sees itself: its diagonal block is always computed
        table = keep_sink_and_diagonal(table, bq, bk, sink=False, diagonal=True)
    return table


def adaspa(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, *, density: float | None = None,
           threshold: float | None = None, state: AdaSpaState | None = None, block=DEFAULTS["block"],
           lse: jax.Array | None = None, budget: str = DEFAULTS["budget"],
           refresh_every: int = DEFAULTS["refresh_every"], refresh_steps: tuple[int, ...] | None = None,
           causal: bool = False, scale: float | None = None,
           impl: str = "auto") -> tuple[BlockMask, None, AdaSpaState]:
    """AdaSpa's BlockMask (no permutation) and the state for the next step (module docstring).
    Default: density 0.25 with per-head budgets, a fresh search every call."""
    b, t, h, d, s, kh = check_qk(WHERE, q_BxTxHxD, k_BxSxKxD)
    bq, bk = check_block(WHERE, block, t, s)
    density, threshold = check_knobs(WHERE, density, threshold)
    if density is None and threshold is None:
        density = DEFAULTS["density"]
    refresh_every = check_int(WHERE, "refresh_every", refresh_every)
    if refresh_steps is not None:
        refresh_steps = tuple(check_int(WHERE, "refresh_steps entry", x, minimum=0) for x in refresh_steps)
    if lse is not None and tuple(lse.shape) != (b, h, t):
        raise ValueError(f"{WHERE}: lse must be [batch={b}, heads={h}, seq={t}], got {tuple(lse.shape)}")

    def fresh():
        mass = adaspa_mass(q_BxTxHxD, k_BxSxKxD, block=(bq, bk), lse=lse, causal=causal, scale=scale, impl=impl)
        return search(mass, bq, bk, density=density, threshold=threshold, budget=budget, causal=causal)

    if state is None:
        table, step = fresh(), jnp.asarray(0, jnp.int32)
    else:
        want = (b, h, -(-t // bq), -(-s // bk))
        if tuple(state.table.shape) != want:
            raise ValueError(f"{WHERE}: state holds a table {tuple(state.table.shape)}, these inputs need {want}")
        step = state.step
        if refresh_steps is None:
            due = step % refresh_every == 0
        else:
            due = (step == 0) | jnp.isin(step, jnp.asarray(refresh_steps or (0,), jnp.int32))
        table = jax.lax.cond(due, fresh, lambda: state.table)
    return to_block_mask(table, bq, bk, t, s, causal=causal), None, AdaSpaState(table, step + 1)
