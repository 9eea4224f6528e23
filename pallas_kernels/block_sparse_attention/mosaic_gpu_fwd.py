"""Block-sparse attention for Hopper (sm90) on Pallas Mosaic GPU: the forward kernel and the pieces
both passes share (the entry point is ``mosaic_gpu.py``).

FlashAttention-3 structure (Shah et al. 2024, "FlashAttention-3", Alg. 1 and Sec. 3.1) over
FlexAttention / splash-style block lists (see ``common.py``), after jax's own
``pallas/ops/gpu/attention_mgpu.py``:

* Forward: one CTA per (query block of 128 rows, query head, batch). Two compute warpgroups own
  64 rows each; a third (memory) warpgroup reads the block's full list, then its partial list,
  and streams the named K/V blocks with TMA into a ``stages``-deep ring guarded by barriers
  (a "produced" barrier per slot that the TMA completes, a "consumed" barrier per slot that both
  compute warpgroups arrive on). Full blocks run unmasked; partial blocks evaluate the element
  mask (``kv_idx < kv_len``, ``index_fn`` on iota tiles in the WGMMA layout, segment ids,
  a dense int8 tile) after QK^T. Online softmax in base 2 (scores pre-multiplied by log2 e);
  a row with no allowed key writes o = 0 and lse = -inf.
* Backward (``mosaic_gpu_bwd.py``): delta = rowsum(dO * O) outside; a dQ kernel walking the kv
  lists (same structure as the forward) and a dK/dV kernel per (kv block, kv head) walking the
  transposed q lists of every query head of the GQA group, so dK/dV are summed over the group
  in registers (no per-q-head copies).

Query heads of one kv head are adjacent in the grid's fastest axis, so the CTAs that share a
K/V tile run together and read it from L2 (GQA sharing through L2, K/V never repeated in HBM).
Query blocks are launched longest-first (reverse order), which balances causal-like layouts.

Supported (``applies`` says why not otherwise): bf16 or fp16 q/k/v, head_dim 64 or 128, layouts
of 128 x 128 blocks, any lengths (padded inside; padded keys masked, also when a layout lists the
padded last block as full), GQA, index functions, segment ids, dense element masks (converted to
int8; with segment ids as well, the segments are ANDed into it), ``score_mod`` in the forward and
backward (its elementwise derivative by ``jax.vjp`` inside the kernels), gradients through the
returned LSE. Kernel variants: :class:`Tuning` (measured in
``experiments/notes/block_sparse_kernel.md``).

Interpret mode (``interpret=True``) runs the same kernels under Mosaic GPU's CPU interpreter
(threads, barriers, TMA, SMEM simulated); wgmma with a register operand is not simulated there,
so those products become ``jnp.dot`` in interpret mode only (see ``mma``, ``mma2``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.block_sparse_attention.common import ElementMask, ScoreMod, SparseLayout, check_inputs
from pallas_kernels.hopper import HALF_DTYPES, not_hopper, not_one_half_dtype

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
BLOCK_Q = 128  # query rows per CTA = 2 compute warpgroups x 64 rows; the layout's block_q
BLOCK_KV = 128  # the layout's block_kv
ROWS = 64  # rows per compute warpgroup (one wgmma M)
SMEM_BYTES = 227 * 1024
SUPPORTED_DTYPES = HALF_DTYPES


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Knobs measured in ``experiments/notes/block_sparse_kernel.md``. ``fwd_stages``/``dq_stages``:
    K/V ring depth of the forward / dQ kernels (at head_dim 128, 3 fits 227 KiB only in the forward
    without a dense mask or segment ids; fewer is used when it would not fit); ``dkv_stages``: Q/dO
    ring depth of the dK/dV
    kernel; ``bwd_fuse``: issue the two independent wgmmas of a backward step together (S and dP,
    then the two accumulating products) so each step waits twice instead of three or four times."""
    fwd_stages: int = 2
    dq_stages: int = 2
    dkv_stages: int = 2
    bwd_fuse: bool = True  # v2: backward -4% at dense S16384 on an H200; 3 stages did not help


TUNING = Tuning()


# ----------------------------------------------------------------------------------------------
# Static description of one call.


@dataclasses.dataclass(frozen=True)
class _Cfg:
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    t_pad: int  # query length padded to BLOCK_Q
    s_pad: int  # key length padded to block_kv
    q_len: int
    kv_len: int
    n_q: int
    n_kv: int
    block_kv: int
    bm: int  # batch axis of the lists (1 or batch)
    hm: int  # head axis of the lists (1 or heads)
    dense_bm: int
    dense_hm: int
    has_index_fn: bool
    has_segments: bool
    has_dense: bool
    dtype: jnp.dtype
    scale: float
    stages: int
    interpret: bool

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def has_extra(self) -> bool:  # partial blocks need data streamed next to K (segment ids, dense tile)
        return self.has_segments or self.has_dense


# ----------------------------------------------------------------------------------------------
# Small in-kernel helpers shared with the backward kernels.


def mma(acc, a, b, *, interpret: bool, a_in_regs: bool = False, during=None):
    """acc + a @ b on the tensor cores (wgmma, asynchronous; ``during`` runs while it is in
    flight). In interpret mode a register operand is not simulated, so that case is a jnp.dot."""
    if interpret:
        if a_in_regs:
            out = acc + jnp.dot(a, b[...], preferred_element_type=jnp.float32)
        else:
            def body(r):
                plgpu.wgmma(r, a, b)
                return r[...]
            out = acc + pl.run_scoped(body, plgpu.ACC(acc.shape, jnp.float32))
        if during is not None:
            during()
        return out

    def body(r):
        plgpu.wgmma(r, a, b)
        if during is not None:
            during()
    return pl.run_state(body)(plgpu.ACC.init(acc))


def mm(a, b, shape, *, during=None):
    """a @ b into a fresh float32 accumulator (wgmma; both operands in SMEM)."""
    def body(r):
        plgpu.wgmma(r, a, b)
        if during is not None:
            during()
        return r[...]
    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def mm2(a1, b1, shape1, a2, b2, shape2):
    """(a1 @ b1, a2 @ b2), both wgmmas in flight together, one wait (operands in SMEM)."""
    def body(r1, r2):
        plgpu.wgmma(r1, a1, b1)
        plgpu.wgmma(r2, a2, b2)
        return r1[...], r2[...]
    return pl.run_scoped(body, plgpu.ACC(shape1, jnp.float32), plgpu.ACC(shape2, jnp.float32))


def mma2(acc1, a1, b1, acc2, a2, b2, *, interpret: bool):
    """(acc1 + a1 @ b1, acc2 + a2 @ b2) with a1, a2 in registers, both wgmmas in flight together."""
    if interpret:
        dot = lambda a, b: jnp.dot(a, b[...], preferred_element_type=jnp.float32)  # noqa: E731
        return acc1 + dot(a1, b1), acc2 + dot(a2, b2)

    def body(refs):
        plgpu.wgmma(refs[0], a1, b1)
        plgpu.wgmma(refs[1], a2, b2)
    return pl.run_state(body)((plgpu.ACC.init(acc1), plgpu.ACC.init(acc2)))


def wgmma_zeros(shape):
    return plgpu.layout_cast(jnp.full(shape, 0, jnp.float32), plgpu.Layout.WGMMA)


def row_vec(value, n):
    return plgpu.layout_cast(jnp.full((n,), value, jnp.float32), plgpu.Layout.WGMMA.reduce(1))


def list_index(num_full, full_ref, part_ref, step, n_max):
    """The block named by pipeline step ``step``: the full list first, then the partial list."""
    f = full_ref[lax.min(step, n_max - 1)]
    p = part_ref[lax.clamp(0, step - num_full, n_max - 1)]
    return lax.select(step < num_full, f, p)


def element_mask(cfg: _Cfg, index_fn, b, h, row0, col0, shape, transposed, qseg=None, kvseg=None, dense=None):
    """The partial-block element mask on a [rows, cols] tile in the WGMMA layout. ``transposed``:
    rows are keys and columns queries (the dK/dV kernel). ``qseg``/``kvseg`` are row/column vectors
    in the matching reduced layouts, ``dense`` a tile in the WGMMA layout (nonzero = allowed)."""
    r = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA) + row0
    c = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA) + col0
    q_idx, kv_idx = (c, r) if transposed else (r, c)
    allowed = kv_idx < cfg.kv_len
    if index_fn is not None:
        allowed = allowed & index_fn(b, h, q_idx, kv_idx)
    if qseg is not None:
        qd, kd = (1, 0) if transposed else (0, 1)
        allowed = allowed & (lax.broadcast_in_dim(qseg, shape, [qd]) == lax.broadcast_in_dim(kvseg, shape, [kd]))
    if dense is not None:
        allowed = allowed & (dense != 0)
    return allowed


def stream_kv(cfg: _Cfg, batch, head, kv_head, qb, n, n_full, fidx, pidx, gmem, smem, bars):
    """The memory warpgroup of the forward and dQ kernels: for each step of the query block's
    lists (full, then partial) TMA the K and V blocks into ring slot step % stages once both
    compute warpgroups released it; partial steps also bring the key segment ids and the dense
    mask tile (one "extras" barrier per slot)."""
    k_ref, v_ref, kvseg_ref, dense_ref = gmem
    k_smem, v_smem, kvseg_smem, dense_smem = smem
    k_bar, v_bar, x_bar, k_used, v_used = bars
    bk, stages = cfg.block_kv, cfg.stages

    @pl.loop(0, n)
    def _(step):
        slot = lax.rem(step, jnp.int32(stages))
        kvb = list_index(n_full, fidx, pidx, step, cfg.n_kv)
        rows = pl.ds(kvb * bk, bk)

        @pl.when(step >= stages)
        def _():
            plgpu.barrier_wait(k_used.at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[batch, rows, kv_head], k_smem.at[slot], k_bar.at[slot])
        if cfg.has_extra:
            @pl.when(step >= n_full)
            def _():
                if cfg.has_segments:
                    plgpu.copy_gmem_to_smem(kvseg_ref.at[batch, rows], kvseg_smem.at[slot], x_bar.at[slot])
                if cfg.has_dense:
                    db = batch if cfg.dense_bm > 1 else 0
                    dh = head if cfg.dense_hm > 1 else 0
                    plgpu.copy_gmem_to_smem(dense_ref.at[db, dh, pl.ds(qb * BLOCK_Q, BLOCK_Q), rows],
                                            dense_smem.at[slot], x_bar.at[slot])

        @pl.when(step >= stages)
        def _():
            plgpu.barrier_wait(v_used.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[batch, rows, kv_head], v_smem.at[slot], v_bar.at[slot])

    drain_consumed(n, stages, k_used, v_used)


def drain_consumed(n, stages, *used_barriers):
    """The memory warpgroup observes the last ``stages`` consumed-barrier phases it did not wait
    for while streaming, so every barrier phase is observed before the barriers go away."""
    @pl.loop(lax.max(n - stages, 0), n)
    def _(step):
        slot = lax.rem(step, jnp.int32(stages))
        for bar in used_barriers:
            plgpu.barrier_wait(bar.at[slot])


def iota_pair(shape, row0, col0, transposed):
    r = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA) + row0
    c = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA) + col0
    return (c, r) if transposed else (r, c)


# ----------------------------------------------------------------------------------------------
# Forward kernel.


def _fwd_call(cfg: _Cfg, index_fn, score_mod, q, k, v, lists, qseg, kvseg, dense):
    bk, d, stages, dtype = cfg.block_kv, cfg.head_dim, cfg.stages, cfg.dtype
    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)
    pnum_g, pidx_g, fnum_g, fidx_g = lists

    def kernel(q_ref, k_ref, v_ref, pnum_ref, pidx_ref, fnum_ref, fidx_ref, *refs):
        refs = list(refs)
        qseg_ref = refs.pop(0) if cfg.has_segments else None
        kvseg_ref = refs.pop(0) if cfg.has_segments else None
        dense_ref = refs.pop(0) if cfg.has_dense else None
        o_ref, lse_ref = refs

        def body(qo_smem2, k_smem, v_smem, lse_smem2, qseg_smem2, kvseg_smem, dense_smem,
                 k_bar, v_bar, q_bar, x_bar, k_used, v_used, sched_bar):
            batch = lax.axis_index("batch")
            head = lax.axis_index("heads")
            qb = cfg.n_q - 1 - lax.axis_index("q_seq")  # longest-first for causal-like layouts
            wg = lax.axis_index("wg")
            lb = batch if cfg.bm > 1 else 0
            lh = head if cfg.hm > 1 else 0
            n_full = fnum_ref[lb, lh, qb]
            n_part = pnum_ref[lb, lh, qb]
            n = n_full + n_part
            fidx = fidx_ref.at[lb, lh, qb]
            pidx = pidx_ref.at[lb, lh, qb]
            kv_head = lax.div(head, jnp.int32(cfg.group))

            def sched():
                plgpu.barrier_arrive(sched_bar)
                plgpu.barrier_wait(sched_bar)

            @pl.when(wg < 2)
            def _compute():
                plgpu.set_max_registers(232, action="increase")
                qo_smem = qo_smem2.at[wg]
                lse_smem = lse_smem2.at[wg]
                row0 = qb * BLOCK_Q + wg * ROWS
                plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(row0, ROWS), head], qo_smem, q_bar.at[wg])
                qseg = None
                if cfg.has_segments:  # tracked by the same barrier as q (two arrivals)
                    plgpu.copy_gmem_to_smem(qseg_ref.at[batch, pl.ds(row0, ROWS)], qseg_smem2.at[wg], q_bar.at[wg])
                plgpu.barrier_wait(q_bar.at[wg])
                if cfg.has_segments:
                    qseg = plgpu.load(qseg_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))

                m_i = row_vec(-jnp.inf, ROWS)
                l_i = row_vec(0.0, ROWS)
                acc = wgmma_zeros((ROWS, d))

                @pl.when(n > 0)
                def _():
                    plgpu.barrier_wait(k_bar.at[0])

                pl.when(wg == 1)(sched)

                def kv_step(step, carry, partial):
                    acc, m_i, l_i = carry
                    slot = lax.rem(step, jnp.int32(stages))
                    if partial or score_mod is not None:
                        kvb = list_index(n_full, fidx, pidx, step, cfg.n_kv)
                        col0 = kvb * bk

                    def qk_during():
                        sched()
                    qk = mm(qo_smem, k_smem.at[slot].transpose((1, 0)), (ROWS, bk), during=qk_during)
                    allowed = None
                    if partial:
                        kvseg = dense = None
                        if cfg.has_extra:
                            plgpu.barrier_wait(x_bar.at[slot])
                        if cfg.has_segments:
                            kvseg = plgpu.load(kvseg_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                        if cfg.has_dense:
                            dense = plgpu.load(dense_smem.at[slot, pl.ds(wg * ROWS, ROWS)], layout=plgpu.Layout.WGMMA,
                                               optimized=False)
                        allowed = element_mask(cfg, index_fn, batch, head, row0, col0, (ROWS, bk), False,
                                               qseg, kvseg, dense)
                    plgpu.barrier_arrive(k_used.at[slot])

                    if score_mod is None:
                        s = qk * (cfg.scale * LOG2E)
                    else:
                        q_idx, kv_idx = iota_pair((ROWS, bk), row0, col0, False)
                        s = score_mod(qk * cfg.scale, batch, head, q_idx, kv_idx) * LOG2E
                    if partial:
                        s = jnp.where(allowed, s, -jnp.inf)
                    m_ij = jnp.maximum(m_i, s.max(axis=1))
                    # A row masked so far keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
                    m_use = jnp.where(m_ij == -jnp.inf, 0.0, m_ij) if partial else m_ij
                    alpha = jnp.exp2(m_i - m_use)
                    p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
                    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                    l_i = l_i * alpha
                    p16 = p.astype(dtype)
                    l_i = l_i + p.sum(axis=1)
                    acc, l_i, m_ij, p16 = lax.optimization_barrier((acc, l_i, m_ij, p16))
                    plgpu.barrier_arrive(sched_bar)
                    plgpu.barrier_wait(v_bar.at[slot])
                    plgpu.barrier_wait(sched_bar)

                    def pv_during():
                        nxt = step + 1

                        @pl.when(nxt < n)
                        def _():
                            plgpu.barrier_wait(k_bar.at[lax.rem(nxt, jnp.int32(stages))])
                    acc = mma(acc, p16, v_smem.at[slot], interpret=cfg.interpret, a_in_regs=True, during=pv_during)
                    plgpu.barrier_arrive(v_used.at[slot])
                    return acc, m_ij, l_i

                carry = (acc, m_i, l_i)
                carry = lax.fori_loop(0, n_full, functools.partial(kv_step, partial=False), carry)
                carry = lax.fori_loop(n_full, n, functools.partial(kv_step, partial=True), carry)
                acc, m_i, l_i = carry
                pl.when(wg == 0)(sched)

                nonempty = l_i > 0.0
                inv = jnp.where(nonempty, 1.0 / jnp.where(nonempty, l_i, 1.0), 0.0)
                qo_smem[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)
                lse_smem[...] = jnp.where(nonempty, (m_i + jnp.log2(jnp.where(nonempty, l_i, 1.0))) * LN2, -jnp.inf)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[batch, pl.ds(row0, ROWS), head])
                plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, pl.ds(row0, ROWS)])
                plgpu.wait_smem_to_gmem(0)

            @pl.when(wg == 2)
            def _memory():
                plgpu.set_max_registers(40, action="decrease")
                stream_kv(cfg, batch, head, kv_head, qb, n, n_full, fidx, pidx, (k_ref, v_ref, kvseg_ref, dense_ref),
                          (k_smem, v_smem, kvseg_smem, dense_smem), (k_bar, v_bar, x_bar, k_used, v_used))

        n_extra = int(cfg.has_segments) + int(cfg.has_dense)
        scratch = [
            plgpu.SMEM((2, ROWS, d), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((stages, bk, d), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((stages, bk, d), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((2, ROWS), jnp.float32),
            plgpu.SMEM((2, ROWS), jnp.int32) if cfg.has_segments else None,
            plgpu.SMEM((stages, bk), jnp.int32) if cfg.has_segments else None,
            plgpu.SMEM((stages, BLOCK_Q, bk), jnp.int8) if cfg.has_dense else None,
        ]
        barriers = [
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=1 + int(cfg.has_segments), num_barriers=2),
            plgpu.Barrier(num_arrivals=max(n_extra, 1), num_barriers=stages),  # partial-block extras
        ]
        consumed = [plgpu.Barrier(num_arrivals=2, num_barriers=stages)] * 2
        pl.run_scoped(
            lambda *a: body(*a),
            *scratch, *barriers, *consumed, plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    inputs = [q, k, v, pnum_g, pidx_g, fnum_g, fidx_g]
    if cfg.has_segments:
        inputs += [qseg, kvseg]
    if cfg.has_dense:
        inputs.append(dense)
    out_type = [
        jax.ShapeDtypeStruct((cfg.batch, cfg.t_pad, cfg.heads, d), dtype),
        jax.ShapeDtypeStruct((cfg.batch, cfg.heads, cfg.t_pad), jnp.float32),
    ]
    return plgpu.kernel(
        kernel,
        out_type=out_type,
        grid=(cfg.heads, cfg.n_q, cfg.batch),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        # Row reductions in the WGMMA layout stay inside a warp: no shared-memory scratch needed,
        # which leaves room for a third K/V stage at head_dim 128.
        compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),
        interpret=plgpu.InterpretGPUParams() if cfg.interpret else None,
    )(*inputs)


# ----------------------------------------------------------------------------------------------
# Host-side preparation (jnp, outside the kernels).


def _pad_axis(x, axis, size, value=0):
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _demote_last_block(fnum, fidx, pnum, pidx, last):
    """Moves block ``last`` from the full lists to the end of the partial lists, so the padded
    keys of a final block that is not whole are masked (lists are ascending, so it is the last
    active full entry and becomes the last partial one)."""
    n = fidx.shape[-1]
    last_full = jnp.take_along_axis(fidx, jnp.maximum(fnum - 1, 0)[..., None], axis=-1)[..., 0]
    has = (fnum > 0) & (last_full == last)
    pos = jnp.arange(n, dtype=jnp.int32)
    pidx = jnp.where(has[..., None] & (pos >= pnum[..., None]), jnp.int32(last), pidx)
    return fnum - has.astype(jnp.int32), fidx, pnum + has.astype(jnp.int32), pidx


def _kv_lists(layout: SparseLayout):
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    fnum, fidx = i32(layout.full_kv_num_blocks), i32(layout.full_kv_indices)
    pnum, pidx = i32(layout.kv_num_blocks), i32(layout.kv_indices)
    if layout.kv_len % layout.block_kv:
        fnum, fidx, pnum, pidx = _demote_last_block(fnum, fidx, pnum, pidx, layout.n_kv_blocks - 1)
    return pnum, pidx, fnum, fidx


def _q_lists(layout: SparseLayout):
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    return (i32(layout.q_num_blocks), i32(layout.q_indices), i32(layout.full_q_num_blocks),
            i32(layout.full_q_indices))


def _make_cfg(q, k, layout: SparseLayout, em: ElementMask, scale, interpret, kernel="fwd") -> _Cfg:
    b, t, h, d = q.shape
    dense_bm = dense_hm = 1
    if em.dense is not None:
        dense_bm, dense_hm = em.dense.shape[:2]
    stages = TUNING.fwd_stages if kernel == "fwd" else TUNING.dq_stages
    fits = lambda n: smem_bytes(d, layout.block_kv, n, em.dense is not None,  # noqa: E731
                                em.q_segment_ids is not None)[kernel] <= SMEM_BYTES - 1024
    while stages > 2 and not fits(stages):
        stages -= 1
    return _Cfg(
        batch=b, heads=h, kv_heads=k.shape[2], head_dim=d,
        t_pad=layout.n_q_blocks * BLOCK_Q, s_pad=layout.n_kv_blocks * layout.block_kv,
        q_len=t, kv_len=k.shape[1], n_q=layout.n_q_blocks, n_kv=layout.n_kv_blocks,
        block_kv=layout.block_kv, bm=layout.kv_num_blocks.shape[0], hm=layout.kv_num_blocks.shape[1],
        dense_bm=dense_bm, dense_hm=dense_hm,
        has_index_fn=em.index_fn is not None, has_segments=em.q_segment_ids is not None,
        has_dense=em.dense is not None, dtype=jnp.dtype(q.dtype), scale=float(scale), stages=stages,
        interpret=bool(interpret),
    )


def _extras(cfg: _Cfg, em: ElementMask):
    qseg = kvseg = dense = None
    if cfg.has_segments:
        qseg = _pad_axis(jnp.asarray(em.q_segment_ids, jnp.int32), 1, cfg.t_pad, -1)
        kvseg = _pad_axis(jnp.asarray(em.kv_segment_ids, jnp.int32), 1, cfg.s_pad, -2)
    if cfg.has_dense:
        dense = em.dense.astype(jnp.int8)
        dense = _pad_axis(_pad_axis(dense, 2, cfg.t_pad), 3, cfg.s_pad)
    return qseg, kvseg, dense


def fold_segments_into_dense(em: ElementMask) -> ElementMask:
    """With both a dense mask and segment ids, AND the segments into the dense mask (one tile
    stream instead of two; keeps the dQ kernel within shared memory at head_dim 128)."""
    if em.dense is None or em.q_segment_ids is None:
        return em
    same = em.q_segment_ids[:, None, :, None] == em.kv_segment_ids[:, None, None, :]
    return ElementMask(dense=em.dense & same, index_fn=em.index_fn)


def smem_bytes(head_dim: int, block_kv: int, stages: int, dense: bool, segments: bool = False) -> dict[str, int]:
    """Shared memory of each kernel's buffers (bytes, 2-byte q/k/v; Mosaic adds ~0.7 KiB of
    barriers and alignment), for ``applies`` and the ring depth."""
    tile = lambda r: r * head_dim * 2  # noqa: E731
    seg = lambda own, ring: 4 * (2 * ROWS + stages * ring) if segments else 0  # noqa: E731
    fwd = (2 * tile(ROWS) + 2 * stages * tile(block_kv) + 2 * ROWS * 4 + seg(ROWS, block_kv)
           + (stages * BLOCK_Q * block_kv if dense else 0))
    dq = (4 * tile(ROWS) + 2 * stages * tile(block_kv) + 4 * ROWS * 4 + seg(ROWS, block_kv)
          + (stages * BLOCK_Q * block_kv if dense else 0))
    dkv = (2 * tile(BLOCK_KV) + stages * (2 * tile(ROWS) + 2 * ROWS * 4) + seg(ROWS, ROWS)
           + (stages * ROWS * BLOCK_KV if dense else 0))
    return dict(fwd=fwd, dq=dq, dkv=dkv)


def applies(q, k, v, layout: SparseLayout, element_mask: ElementMask | None = None, *, interpret: bool = False,
            score_mod: ScoreMod | None = None) -> tuple[bool, str]:
    """Whether this kernel runs these inputs, and if not why: a Hopper GPU (compute capability 9.x)
    or ``interpret``; q/k/v all bf16 or all fp16; head_dim 64 or 128; layout blocks 128 x 128;
    shared memory within 227 KiB (always true for those sizes). ``score_mod`` must be elementwise
    jnp arithmetic Mosaic GPU lowers (it is differentiated inside the kernel by ``jax.vjp``)."""
    try:
        check_inputs(q, k, v, layout, where="mosaic_gpu")
    except ValueError as e:
        return False, str(e)
    why = not_hopper(interpret) or not_one_half_dtype("q, k, v", q, k, v)
    if why:
        return False, why
    d = q.shape[-1]
    if d not in (64, 128):
        return False, f"head_dim must be 64 or 128, got {d}"
    if (layout.block_q, layout.block_kv) != (BLOCK_Q, BLOCK_KV):
        return False, f"layout blocks must be {BLOCK_Q} x {BLOCK_KV}, got {layout.block_q} x {layout.block_kv}"
    if layout.n_q_blocks != -(-layout.q_len // BLOCK_Q) or layout.n_kv_blocks != -(-layout.kv_len // BLOCK_KV):
        return False, "layout block counts do not match its lengths"
    em = fold_segments_into_dense(element_mask or ElementMask())
    need = smem_bytes(d, layout.block_kv, 2, em.dense is not None, em.q_segment_ids is not None)
    if max(need.values()) > SMEM_BYTES - 1024:
        return False, "shared memory over 227 KiB"
    return True, "ok"


# ----------------------------------------------------------------------------------------------
# Entry point.


def forward(q, k, v, layout: SparseLayout, em: ElementMask, scale: float, score_mod, interpret: bool):
    """(o [B, T, H, D], lse [B, H, T]) and the padded arrays the backward reuses."""
    cfg = _make_cfg(q, k, layout, em, scale, interpret)
    qp = _pad_axis(q, 1, cfg.t_pad)
    kp = _pad_axis(k, 1, cfg.s_pad)
    vp = _pad_axis(v, 1, cfg.s_pad)
    qseg, kvseg, dense = _extras(cfg, em)
    o, lse = _fwd_call(cfg, em.index_fn, score_mod, qp, kp, vp, _kv_lists(layout), qseg, kvseg, dense)
    return o[:, :cfg.q_len], lse[:, :, :cfg.q_len]
