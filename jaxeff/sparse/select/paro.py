"""PAROAttention: pattern-aware token reordering (Zhao et al., 2025, "PAROAttention: Pattern-Aware
ReOrdering for Efficient Sparse and Quantized Attention in Visual Generation Models",
arXiv 2506.16054).

The rule (paper Sec. 3-4): video tokens lie on a (frames, height, width) grid, flattened F-H-W.
Heads attend locally along different axes (temporal heads: the same pixel in nearby frames;
spatial heads: nearby pixels of a frame), which scatters their attention over the F-H-W order.
Reordering the tokens by another of the 6 axis orders (e.g. H-W-F, frames innermost) gathers a
head's attention into few blocks. PARO picks one order per head offline, then uses a *static*
block mask in that order at a density target (20-30% in the paper, blocks of 64), permuting
q/k/v before attention and the output back after.

Calibration pass (:func:`paro_calibrate`), our criterion (the exact metric of the paper is not in
our notes): for every order, permute q and k, compute the exact attention mass of each block
(``block_mass``, from the log-sum-exp, no score matrix), average over the calibration batch, and
select blocks at the density target (``budget_select``); the order's score is the fraction of
attention mass those blocks hold. With ``threshold`` p instead, each row keeps the fewest blocks
holding p of its mass, and the score is the fraction of blocks left out (the sparsity at equal
recall). The best order wins. The static mask is the selected blocks in the winning order, plus the diagonal blocks.

GQA: K/V are permuted per kv head, so the order is chosen per kv head (the scores of its G query
heads summed); each query head keeps its own block mask in that order.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.sparse.block_mask import BlockMask
from jaxeff.sparse.select.common import (Permutation, budget_select, check_block, check_grid, check_knobs, check_qk,
                                         keep_sink_and_diagonal, log_sum_exp, shared_query_perm, to_block_mask,
                                         top_p_rows)
from pallas_kernels.block_mass.api import block_mass

ORDERS = tuple(itertools.permutations(range(3)))  # (0, 1, 2) is the given F-H-W order
ORDER_NAMES = tuple("".join("FHW"[a] for a in o) for o in ORDERS)
DEFAULTS = dict(density=0.25, block=64, budget="head")
WHERE = "paro"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PAROState:
    """The calibrated, static part: one axis order per kv head and the block table in it."""
    order: jax.Array  # [K] int32, index into ORDERS
    table: jax.Array  # [1, H, nQ, nK] bool
    scores: jax.Array  # [K, 6] float32: each order's criterion (captured mass, or blocks saved)
    calibrated: jax.Array  # [] bool


def order_permutation(grid: tuple[int, int, int], order: tuple[int, int, int]) -> np.ndarray:
    """[T] int: the original (F-H-W raster) index of each token in the ``order`` raster (its first
    axis slowest), e.g. order (1, 2, 0) = H-W-F puts the frames of one pixel next to each other."""
    return np.arange(int(np.prod(grid))).reshape(grid).transpose(order).reshape(-1)


def all_permutations(grid) -> np.ndarray:
    """[6, T] int32, :func:`order_permutation` for every order in ``ORDERS``."""
    return np.stack([order_permutation(grid, o) for o in ORDERS]).astype(np.int32)


def paro_calibrate(q_BxTxHxD: jax.Array, k_BxTxKxD: jax.Array, *, grid: tuple[int, int, int],
                   density: float | None = None, threshold: float | None = None, block=DEFAULTS["block"],
                   budget: str = DEFAULTS["budget"], scale: float | None = None, impl: str = "auto") -> PAROState:
    """The calibration pass (module docstring) on a batch of calibration queries and keys."""
    b, t, h, d, s, kh = check_qk(WHERE, q_BxTxHxD, k_BxTxKxD)
    if s != t:
        raise ValueError(f"{WHERE}: self-attention only (q has {t} tokens, k {s}): the grid reorders both")
    grid = check_grid(WHERE, grid, t)
    density, threshold = check_knobs(WHERE, density, threshold)
    if density is None and threshold is None:
        density = DEFAULTS["density"]
    bq, bk = check_block(WHERE, block, t, s)
    lse = log_sum_exp(q_BxTxHxD, k_BxTxKxD, scale=scale)  # order-independent, per token
    perms = all_permutations(grid)
    tables, captured = [], []
    for p in perms:
        mass = block_mass(q_BxTxHxD[:, p], k_BxTxKxD[:, p], lse[:, :, p], bq, bk, scale=scale, impl=impl)
        mass = mass.mean(axis=0, keepdims=True)  # [1, H, nQ, nK], calibration batch averaged
        if density is not None:
            pick = budget_select(mass, density, budget=budget, where=WHERE)
        else:
            pick = top_p_rows(mass, threshold, 1)
        pick = keep_sink_and_diagonal(pick, bq, bk, sink=False, diagonal=True)
        tables.append(pick)
        if density is not None:  # mass captured at the budget
            captured.append(jnp.where(pick, mass, 0.0).sum((0, 2, 3)) / mass.sum((0, 2, 3)))  # [H]
        else:  # blocks saved at the recall target
            captured.append(1.0 - pick.mean((0, 2, 3)))
    tables = jnp.stack(tables)  # [6, 1, H, nQ, nK]
    captured = jnp.stack(captured, -1)  # [H, 6]
    per_kv = captured.reshape(kh, h // kh, len(ORDERS)).mean(1)  # [K, 6]
    order = jnp.argmax(per_kv, axis=-1).astype(jnp.int32)  # [K]
    head_order = jnp.repeat(order, h // kh)  # [H]
    table = jnp.take_along_axis(tables, head_order[None, None, :, None, None], axis=0)[0]
    return PAROState(order, table, per_kv, jnp.asarray(True))


def permutation(state: PAROState, grid, batch: int, heads: int) -> Permutation:
    perms = jnp.asarray(all_permutations(grid))
    kv = jnp.broadcast_to(perms[state.order][None], (batch, *state.order.shape, perms.shape[-1]))
    return Permutation(shared_query_perm(kv, heads), kv)


def init_state(q_BxTxHxD: jax.Array, k_BxTxKxD: jax.Array, *, block=DEFAULTS["block"], **_) -> PAROState:
    """An uncalibrated state of the right shapes: the first ``paro`` call calibrates."""
    b, t, h, d, s, kh = check_qk(WHERE, q_BxTxHxD, k_BxTxKxD)
    bq, bk = check_block(WHERE, block, t, s)
    return PAROState(jnp.zeros((kh,), jnp.int32), jnp.zeros((1, h, -(-t // bq), -(-s // bk)), bool),
                     jnp.zeros((kh, len(ORDERS)), jnp.float32), jnp.asarray(False))


def paro(q_BxTxHxD: jax.Array, k_BxTxKxD: jax.Array, *, grid: tuple[int, int, int], density: float | None = None,
         threshold: float | None = None, state: PAROState | None = None, block=DEFAULTS["block"],
         budget: str = DEFAULTS["budget"], scale: float | None = None,
         impl: str = "auto") -> tuple[BlockMask, Permutation, PAROState]:
    """The static BlockMask (in the chosen order), the permutation and the calibrated state.
    ``state=None`` (or an uncalibrated one from ``init_state``) calibrates on these q/k; a
    calibrated state is reused as is, whatever q/k hold."""
    b, t, h, d, s, kh = check_qk(WHERE, q_BxTxHxD, k_BxTxKxD)
    grid = check_grid(WHERE, grid, t)
    bq, bk = check_block(WHERE, block, t, s)

    def calibrate():
        return paro_calibrate(q_BxTxHxD, k_BxTxKxD, grid=grid, density=density, threshold=threshold, block=block,
                              budget=budget, scale=scale, impl=impl)

    if state is None:
        state = calibrate()
    else:
        check_knobs(WHERE, density, threshold)
        want = init_state(q_BxTxHxD, k_BxTxKxD, block=block)
        if state.table.shape != want.table.shape or state.order.shape != want.order.shape:
            raise ValueError(f"{WHERE}: state was calibrated for tables {state.table.shape}, these inputs need "
                             f"{want.table.shape}")
        state = jax.lax.cond(state.calibrated, lambda: state, calibrate)
    return to_block_mask(state.table, bq, bk, t, s), permutation(state, grid, b, h), state
