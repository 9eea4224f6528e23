"""Decode attention for Hopper (sm90) on Pallas Mosaic GPU, over a compacted per-head KV cache.

One CTA (one warpgroup) per (key/value head, split of the slot axis, row): the queries of the G
query heads of the group and the T query tokens form one 64-row tile (one wgmma M; R = T * G
<= 64, padded), loaded once by TMA; the CTA walks its split's key/value blocks of ``BLOCK_C``
slots up to the head's slot count (a dynamic trip count: empty heads and the unused tail of a
cache are never read), double-buffered: while block j is computed, the TMA for block j + 1 is in
flight (a "loaded" barrier per ring slot, K and the slots' positions on one barrier, V on
another). S = Q K^T is a wgmma with both operands in SMEM; the mask is by position
(``0 <= pos <= q_pos``, slot < count) on the WGMMA layout; the softmax is online in base 2; P V is
a wgmma with P in registers. Each CTA writes its normalised partial output and log-sum-exp; the
splits are combined outside (``common.combine``), so K/V are read once per group and long caches
spread over many CTAs (FlashDecoding's split-K).

Interpret mode (``interpret=True``, ``plgpu.InterpretGPUParams``) runs this kernel program on the
CPU: TMA copies (tiles, 1-D int32 chunks, smem -> gmem), barrier phases across the ring, scalar
reads of the counts, the dynamic block loop, the masks, the online softmax and the SMEM-SMEM
wgmma. Not simulated, so only checked on a GPU: the register-operand wgmma (P V; a ``jnp.dot``
in interpret mode), the Mosaic lowering and ptxas (layouts, swizzles, registers), asynchrony and
speed.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.decode_attention.common import (Split, check_inputs, combine, full_counts, group_rows, pad_slots,
                                                    ungroup_rows)
from pallas_kernels.hopper import HALF_DTYPES, not_hopper, not_one_half_dtype

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
ROWS = 64  # one wgmma M: all query rows of a group
BLOCK_C = 64  # slots per K/V block
STAGES = 2  # K/V ring slots: STAGES - 1 blocks in flight while one is computed (a tuning knob, >= 2)
SUPPORTED_DTYPES = HALF_DTYPES


@dataclasses.dataclass(frozen=True)
class _Cfg:
    batch: int
    kv_heads: int
    head_dim: int
    split: Split
    dtype: jnp.dtype
    scale: float
    interpret: bool
    stages: int = 2


def _mm(a, b, shape):
    """a @ b into a fresh float32 accumulator (wgmma; both operands in SMEM)."""
    def body(r):
        plgpu.wgmma(r, a, b)
        return r[...]
    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _mma_regs(acc, a, b, *, interpret: bool):
    """acc + a @ b with ``a`` in registers (interpret mode does not simulate that wgmma)."""
    if interpret:
        return acc + jnp.dot(a, b[...], preferred_element_type=jnp.float32)

    def body(r):
        plgpu.wgmma(r, a, b)
    return pl.run_state(body)(plgpu.ACC.init(acc))


def _call(cfg: _Cfg, q, k, v, pos, counts, qpos):
    d, bc, dtype, stages = cfg.head_dim, cfg.split.block_c, cfg.dtype, cfg.stages
    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)

    def kernel(q_ref, k_ref, v_ref, pos_ref, cnt_ref, qpos_ref, o_ref, lse_ref):
        def body(q_smem, k_smem, v_smem, pos_smem, qpos_smem, lse_smem, q_bar, k_bar, v_bar):
            h = lax.axis_index("heads")
            s = lax.axis_index("split")
            b = lax.axis_index("batch")
            count = cnt_ref[b, h]
            start = s * cfg.split.per_split
            stop = lax.min(start + cfg.split.per_split, count)
            n = lax.max(stop - start + bc - 1, 0) // bc

            plgpu.copy_gmem_to_smem(q_ref.at[b, h], q_smem, q_bar)
            plgpu.copy_gmem_to_smem(qpos_ref.at[b, h], qpos_smem, q_bar)
            plgpu.barrier_wait(q_bar)
            qp = plgpu.load(qpos_smem, layout=plgpu.Layout.WGMMA.reduce(1))

            def fetch(j):
                slot = lax.rem(j, jnp.int32(stages))
                rows = pl.ds(start + j * bc, bc)
                plgpu.copy_gmem_to_smem(k_ref.at[b, h, rows], k_smem.at[slot], k_bar.at[slot])
                plgpu.copy_gmem_to_smem(pos_ref.at[b, h, rows], pos_smem.at[slot], k_bar.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[b, h, rows], v_smem.at[slot], v_bar.at[slot])

            for first in range(stages - 1):  # the ring's first stages - 1 blocks in flight
                @pl.when(first < n)
                def _():
                    fetch(jnp.int32(first))

            def step(j, carry):
                acc, m_i, l_i = carry
                slot = lax.rem(j, jnp.int32(stages))

                @pl.when(j + stages - 1 < n)
                def _():
                    # the slot of block j + stages - 1 was consumed by step j - 1 (its wgmmas waited)
                    fetch(j + stages - 1)

                plgpu.barrier_wait(k_bar.at[slot])
                qk = _mm(q_smem, k_smem.at[slot].transpose((1, 0)), (ROWS, bc))
                kp = plgpu.load(pos_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                col = plgpu.broadcasted_iota(jnp.int32, (ROWS, bc), 1, layout=plgpu.Layout.WGMMA) + (start + j * bc)
                kp2 = lax.broadcast_in_dim(kp, (ROWS, bc), [1])
                ok = (kp2 >= 0) & (kp2 <= lax.broadcast_in_dim(qp, (ROWS, bc), [0])) & (col < count)
                sc = jnp.where(ok, qk * (cfg.scale * LOG2E), -jnp.inf)
                m_new = jnp.maximum(m_i, sc.max(axis=1))
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                alpha = jnp.exp2(m_i - m_use)
                p = jnp.exp2(sc - lax.broadcast_in_dim(m_use, sc.shape, [0]))
                l_i = l_i * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                plgpu.barrier_wait(v_bar.at[slot])
                acc = _mma_regs(acc, p.astype(dtype), v_smem.at[slot], interpret=cfg.interpret)
                return acc, m_new, l_i

            acc = plgpu.layout_cast(jnp.full((ROWS, d), 0, jnp.float32), plgpu.Layout.WGMMA)
            m_i = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l_i = plgpu.layout_cast(jnp.full((ROWS,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc, m_i, l_i = lax.fori_loop(0, n, step, (acc, m_i, l_i))
            seen = l_i > 0.0
            inv = jnp.where(seen, 1.0 / jnp.where(seen, l_i, 1.0), 0.0)
            q_smem[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)
            lse_smem[...] = jnp.where(seen, (m_i + jnp.log2(jnp.where(seen, l_i, 1.0))) * LN2, -jnp.inf)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, h, s])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, s])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            body,
            plgpu.SMEM((ROWS, d), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((stages, bc, d), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((stages, bc, d), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((stages, bc), jnp.int32),
            plgpu.SMEM((ROWS,), jnp.int32),
            plgpu.SMEM((ROWS,), jnp.float32),
            plgpu.Barrier(num_arrivals=2),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
        )

    ns = cfg.split.n_splits
    out_type = [jax.ShapeDtypeStruct((cfg.batch, cfg.kv_heads, ns, ROWS, d), dtype),
                jax.ShapeDtypeStruct((cfg.batch, cfg.kv_heads, ns, ROWS), jnp.float32)]
    return plgpu.kernel(
        kernel,
        out_type=out_type,
        grid=(cfg.kv_heads, ns, cfg.batch),
        grid_names=("heads", "split", "batch"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if cfg.interpret else None,
    )(q, k, v, pos, counts, qpos)


def applies(q, k, v, *, interpret: bool = False) -> tuple[bool, str]:
    """A Hopper GPU (or ``interpret``), q/k/v all bf16 or all fp16, head_dim 64 or 128, and at
    most 64 query rows per group (T * H / K)."""
    why = not_hopper(interpret) or not_one_half_dtype("q, k, v", q, k, v)
    if why:
        return False, why
    if q.shape[-1] not in (64, 128):
        return False, f"head_dim must be 64 or 128, got {q.shape[-1]}"
    rows = q.shape[1] * (q.shape[2] // k.shape[1])
    if rows > ROWS:
        return False, f"T x (query heads per key/value head) = {rows} query rows exceed one {ROWS}-row tile"
    return True, "ok"


def decode_attention(q_BxTxHxD, k_BxKxCxD, v_BxKxCxD, kv_positions_BxKxC, q_positions_BxT, counts_BxK=None, *,
                     scale: float | None = None, return_lse: bool = False, n_splits: int | None = None,
                     interpret: bool = False):
    """Same contract as ``reference.decode_attention`` (bf16/fp16 inputs)."""
    check_inputs(q_BxTxHxD, k_BxKxCxD, v_BxKxCxD, kv_positions_BxKxC, q_positions_BxT, counts_BxK)
    ok, why = applies(q_BxTxHxD, k_BxKxCxD, v_BxKxCxD, interpret=interpret)
    if not ok:
        raise ValueError(f"decode_attention (mosaic_gpu): {why}")
    b, t, h, d = q_BxTxHxD.shape
    kh, c = k_BxKxCxD.shape[1:3]
    split = Split.make(c, BLOCK_C, n_splits)
    cfg = _Cfg(batch=b, kv_heads=kh, head_dim=d, split=split, dtype=jnp.dtype(q_BxTxHxD.dtype),
               scale=d ** -0.5 if scale is None else float(scale), interpret=bool(interpret),
               stages=max(2, int(STAGES)))
    counts = full_counts(counts_BxK, kv_positions_BxKxC)
    k, v, pos = pad_slots(k_BxKxCxD, v_BxKxCxD, kv_positions_BxKxC.astype(jnp.int32), split.padded)
    q, qpos = group_rows(q_BxTxHxD, q_positions_BxT, kh, ROWS)
    qpos = jnp.broadcast_to(qpos[:, None, :], (b, kh, ROWS))
    o_part, lse_part = _call(cfg, q, k, v, pos, counts, qpos)
    r = t * (h // kh)  # the real rows of each 64-row tile: the combine reads only these
    o, lse = combine(o_part[:, :, :, :r].astype(jnp.float32), lse_part[:, :, :, :r])
    o, lse = ungroup_rows(o, lse, t, h)
    o = o.astype(q_BxTxHxD.dtype)
    return (o, lse) if return_lse else o
