"""The chunk-sparse FFN for Hopper (sm90) on Pallas Mosaic GPU.

One CTA (one warpgroup) per (chunk, block of ``BLOCK_D`` output columns). The chunk's tokens
form one 64-row tile (one wgmma M; a chunk of n <= 64 tokens is padded), loaded once by TMA as
``D / 64`` column tiles. The CTA walks the chunk's union list (``counts[c]`` experts, a dynamic
trip count; the ids are read from GMEM as scalars) and for each union expert e:

1. ``h = x W_up_e`` as ``D / 64`` SMEM x SMEM wgmmas, ``W_up_e`` streamed through SMEM in
   ``[64, F]`` tiles by TMA (one barrier per load),
2. ``h = silu(h) * a[:, e]`` in registers (the tokens' activations of e come pre-gathered in
   union order, ``[C, E, 64]``, one TMA per expert),
3. ``acc += h W_down_e[:, block]``: a wgmma with h in registers and the ``[F, BLOCK_D]`` tile of
   ``W_down_e`` in SMEM.

Experts outside the union are never read. The output block goes back through SMEM by TMA. This
first version loads synchronously (no ring, no warp specialisation) and recomputes the up
projection once per output block; pipelining and speed are for the GPU issue.

Interpret mode (``interpret=True``, ``plgpu.InterpretGPUParams``) runs this kernel program on the
CPU: TMA copies (tiles, the 1-D activation rows, smem -> gmem), barrier phases over the dynamic
expert loop and the inner tile loop, scalar reads of the lists, the SMEM x SMEM wgmma of the up
projection, silu and the scaling. Not simulated, so only checked on a GPU: the register-operand
wgmma of the down projection (a ``jnp.dot`` in interpret mode), the Mosaic lowering and ptxas
(layouts, swizzles, registers), asynchrony and speed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

ROWS = 64  # one wgmma M: the tokens of a chunk
TILE_K = 64  # columns of x / rows of W_up per up-projection wgmma
BLOCK_D = 64  # output columns per CTA
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
MAX_D = 1024  # x stays in SMEM as D / 64 tiles of [64, 64]
EXPERT_DIMS = (64, 128)


@dataclasses.dataclass(frozen=True)
class _Cfg:
    chunks: int
    d: int
    f: int
    dtype: jnp.dtype
    interpret: bool


def _mm(a, b, shape):
    """a @ b into a fresh float32 accumulator (wgmma; both operands in SMEM). The caller adds it
    to its running sum: a fresh accumulator is what interpret mode simulates."""
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


def _call(cfg: _Cfg, x_tiles, a_union, w_up, w_down, ids, counts):
    d, f, dtype = cfg.d, cfg.f, cfg.dtype
    n_k = d // TILE_K
    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)

    def kernel(x_ref, a_ref, w_up_ref, w_down_ref, ids_ref, cnt_ref, y_ref):
        def body(x_smem, wu_smem, wd_smem, a_smem, out_smem, x_bar, wu_bar, wd_bar, a_bar):
            c = lax.axis_index("chunk")
            ob = lax.axis_index("dblock")
            count = cnt_ref[c]
            for k in range(n_k):  # the chunk's tokens, once
                plgpu.copy_gmem_to_smem(x_ref.at[c, k], x_smem.at[k], x_bar)
            plgpu.barrier_wait(x_bar)

            def expert(j, acc):
                e = ids_ref[c, j]
                plgpu.copy_gmem_to_smem(a_ref.at[c, j], a_smem, a_bar)
                plgpu.copy_gmem_to_smem(w_down_ref.at[e, :, pl.ds(ob * BLOCK_D, BLOCK_D)], wd_smem, wd_bar)

                def up_tile(k, h):
                    plgpu.copy_gmem_to_smem(w_up_ref.at[e, pl.ds(k * TILE_K, TILE_K)], wu_smem, wu_bar)
                    plgpu.barrier_wait(wu_bar)
                    return h + _mm(x_smem.at[k], wu_smem, (ROWS, f))  # waits for the wgmma: the tile may be reused

                h = plgpu.layout_cast(jnp.full((ROWS, f), 0, jnp.float32), plgpu.Layout.WGMMA)
                h = lax.fori_loop(0, n_k, up_tile, h)
                plgpu.barrier_wait(a_bar)
                a_row = plgpu.load(a_smem, layout=plgpu.Layout.WGMMA.reduce(1))
                h = h / (1.0 + jnp.exp(-h)) * lax.broadcast_in_dim(a_row, h.shape, [0])  # silu(h) * a
                plgpu.barrier_wait(wd_bar)
                return _mma_regs(acc, h.astype(dtype), wd_smem, interpret=cfg.interpret)

            acc = plgpu.layout_cast(jnp.full((ROWS, BLOCK_D), 0, jnp.float32), plgpu.Layout.WGMMA)
            acc = lax.fori_loop(0, count, expert, acc)
            out_smem[...] = acc.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem, y_ref.at[c, :, pl.ds(ob * BLOCK_D, BLOCK_D)])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            body,
            plgpu.SMEM((n_k, ROWS, TILE_K), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((TILE_K, f), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((f, BLOCK_D), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((ROWS,), jnp.float32),
            plgpu.SMEM((ROWS, BLOCK_D), dtype, transforms=(tiling, swizzle)),
            plgpu.Barrier(num_arrivals=n_k),
            plgpu.Barrier(),
            plgpu.Barrier(),
            plgpu.Barrier(),
        )

    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((cfg.chunks, ROWS, d), dtype),
        grid=(cfg.chunks, d // BLOCK_D),
        grid_names=("chunk", "dblock"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if cfg.interpret else None,
    )(x_tiles, a_union, w_up, w_down, ids, counts)


def applies(x_CxLxD, w_up_ExDxF, w_down_ExFxD, *, interpret: bool = False) -> tuple[bool, str]:
    """A Hopper GPU (or ``interpret``), x and the weights all bf16 or all fp16, at most 64 tokens
    per chunk, D a multiple of 64 up to 1024, an expert width F of 64 or 128."""
    if not interpret:
        try:
            dev = jax.devices()[0]
        except RuntimeError:
            return False, "no device"
        cc = getattr(dev, "compute_capability", None)
        if dev.platform != "gpu" or cc is None or not str(cc).startswith("9"):
            return False, f"needs a Hopper GPU (sm90), found {dev.platform} cc={cc}"
    dts = {jnp.dtype(t.dtype) for t in (x_CxLxD, w_up_ExDxF, w_down_ExFxD)}
    if len(dts) != 1 or dts.pop() not in map(jnp.dtype, SUPPORTED_DTYPES):
        return False, (f"x, w_up, w_down must all be bfloat16 or all float16, got {x_CxLxD.dtype}, "
                       f"{w_up_ExDxF.dtype}, {w_down_ExFxD.dtype}")
    length, d = x_CxLxD.shape[1:]
    if length > ROWS:
        return False, f"a chunk of {length} tokens exceeds one {ROWS}-row tile"
    if d % TILE_K or d > MAX_D:
        return False, f"D must be a multiple of {TILE_K} up to {MAX_D}, got {d}"
    if w_up_ExDxF.shape[-1] not in EXPERT_DIMS:
        return False, f"the expert width F must be one of {EXPERT_DIMS}, got {w_up_ExDxF.shape[-1]}"
    return True, "ok"


def chunk_sparse_ffn(x_CxLxD, a_CxLxE, w_up_ExDxF, w_down_ExFxD, ids_CxE, counts_C, *, interpret: bool = False):
    """Same contract as ``portable.chunk_sparse_ffn`` (bf16/fp16 inputs; no expert marks)."""
    ok, why = applies(x_CxLxD, w_up_ExDxF, w_down_ExFxD, interpret=interpret)
    if not ok:
        raise ValueError(f"chunk_sparse_ffn (mosaic_gpu): {why}")
    c, length, d = x_CxLxD.shape
    f = w_up_ExDxF.shape[-1]
    cfg = _Cfg(chunks=c, d=d, f=f, dtype=jnp.dtype(x_CxLxD.dtype), interpret=bool(interpret))
    x = jnp.pad(x_CxLxD, ((0, 0), (0, ROWS - length), (0, 0)))
    x_tiles = jnp.transpose(x.reshape(c, ROWS, d // TILE_K, TILE_K), (0, 2, 1, 3))  # [C, D/64, 64, 64]
    a = jnp.pad(a_CxLxE.astype(jnp.float32), ((0, 0), (0, ROWS - length), (0, 0)))
    a_union = jnp.take_along_axis(jnp.swapaxes(a, 1, 2), ids_CxE[:, :, None], axis=1)  # [C, E, 64], union order
    y = _call(cfg, x_tiles, a_union, w_up_ExDxF, w_down_ExFxD, ids_CxE.astype(jnp.int32), counts_C.astype(jnp.int32))
    return y[:, :length]
