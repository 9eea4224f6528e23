"""Backward of the Hopper block-sparse attention kernel (``mosaic_gpu.py``), FlashAttention-2/3
style (Dao 2023, Alg. 2; Shah et al. 2024, Sec. 3): with the saved LSE and
delta = rowsum(dO * O) - dLSE computed outside,

    P = exp(S - LSE),  dP = dO V^T,  dS = P * (dP - delta),  dQ = scale dS K,
    dK = scale dS^T Q,  dV = P^T dO,

where S are the scaled (and ``score_mod``-ified) scores; with a ``score_mod`` its elementwise
derivative (``jax.vjp`` on the tile) multiplies dS. Two kernels:

* dQ: one CTA per (query block of 128 rows, query head, batch), two compute warpgroups of 64
  rows, a memory warpgroup streaming K/V over the kv lists (the forward's ``stream_kv``).
* dK/dV: one CTA per (key block of 128 rows, kv head, batch), two compute warpgroups of 64 key
  rows, a memory warpgroup walking, for each query head of the GQA group, the transposed q lists
  (full then partial) in steps of 64 query rows and streaming Q, dO, LSE, delta into a ring. dK
  and dV accumulate over the whole group in registers and are written once.

Rows with LSE = -inf (no allowed key) get LSE = +inf here, so their P is 0 and their gradients 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.block_sparse_attention import mosaic_gpu_fwd as fw
from pallas_kernels.block_sparse_attention.mosaic_gpu_fwd import BLOCK_Q, LOG2E, ROWS


def _scores(cfg, score_mod, qk, b, h, q_idx_kv_idx):
    """(S in base-2 units, vjp of score_mod or None) for a raw QK^T tile."""
    if score_mod is None:
        return qk * (cfg.scale * LOG2E), None
    q_idx, kv_idx = q_idx_kv_idx()
    s_mod, vjp = jax.vjp(lambda s: score_mod(s, b, h, q_idx, kv_idx), qk * cfg.scale)
    return s_mod * LOG2E, vjp


def _dq_call(cfg, index_fn, score_mod, q, k, v, do, lse2, delta, lists, qseg, kvseg, dense):
    bk, d, stages, dtype = cfg.block_kv, cfg.head_dim, cfg.stages, cfg.dtype
    fuse = fw.TUNING.bwd_fuse
    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, pnum_ref, pidx_ref, fnum_ref, fidx_ref, *refs):
        refs = list(refs)
        qseg_ref = refs.pop(0) if cfg.has_segments else None
        kvseg_ref = refs.pop(0) if cfg.has_segments else None
        dense_ref = refs.pop(0) if cfg.has_dense else None
        (dq_ref,) = refs

        def body(q_smem2, do_smem2, lse_smem2, delta_smem2, k_smem, v_smem, qseg_smem2, kvseg_smem, dense_smem,
                 k_bar, v_bar, q_bar, x_bar, k_used, v_used):
            batch = lax.axis_index("batch")
            head = lax.axis_index("heads")
            qb = cfg.n_q - 1 - lax.axis_index("q_seq")
            wg = lax.axis_index("wg")
            lb = batch if cfg.bm > 1 else 0
            lh = head if cfg.hm > 1 else 0
            n_full = fnum_ref[lb, lh, qb]
            n = n_full + pnum_ref[lb, lh, qb]
            fidx = fidx_ref.at[lb, lh, qb]
            pidx = pidx_ref.at[lb, lh, qb]
            kv_head = lax.div(head, jnp.int32(cfg.group))

            @pl.when(wg < 2)
            def _compute():
                plgpu.set_max_registers(232, action="increase")
                q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
                row0 = qb * BLOCK_Q + wg * ROWS
                rows = pl.ds(row0, ROWS)
                plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem, q_bar.at[wg])
                plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, head], do_smem, q_bar.at[wg])
                plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_smem2.at[wg], q_bar.at[wg])
                plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows], delta_smem2.at[wg], q_bar.at[wg])
                if cfg.has_segments:
                    plgpu.copy_gmem_to_smem(qseg_ref.at[batch, rows], qseg_smem2.at[wg], q_bar.at[wg])
                plgpu.barrier_wait(q_bar.at[wg])
                lse = plgpu.load(lse_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
                delta = plgpu.load(delta_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
                qseg = None
                if cfg.has_segments:
                    qseg = plgpu.load(qseg_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))

                def kv_step(step, dq, partial):
                    slot = lax.rem(step, jnp.int32(stages))
                    kvb = fw.list_index(n_full, fidx, pidx, step, cfg.n_kv)
                    col0 = kvb * bk
                    plgpu.barrier_wait(k_bar.at[slot])
                    if fuse:
                        plgpu.barrier_wait(v_bar.at[slot])
                        qk, dp = fw.mm2(q_smem, k_smem.at[slot].transpose((1, 0)), (ROWS, bk),
                                        do_smem, v_smem.at[slot].transpose((1, 0)), (ROWS, bk))
                        plgpu.barrier_arrive(v_used.at[slot])
                    else:
                        qk = fw.mm(q_smem, k_smem.at[slot].transpose((1, 0)), (ROWS, bk))
                    s, vjp = _scores(cfg, score_mod, qk, batch, head,
                                     lambda: fw.iota_pair((ROWS, bk), row0, col0, False))
                    if partial:
                        kvseg = dmask = None
                        if cfg.has_extra:
                            plgpu.barrier_wait(x_bar.at[slot])
                        if cfg.has_segments:
                            kvseg = plgpu.load(kvseg_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                        if cfg.has_dense:
                            dmask = plgpu.load(dense_smem.at[slot, pl.ds(wg * ROWS, ROWS)], layout=plgpu.Layout.WGMMA,
                                               optimized=False)
                        allowed = fw.element_mask(cfg, index_fn, batch, head, row0, col0, (ROWS, bk), False,
                                                  qseg, kvseg, dmask)
                        s = jnp.where(allowed, s, -jnp.inf)
                    p = jnp.exp2(s - lax.broadcast_in_dim(lse, s.shape, [0]))
                    if not fuse:
                        plgpu.barrier_wait(v_bar.at[slot])
                        dp = fw.mm(do_smem, v_smem.at[slot].transpose((1, 0)), (ROWS, bk))
                        plgpu.barrier_arrive(v_used.at[slot])
                    ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
                    if vjp is not None:
                        (ds,) = vjp(ds)
                    dq = fw.mma(dq, ds.astype(dtype), k_smem.at[slot], interpret=cfg.interpret, a_in_regs=True)
                    plgpu.barrier_arrive(k_used.at[slot])
                    return dq

                dq = fw.wgmma_zeros((ROWS, d))
                dq = lax.fori_loop(0, n_full, functools.partial(kv_step, partial=False), dq)
                dq = lax.fori_loop(n_full, n, functools.partial(kv_step, partial=True), dq)
                q_smem[...] = (dq * cfg.scale).astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[batch, rows, head])
                plgpu.wait_smem_to_gmem(0)

            @pl.when(wg == 2)
            def _memory():
                plgpu.set_max_registers(40, action="decrease")
                fw.stream_kv(cfg, batch, head, kv_head, qb, n, n_full, fidx, pidx, (k_ref, v_ref, kvseg_ref, dense_ref),
                             (k_smem, v_smem, kvseg_smem, dense_smem), (k_bar, v_bar, x_bar, k_used, v_used))

        n_extra = int(cfg.has_segments) + int(cfg.has_dense)
        tile = lambda *shape: plgpu.SMEM(shape, dtype, transforms=(tiling, swizzle))
        scratch = [
            tile(2, ROWS, d), tile(2, ROWS, d),
            plgpu.SMEM((2, ROWS), jnp.float32), plgpu.SMEM((2, ROWS), jnp.float32),
            tile(stages, bk, d), tile(stages, bk, d),
            plgpu.SMEM((2, ROWS), jnp.int32) if cfg.has_segments else None,
            plgpu.SMEM((stages, bk), jnp.int32) if cfg.has_segments else None,
            plgpu.SMEM((stages, BLOCK_Q, bk), jnp.int8) if cfg.has_dense else None,
        ]
        barriers = [
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=4 + int(cfg.has_segments), num_barriers=2),
            plgpu.Barrier(num_arrivals=max(n_extra, 1), num_barriers=stages),
        ]
        consumed = [plgpu.Barrier(num_arrivals=2, num_barriers=stages)] * 2
        pl.run_scoped(lambda *a: body(*a), *scratch, *barriers, *consumed, collective_axes="wg")

    inputs = [q, k, v, do, lse2, delta, *lists]
    if cfg.has_segments:
        inputs += [qseg, kvseg]
    if cfg.has_dense:
        inputs.append(dense)
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        grid=(cfg.heads, cfg.n_q, cfg.batch),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if cfg.interpret else None,
    )(*inputs)


def _dkv_call(cfg, index_fn, score_mod, q, k, v, do, lse2, delta, qlists, qseg, kvseg, dense_t):
    bk, d, dtype = cfg.block_kv, cfg.head_dim, cfg.dtype
    stages = fw.TUNING.dkv_stages
    fuse = fw.TUNING.bwd_fuse
    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)
    group = cfg.group

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, pnum_ref, pidx_ref, fnum_ref, fidx_ref, *refs):
        refs = list(refs)
        qseg_ref = refs.pop(0) if cfg.has_segments else None
        kvseg_ref = refs.pop(0) if cfg.has_segments else None
        dense_ref = refs.pop(0) if cfg.has_dense else None
        dk_ref, dv_ref = refs

        def body(k_smem2, v_smem2, q_smem, do_smem, lse_smem, delta_smem, kvseg_smem2, qseg_smem, dense_smem,
                 kv_bar, q_bar, x_bar, q_used):
            batch = lax.axis_index("batch")
            kv_head = lax.axis_index("kv_heads")
            kb = lax.axis_index("kv_seq")
            wg = lax.axis_index("wg")
            lb = batch if cfg.bm > 1 else 0

            def head_lists(g):
                head = kv_head * group + g
                lh = head if cfg.hm > 1 else 0
                n_full = fnum_ref[lb, lh, kb]
                return head, n_full, n_full + pnum_ref[lb, lh, kb], fidx_ref.at[lb, lh, kb], pidx_ref.at[lb, lh, kb]

            @pl.when(wg < 2)
            def _compute():
                plgpu.set_max_registers(232, action="increase")
                k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
                row0 = kb * bk + wg * ROWS
                rows = pl.ds(row0, ROWS)
                plgpu.copy_gmem_to_smem(k_ref.at[batch, rows, kv_head], k_smem, kv_bar.at[wg])
                plgpu.copy_gmem_to_smem(v_ref.at[batch, rows, kv_head], v_smem, kv_bar.at[wg])
                if cfg.has_segments:
                    plgpu.copy_gmem_to_smem(kvseg_ref.at[batch, rows], kvseg_smem2.at[wg], kv_bar.at[wg])
                plgpu.barrier_wait(kv_bar.at[wg])
                kvseg = None
                if cfg.has_segments:
                    kvseg = plgpu.load(kvseg_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))

                def per_head(g, carry):
                    head, n_full, n, fidx, pidx = head_lists(g)

                    def q_step(j, carry, partial):
                        dk, dv, t = carry
                        slot = lax.rem(t, jnp.int32(stages))
                        qblk = fw.list_index(n_full, fidx, pidx, lax.div(j, 2), cfg.n_q)
                        col0 = qblk * BLOCK_Q + lax.rem(j, 2) * ROWS
                        plgpu.barrier_wait(q_bar.at[slot])
                        if fuse:
                            st, dpt = fw.mm2(k_smem, q_smem.at[slot].transpose((1, 0)), (ROWS, ROWS),
                                             v_smem, do_smem.at[slot].transpose((1, 0)), (ROWS, ROWS))
                        else:
                            st = fw.mm(k_smem, q_smem.at[slot].transpose((1, 0)), (ROWS, ROWS))
                        s, vjp = _scores(cfg, score_mod, st, batch, head,
                                         lambda: fw.iota_pair((ROWS, ROWS), row0, col0, True))
                        if partial:
                            qseg = dmask = None
                            if cfg.has_extra:
                                plgpu.barrier_wait(x_bar.at[slot])
                            if cfg.has_segments:
                                qseg = plgpu.load(qseg_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                            if cfg.has_dense:
                                dmask = plgpu.load(dense_smem.at[slot, pl.ds(wg * ROWS, ROWS)],
                                                   layout=plgpu.Layout.WGMMA, optimized=False)
                            allowed = fw.element_mask(cfg, index_fn, batch, head, row0, col0, (ROWS, ROWS), True,
                                                      qseg, kvseg, dmask)
                            s = jnp.where(allowed, s, -jnp.inf)
                        lse = plgpu.load(lse_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                        pt = jnp.exp2(s - lax.broadcast_in_dim(lse, s.shape, [1]))
                        if not fuse:
                            dv = fw.mma(dv, pt.astype(dtype), do_smem.at[slot], interpret=cfg.interpret,
                                        a_in_regs=True)
                            dpt = fw.mm(v_smem, do_smem.at[slot].transpose((1, 0)), (ROWS, ROWS))
                        delta = plgpu.load(delta_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                        dst = pt * (dpt - lax.broadcast_in_dim(delta, dpt.shape, [1]))
                        if vjp is not None:
                            (dst,) = vjp(dst)
                        if fuse:
                            dv, dk = fw.mma2(dv, pt.astype(dtype), do_smem.at[slot], dk, dst.astype(dtype),
                                             q_smem.at[slot], interpret=cfg.interpret)
                        else:
                            dk = fw.mma(dk, dst.astype(dtype), q_smem.at[slot], interpret=cfg.interpret,
                                        a_in_regs=True)
                        plgpu.barrier_arrive(q_used.at[slot])
                        return dk, dv, t + 1

                    carry = lax.fori_loop(0, 2 * n_full, functools.partial(q_step, partial=False), carry)
                    return lax.fori_loop(2 * n_full, 2 * n, functools.partial(q_step, partial=True), carry)

                zeros = fw.wgmma_zeros((ROWS, d))
                dk, dv, _ = lax.fori_loop(0, group, per_head, (zeros, zeros, jnp.int32(0)))
                k_smem[...] = (dk * cfg.scale).astype(dtype)
                v_smem[...] = dv.astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[batch, rows, kv_head], commit_group=False)
                plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[batch, rows, kv_head], commit_group=False)
                plgpu.commit_smem_to_gmem_group()
                plgpu.wait_smem_to_gmem(0)

            @pl.when(wg == 2)
            def _memory():
                plgpu.set_max_registers(40, action="decrease")

                def per_head(g, t):
                    head, n_full, n, fidx, pidx = head_lists(g)

                    def step(j, t):
                        slot = lax.rem(t, jnp.int32(stages))
                        qblk = fw.list_index(n_full, fidx, pidx, lax.div(j, 2), cfg.n_q)
                        qrow = qblk * BLOCK_Q + lax.rem(j, 2) * ROWS
                        rows = pl.ds(qrow, ROWS)

                        @pl.when(t >= stages)
                        def _():
                            plgpu.barrier_wait(q_used.at[slot])
                        plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem.at[slot], q_bar.at[slot])
                        plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, head], do_smem.at[slot], q_bar.at[slot])
                        plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_smem.at[slot], q_bar.at[slot])
                        plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows], delta_smem.at[slot], q_bar.at[slot])
                        if cfg.has_extra:
                            @pl.when(j >= 2 * n_full)
                            def _():
                                if cfg.has_segments:
                                    plgpu.copy_gmem_to_smem(qseg_ref.at[batch, rows], qseg_smem.at[slot],
                                                            x_bar.at[slot])
                                if cfg.has_dense:
                                    db = batch if cfg.dense_bm > 1 else 0
                                    dh = head if cfg.dense_hm > 1 else 0
                                    plgpu.copy_gmem_to_smem(dense_ref.at[db, dh, pl.ds(kb * bk, bk), rows],
                                                            dense_smem.at[slot], x_bar.at[slot])
                        return t + 1

                    return lax.fori_loop(0, 2 * n, step, t)

                total = lax.fori_loop(0, group, per_head, jnp.int32(0))
                fw.drain_consumed(total, stages, q_used)

        n_extra = int(cfg.has_segments) + int(cfg.has_dense)
        tile = lambda *shape: plgpu.SMEM(shape, dtype, transforms=(tiling, swizzle))
        scratch = [
            tile(2, ROWS, d), tile(2, ROWS, d), tile(stages, ROWS, d), tile(stages, ROWS, d),
            plgpu.SMEM((stages, ROWS), jnp.float32), plgpu.SMEM((stages, ROWS), jnp.float32),
            plgpu.SMEM((2, ROWS), jnp.int32) if cfg.has_segments else None,
            plgpu.SMEM((stages, ROWS), jnp.int32) if cfg.has_segments else None,
            plgpu.SMEM((stages, bk, ROWS), jnp.int8) if cfg.has_dense else None,
        ]
        barriers = [
            plgpu.Barrier(num_arrivals=2 + int(cfg.has_segments), num_barriers=2),
            plgpu.Barrier(num_arrivals=4, num_barriers=stages),
            plgpu.Barrier(num_arrivals=max(n_extra, 1), num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        ]
        pl.run_scoped(lambda *a: body(*a), *scratch, *barriers, collective_axes="wg")

    inputs = [q, k, v, do, lse2, delta, *qlists]
    if cfg.has_segments:
        inputs += [qseg, kvseg]
    if cfg.has_dense:
        inputs.append(dense_t)
    return plgpu.kernel(
        kernel,
        out_type=[jax.ShapeDtypeStruct(k.shape, dtype)] * 2,
        grid=(cfg.kv_heads, cfg.n_kv, cfg.batch),
        grid_names=("kv_heads", "kv_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if cfg.interpret else None,
    )(*inputs)


def backward(q, k, v, layout, em, o, lse, do, dlse, scale, score_mod, interpret):
    """(dq, dk, dv) for the forward's (o, lse) with cotangents (do, dlse)."""
    cfg = fw._make_cfg(q, k, layout, em, scale, interpret, kernel="dq")
    t = cfg.q_len
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    if dlse is not None:
        delta = delta - jnp.where(jnp.isfinite(lse), dlse.astype(jnp.float32), 0.0)
    lse2 = jnp.where(jnp.isfinite(lse), lse * LOG2E, jnp.inf)  # empty rows: P = 0
    pad_t = lambda x, val: fw._pad_axis(x, 2, cfg.t_pad, val)
    lse2, delta = pad_t(lse2, jnp.inf), pad_t(delta, 0.0)
    qp, dop = fw._pad_axis(q, 1, cfg.t_pad), fw._pad_axis(do.astype(q.dtype), 1, cfg.t_pad)
    kp, vp = fw._pad_axis(k, 1, cfg.s_pad), fw._pad_axis(v, 1, cfg.s_pad)
    qseg, kvseg, dense = fw._extras(cfg, em)
    dq = _dq_call(cfg, em.index_fn, score_mod, qp, kp, vp, dop, lse2, delta, fw._kv_lists(layout), qseg, kvseg, dense)
    dense_t = None if dense is None else jnp.swapaxes(dense, 2, 3)
    dk, dv = _dkv_call(cfg, em.index_fn, score_mod, qp, kp, vp, dop, lse2, delta, fw._q_lists(layout), qseg, kvseg,
                       dense_t)
    return dq[:, :t], dk[:, :cfg.kv_len], dv[:, :cfg.kv_len]
