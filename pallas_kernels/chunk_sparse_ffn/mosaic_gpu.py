"""The chunk-sparse FFN for Hopper (sm90) on Pallas Mosaic GPU, v2: two kernels.

A chunk's tokens form one 64-row tile (one wgmma M; a chunk of n <= 64 tokens is padded with
zero rows). The union list of chunk c names ``counts[c]`` experts in ``ids[c]`` (see
``common.union_lists``); experts outside the union are never read.

* Kernel A (up), grid ``(C, E)`` ["chunk", "slot"], one warpgroup per CTA. CTA ``(c, j)`` exits
  at once when ``j >= counts[c]``; else, with ``e = ids[c, j]``, it computes
  ``h = x_c W_up_e`` ([64, F]) as a K loop over D in tiles of ``TILE_K`` = 64: the ``[64, 64]``
  tile of x and the ``[64, F]`` tile of ``W_up_e`` are streamed by TMA through an
  ``UP_STAGES``-slot ring (one barrier per slot; the load of step ``k + stages - 1`` is issued
  right after the wgmma of step ``k - 1`` is known done), SMEM x SMEM wgmmas accumulate
  asynchronously into one accumulator (``wgmma_wait(1)``: the wgmma of step k runs while the
  loads of later steps land). Then ``h = silu(h) * a[c, :, e]`` (the activations pre-gathered in
  union order, ``[C, E, 64]`` float32) and ``H[c, j]`` ([C, E, 64, F] in x's dtype) is written
  through SMEM by TMA.
* Kernel B (down), grid ``(C, D / block_d)`` ["chunk", "dblock"] with ``block_d`` the largest of
  ``BLOCK_D``, 128, 64 that divides D: ``acc[64, block_d] = sum_{j < counts[c]} H[c, j] @
  W_down[ids[c, j]][:, block]``, both operands streamed by TMA through a ``DOWN_STAGES``-slot
  ring (one barrier per slot, two copies each), SMEM x SMEM wgmmas as in kernel A; the block is
  stored in x's dtype by TMA. ``counts[c] == 0`` gives y = 0 (no step runs).

The last grid axis is the fastest (Pallas maps it to blockIdx.x), so the union slots of one chunk
run together and share x_c in L2, and so do the column blocks of one chunk with H[c]. Each union
expert's up projection is computed once per chunk (v1 recomputed it per output block).

Neither kernel keeps a whole row of x in SMEM, so D is any multiple of 64. SMEM per CTA
(bf16, D = 2048, F = 128): kernel A ``UP_STAGES * (8 + 16) KiB + 16 KiB + 256 B`` = 88.3 KiB at
3 stages; kernel B ``DOWN_STAGES * (16 + F * block_d * 2 B) + 64 * block_d * 2 B`` = 160 KiB at
block_d = 128 and 3 stages; at ``BLOCK_D`` = 256 the ring drops to 2 stages, 192 KiB (see
:func:`smem_bytes`; the limit is 227 KiB).

Interpret mode (``interpret=True``, ``plgpu.InterpretGPUParams``) runs both kernel programs on
the CPU: the early exit of idle slots, the scalar reads of the union lists, every TMA copy (x,
weight and H tiles, the activation rows, the smem -> gmem stores), the barrier phases of the
rings over static (kernel A) and dynamic (kernel B) trip counts, the prologue / steady-state /
tail issue order of the rings, the SMEM x SMEM wgmmas (all products of both kernels), silu and the
scaling. Not simulated there, so only checked on a GPU: the asynchrony of wgmma (interpret mode
runs it synchronously and ignores ``wgmma_wait``, so a ring slot overwritten while a wgmma still
reads it would not show), TMA asynchrony and races, ptxas (registers, swizzles) and speed. The
Pallas -> Mosaic GPU lowering itself (layouts, transforms, TMA shapes) is checked on the CPU by
exporting for CUDA (see the tests).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.hopper import HALF_DTYPES, not_hopper, not_one_half_dtype

ROWS = 64  # one wgmma M: the tokens of a chunk
TILE_K = 64  # D-columns of x / rows of W_up per up-projection step (one 128-byte swizzle row of bf16)
BLOCK_D = 128  # output columns per CTA of the down kernel (a smaller power of two if D needs it)
UP_STAGES = 3  # ring depth of kernel A
# CTAs per chunk of kernel A: None = one per union slot (E; the idle ones exit at once); G < E =
# G CTAs that each loop over every G-th slot of the chunk's union (no idle CTAs once the union
# has G experts; a tuning knob, not yet timed on a GPU)
UP_GROUPS: int | None = None
DOWN_STAGES = 3  # ring depth of kernel B (2 where 3 would not fit in SMEM)
SUPPORTED_DTYPES = HALF_DTYPES
EXPERT_DIMS = (64, 128)
SMEM_BYTES = 227 * 1024


@dataclasses.dataclass(frozen=True)
class _Cfg:
    chunks: int
    experts: int
    d: int
    f: int
    block_d: int
    dtype: jnp.dtype
    interpret: bool
    up_groups: int | None = None


def _block_d(d: int) -> int:
    for b in (BLOCK_D, 128, 64):
        if d % b == 0:
            return b
    raise ValueError(f"D={d} is not a multiple of 64")


def _up_groups(e: int) -> int | None:
    if UP_GROUPS is None or UP_GROUPS >= e:
        return None
    if UP_GROUPS < 1:
        raise ValueError(f"chunk_sparse_ffn (mosaic_gpu): UP_GROUPS must be None or >= 1, got {UP_GROUPS}")
    return int(UP_GROUPS)


def _down_bytes(stages: int, f: int, bd: int, itemsize: int) -> int:
    return stages * (ROWS * f + f * bd) * itemsize + ROWS * bd * itemsize


def _down_stages(d: int, f: int, itemsize: int = 2) -> int:
    """``DOWN_STAGES``, fewer (not below 2) where the ring would not fit (e.g. ``BLOCK_D`` = 256)."""
    bd = _block_d(d)
    s = max(2, DOWN_STAGES)
    while s > 2 and _down_bytes(s, f, bd, itemsize) > SMEM_BYTES:
        s -= 1
    return s


def smem_bytes(d: int, f: int, itemsize: int = 2) -> tuple[int, int]:
    """SMEM per CTA of (kernel A, kernel B), barriers excluded (8 B each)."""
    up_stages = max(2, min(UP_STAGES, d // TILE_K))
    up = up_stages * (ROWS * TILE_K + TILE_K * f) * itemsize + ROWS * f * itemsize + ROWS * 4
    return up, _down_bytes(_down_stages(d, f, itemsize), f, _block_d(d), itemsize)


def _transforms():
    return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _ring(n, stages, load, compute):
    """Software-pipelined loop over ``n`` steps (``n`` static or dynamic; ``stages >= 2``): ``load(step, slot)``
    issues the TMA copies of a step into a ring slot (arriving on that slot's barrier),
    ``compute(step, slot)`` waits on the slot's barrier and issues the step's wgmma. The first
    ``stages - 1`` loads go out before the loop; step k's wgmma is issued, then ``wgmma_wait(1)``
    retires step k - 1's, whose slot then takes the load of step ``k + stages - 1``."""
    for s in range(stages - 1):
        @pl.when(s < n)
        def _():
            load(jnp.int32(s), s)

    def step(k, carry):
        slot = lax.rem(k, jnp.int32(stages))
        compute(k, slot)
        plgpu.wgmma_wait(1)  # step k - 1's wgmma is done: its slot may be refilled
        nxt = k + (stages - 1)

        @pl.when(nxt < n)
        def _():
            load(nxt, lax.rem(nxt, jnp.int32(stages)))
        return carry

    lax.fori_loop(0, n, step, None)
    plgpu.wgmma_wait(0)


def _ring_matmul(n, stages, load, lhs_smem, rhs_smem, bars, shape):
    """``sum over the n steps of lhs[slot] @ rhs[slot]`` as a float32 [shape] value: the steps'
    operands come into the ring slots by ``load(step, slot)`` (both on the slot's barrier) and
    each step is one SMEM x SMEM wgmma into a scoped accumulator (:func:`_ring`)."""
    def acc_scope(acc_ref):
        def compute(k, slot):
            plgpu.barrier_wait(bars.at[slot])
            plgpu.wgmma(acc_ref, lhs_smem.at[slot], rhs_smem.at[slot])
        _ring(n, stages, load, compute)
        return acc_ref[...]
    return pl.run_scoped(acc_scope, plgpu.ACC(shape, jnp.float32))


def _up_call(cfg: _Cfg, x, a_union, w_up, ids, counts):
    d, f, dtype = cfg.d, cfg.f, cfg.dtype
    n_k = d // TILE_K
    stages = max(2, min(UP_STAGES, n_k))  # >= 2: the ring issues step 0 before its loop
    tf = _transforms()

    groups = cfg.up_groups or cfg.experts  # CTAs per chunk; CTA g takes the slots g, g + groups, ...

    def kernel(x_ref, a_ref, w_up_ref, ids_ref, cnt_ref, h_ref):
        c = lax.axis_index("chunk")
        g = lax.axis_index("slot")
        count = cnt_ref[c]

        @pl.when(g < count)  # a CTA with no slot exits at once
        def _():
            def body(x_smem, wu_smem, a_smem, h_smem, bars, a_bar):
                def one_slot(i, carry):
                    j = g + i * groups
                    e = ids_ref[c, j]
                    plgpu.copy_gmem_to_smem(a_ref.at[c, j], a_smem, a_bar)

                    def load(k, slot):
                        cols = pl.ds(k * TILE_K, TILE_K)
                        plgpu.copy_gmem_to_smem(x_ref.at[c, :, cols], x_smem.at[slot], bars.at[slot])
                        plgpu.copy_gmem_to_smem(w_up_ref.at[e, cols], wu_smem.at[slot], bars.at[slot])

                    h = _ring_matmul(n_k, stages, load, x_smem, wu_smem, bars, (ROWS, f))
                    plgpu.barrier_wait(a_bar)
                    a_row = plgpu.load(a_smem, layout=plgpu.Layout.WGMMA.reduce(1))
                    h = h / (1.0 + jnp.exp(-h)) * lax.broadcast_in_dim(a_row, h.shape, [0])  # silu(h) * a
                    h_smem[...] = h.astype(dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(h_smem, h_ref.at[c, j])
                    plgpu.wait_smem_to_gmem(0)  # h_smem is free for the next slot
                    return carry

                if groups == cfg.experts:  # one slot per CTA (no loop)
                    one_slot(0, None)
                else:
                    lax.fori_loop(0, (count - g + groups - 1) // groups, one_slot, None)

            pl.run_scoped(
                body,
                plgpu.SMEM((stages, ROWS, TILE_K), dtype, transforms=tf),
                plgpu.SMEM((stages, TILE_K, f), dtype, transforms=tf),
                plgpu.SMEM((ROWS,), jnp.float32),
                plgpu.SMEM((ROWS, f), dtype, transforms=tf),
                plgpu.Barrier(num_arrivals=2, num_barriers=stages),
                plgpu.Barrier(),
            )

    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((cfg.chunks, cfg.experts, ROWS, f), dtype),
        grid=(cfg.chunks, groups),
        grid_names=("chunk", "slot"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if cfg.interpret else None,
    )(x, a_union, w_up, ids, counts)


def _down_call(cfg: _Cfg, h, w_down, ids, counts):
    d, f, bd, dtype = cfg.d, cfg.f, cfg.block_d, cfg.dtype
    stages = _down_stages(d, f, jnp.dtype(dtype).itemsize)
    tf = _transforms()

    def kernel(h_ref, w_down_ref, ids_ref, cnt_ref, y_ref):
        c = lax.axis_index("chunk")
        ob = lax.axis_index("dblock")
        cols = pl.ds(ob * bd, bd)

        def body(h_smem, wd_smem, out_smem, bars):
            count = cnt_ref[c]

            def load(j, slot):
                e = ids_ref[c, j]
                plgpu.copy_gmem_to_smem(h_ref.at[c, j], h_smem.at[slot], bars.at[slot])
                plgpu.copy_gmem_to_smem(w_down_ref.at[e, :, cols], wd_smem.at[slot], bars.at[slot])

            acc = _ring_matmul(count, stages, load, h_smem, wd_smem, bars, (ROWS, bd))
            out_smem[...] = acc.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem, y_ref.at[c, :, cols])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            body,
            plgpu.SMEM((stages, ROWS, f), dtype, transforms=tf),
            plgpu.SMEM((stages, f, bd), dtype, transforms=tf),
            plgpu.SMEM((ROWS, bd), dtype, transforms=tf),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        )

    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((cfg.chunks, ROWS, d), dtype),
        grid=(cfg.chunks, d // bd),
        grid_names=("chunk", "dblock"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if cfg.interpret else None,
    )(h, w_down, ids, counts)


def applies(x_CxLxD, w_up_ExDxF, w_down_ExFxD, *, interpret: bool = False) -> tuple[bool, str]:
    """A Hopper GPU (or ``interpret``), x and the weights all bf16 or all fp16, at most 64 tokens
    per chunk, D any multiple of 64 (the down kernel's column block is then the largest of
    ``BLOCK_D``, 128, 64 dividing D), an expert width F of 64 or 128."""
    why = not_hopper(interpret) or not_one_half_dtype("x, w_up, w_down", x_CxLxD, w_up_ExDxF, w_down_ExFxD)
    if why:
        return False, why
    length, d = x_CxLxD.shape[1:]
    if length > ROWS:
        return False, f"a chunk of {length} tokens exceeds one {ROWS}-row tile"
    if d % TILE_K or d == 0:
        return False, f"D must be a positive multiple of {TILE_K}, got {d}"
    f = w_up_ExDxF.shape[-1]
    if f not in EXPERT_DIMS:
        return False, f"the expert width F must be one of {EXPERT_DIMS}, got {f}"
    need = max(smem_bytes(d, f, jnp.dtype(x_CxLxD.dtype).itemsize))
    if need > SMEM_BYTES:  # not reached with the constants above; a guard for retuning them
        return False, f"needs {need} bytes of SMEM per CTA, more than {SMEM_BYTES}"
    return True, "ok"


def chunk_sparse_ffn(x_CxLxD, a_CxLxE, w_up_ExDxF, w_down_ExFxD, ids_CxE, counts_C, *, interpret: bool = False):
    """Same contract as ``portable.chunk_sparse_ffn`` (bf16/fp16 inputs; no expert marks)."""
    ok, why = applies(x_CxLxD, w_up_ExDxF, w_down_ExFxD, interpret=interpret)
    if not ok:
        raise ValueError(f"chunk_sparse_ffn (mosaic_gpu): {why}")
    c, length, d = x_CxLxD.shape
    e, _, f = w_up_ExDxF.shape
    cfg = _Cfg(chunks=c, experts=e, d=d, f=f, block_d=_block_d(d), dtype=jnp.dtype(x_CxLxD.dtype),
               interpret=bool(interpret), up_groups=_up_groups(e))
    x = jnp.pad(x_CxLxD, ((0, 0), (0, ROWS - length), (0, 0)))  # [C, 64, D]
    a = jnp.pad(a_CxLxE.astype(jnp.float32), ((0, 0), (0, ROWS - length), (0, 0)))
    ids = ids_CxE.astype(jnp.int32)
    counts = counts_C.astype(jnp.int32)
    a_union = jnp.take_along_axis(jnp.swapaxes(a, 1, 2), ids[:, :, None], axis=1)  # [C, E, 64], union order
    h = _up_call(cfg, x, a_union, w_up_ExDxF, ids, counts)  # [C, E, 64, F]; slots j >= counts[c] unwritten
    y = _down_call(cfg, h, w_down_ExFxD, ids, counts)
    return y[:, :length]
