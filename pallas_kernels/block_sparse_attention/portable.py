"""Block-sparse attention as a portable ``pl.pallas_call`` (FlashAttention-2 over block lists).

Forward (Dao, 2023, "FlashAttention-2", Algorithm 1): one program per (batch, query head, query
block); it walks the *full* key blocks of its row, then the *partial* ones, loading only those
blocks of K/V (whole-array refs sliced with ``pl.ds``; the lists are whole-array int32 inputs, read
like scalar prefetch), with an online softmax in float32. Element masks are evaluated on partial
blocks only; ``score_mod`` on every computed block.

Backward (Algorithm 2, split in two kernels): dQ per query block over the same lists, and dK/dV
per key block over the transposed lists, the program summing the G query heads that share its
key/value head (GQA without repeating K/V). Probabilities are recomputed from the saved LSE and
``delta = rowsum(dO * O)``; a gradient flowing into the LSE output enters as ``delta - dLSE``.
``score_mod`` must be elementwise in the score: its derivative comes from ``jax.jvp``.

Empty rows (no allowed key) give o = 0, LSE = -inf and zero gradients. On CPU run with
``interpret=True``; on GPU the same code lowers through Pallas' Triton backend (the shared test
cases passed compiled on one H200, 2026-12-01, jax 0.11.2; float32 inputs use IEEE, not TF32,
products). A portability and correctness path: the Hopper kernel is ``mosaic_gpu.py``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.block_sparse_attention.common import ElementMask, ScoreMod, SparseLayout, check_inputs


@dataclasses.dataclass(frozen=True)
class _Config:
    scale: float
    score_mod: ScoreMod | None
    index_fn: object
    interpret: object
    heads_per_kv: int  # G
    q_len: int
    kv_len: int
    block_q: int
    block_kv: int


def _whole(x):
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _pad_axis(x, axis: int, size: int, value=0):
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _mask_arrays(em: ElementMask, tp: int, sp: int) -> tuple[jax.Array, ...]:
    """The element mask's arrays, padded to whole blocks: (q_seg, kv_seg)? and dense? (int8)."""
    out = ()
    if em.q_segment_ids is not None:
        out += (_pad_axis(em.q_segment_ids.astype(jnp.int32), 1, tp),
                _pad_axis(em.kv_segment_ids.astype(jnp.int32), 1, sp))
    if em.dense is not None:
        out += (_pad_axis(_pad_axis(em.dense.astype(jnp.int8), 2, tp), 3, sp),)
    return out


class _Mask:
    """Evaluates the element mask on a (query block, key block) tile inside a kernel."""

    def __init__(self, cfg: _Config, has_seg: bool, dense_dims, refs):
        self.cfg, self.has_seg, self.dense_dims = cfg, has_seg, dense_dims
        refs = list(refs)
        self.qseg_ref = refs.pop(0) if has_seg else None
        self.kvseg_ref = refs.pop(0) if has_seg else None
        self.dense_ref = refs.pop(0) if dense_dims is not None else None

    def __call__(self, b, h, i, j, q_idx, kv_idx):
        cfg = self.cfg
        ok = kv_idx < cfg.kv_len
        if cfg.index_fn is not None:
            ok = ok & cfg.index_fn(b, h, q_idx, kv_idx)
        if self.has_seg:
            qs = self.qseg_ref[b, pl.ds(i * cfg.block_q, cfg.block_q)]
            ks = self.kvseg_ref[b, pl.ds(j * cfg.block_kv, cfg.block_kv)]
            ok = ok & (qs[:, None] == ks[None, :])
        if self.dense_ref is not None:
            db, dh = self.dense_dims
            tile = self.dense_ref[b if db > 1 else 0, h if dh > 1 else 0,
                                  pl.ds(i * cfg.block_q, cfg.block_q), pl.ds(j * cfg.block_kv, cfg.block_kv)]
            ok = ok & (tile != 0)
        return ok


def _dot(a, b, contract: tuple[int, int]):
    """a @ b contracting the given axes, float32 accumulation; float32 inputs at full precision
    (IEEE, not TF32, when lowered for GPU)."""
    prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), precision=prec,
                               preferred_element_type=jnp.float32)


def _scores(cfg: _Config, q, k, b, h, q_idx, kv_idx, with_grad: bool):
    """score_mod(q k^T * scale) in float32, and its derivative in the score when asked."""
    s = _dot(q, k, (1, 1)) * cfg.scale
    if cfg.score_mod is None:
        return s, None
    if not with_grad:
        return cfg.score_mod(s, b, h, q_idx, kv_idx).astype(jnp.float32), None
    s, ds = jax.jvp(lambda x: cfg.score_mod(x, b, h, q_idx, kv_idx), (s,), (jnp.ones_like(s),))
    return s.astype(jnp.float32), ds.astype(jnp.float32)


def _tile_idx(cfg: _Config, i, j):
    shape = (cfg.block_q, cfg.block_kv)
    return (i * cfg.block_q + jax.lax.broadcasted_iota(jnp.int32, shape, 0),
            j * cfg.block_kv + jax.lax.broadcasted_iota(jnp.int32, shape, 1))


def _sel(dims, b, h):
    return (b if dims[0] > 1 else 0), (h if dims[1] > 1 else 0)


# --- Forward ---------------------------------------------------------------------------------------

def _fwd_kernel(q_ref, k_ref, v_ref, kvn_ref, kvi_ref, fkvn_ref, fkvi_ref, *refs, cfg, layout_dims, has_seg,
                dense_dims):
    *mask_refs, o_ref, lse_ref = refs
    mask = _Mask(cfg, has_seg, dense_dims, mask_refs)
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kvh = h // cfg.heads_per_kv
    lb, lh = _sel(layout_dims, b, h)
    q = q_ref[...]
    bq, bk, d = cfg.block_q, cfg.block_kv, q.shape[-1]

    def visit(masked):
        def body(n, carry):
            m, l, acc = carry
            j = (kvi_ref if masked else fkvi_ref)[lb, lh, i, n]
            k = k_ref[b, pl.ds(j * bk, bk), kvh, :]
            v = v_ref[b, pl.ds(j * bk, bk), kvh, :]
            q_idx, kv_idx = _tile_idx(cfg, i, j)
            s, _ = _scores(cfg, q, k, b, h, q_idx, kv_idx, False)
            if masked:
                s = jnp.where(mask(b, h, i, j, q_idx, kv_idx), s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(s - m_safe[:, None])
            alpha = jnp.exp(m - m_safe)
            l = alpha * l + p.sum(axis=-1)
            pv = _dot(p.astype(v.dtype), v, (1, 0))
            return m_new, l, alpha[:, None] * acc + pv
        return body

    carry = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32), jnp.zeros((bq, d), jnp.float32))
    carry = jax.lax.fori_loop(0, fkvn_ref[lb, lh, i], visit(False), carry)
    m, l, acc = jax.lax.fori_loop(0, kvn_ref[lb, lh, i], visit(True), carry)
    nonempty = l > 0
    l_safe = jnp.where(nonempty, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(nonempty, m + jnp.log(l_safe), -jnp.inf)


def _forward(q, k, v, layout: SparseLayout, em: ElementMask, cfg: _Config):
    b, t, h, d = q.shape
    nq, nk = layout.n_q_blocks, layout.n_kv_blocks
    tp, sp = nq * cfg.block_q, nk * cfg.block_kv
    qp, kp, vp = _pad_axis(q, 1, tp), _pad_axis(k, 1, sp), _pad_axis(v, 1, sp)
    lists = (layout.kv_num_blocks, layout.kv_indices, layout.full_kv_num_blocks, layout.full_kv_indices)
    masks = _mask_arrays(em, tp, sp)
    kernel = functools.partial(_fwd_kernel, cfg=cfg, layout_dims=layout.kv_num_blocks.shape[:2],
                               has_seg=em.q_segment_ids is not None,
                               dense_dims=None if em.dense is None else em.dense.shape[:2])
    o, lse = pl.pallas_call(
        kernel, grid=(b, h, nq),
        in_specs=[pl.BlockSpec((None, cfg.block_q, None, d), lambda b, h, i: (b, i, h, 0)), _whole(kp), _whole(vp),
                  *map(_whole, lists), *map(_whole, masks)],
        out_specs=[pl.BlockSpec((None, cfg.block_q, None, d), lambda b, h, i: (b, i, h, 0)),
                   pl.BlockSpec((None, None, cfg.block_q), lambda b, h, i: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct((b, tp, h, d), q.dtype), jax.ShapeDtypeStruct((b, h, tp), jnp.float32)],
        interpret=cfg.interpret, name="block_sparse_attention_fwd",
    )(qp, kp, vp, *lists, *masks)
    return o, lse


# --- Backward --------------------------------------------------------------------------------------

def _probs(cfg, q, k, b, h, i, j, lse, mask, masked):
    q_idx, kv_idx = _tile_idx(cfg, i, j)
    s, dmod = _scores(cfg, q, k, b, h, q_idx, kv_idx, True)
    # An empty row has LSE -inf: all its computed elements are masked; keep exp finite.
    valid = lse > -jnp.inf
    p = jnp.exp(s - jnp.where(valid, lse, 0.0)[:, None])
    p = jnp.where(valid[:, None], p, 0.0)
    if masked:
        p = jnp.where(mask(b, h, i, j, q_idx, kv_idx), p, 0.0)
    return p, dmod


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, kvn_ref, kvi_ref, fkvn_ref, fkvi_ref, *refs, cfg,
               layout_dims, has_seg, dense_dims):
    *mask_refs, dq_ref = refs
    mask = _Mask(cfg, has_seg, dense_dims, mask_refs)
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kvh = h // cfg.heads_per_kv
    lb, lh = _sel(layout_dims, b, h)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    bk = cfg.block_kv

    def visit(masked):
        def body(n, dq):
            j = (kvi_ref if masked else fkvi_ref)[lb, lh, i, n]
            k = k_ref[b, pl.ds(j * bk, bk), kvh, :]
            v = v_ref[b, pl.ds(j * bk, bk), kvh, :]
            p, dmod = _probs(cfg, q, k, b, h, i, j, lse, mask, masked)
            dp = _dot(do, v, (1, 1))
            ds = p * (dp - delta[:, None])
            if dmod is not None:
                ds = ds * dmod
            return dq + _dot(ds.astype(k.dtype), k, (1, 0))
        return body

    dq = jnp.zeros(q.shape, jnp.float32)
    dq = jax.lax.fori_loop(0, fkvn_ref[lb, lh, i], visit(False), dq)
    dq = jax.lax.fori_loop(0, kvn_ref[lb, lh, i], visit(True), dq)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qn_ref, qi_ref, fqn_ref, fqi_ref, *refs, cfg,
                layout_dims, has_seg, dense_dims):
    *mask_refs, dk_ref, dv_ref = refs
    mask = _Mask(cfg, has_seg, dense_dims, mask_refs)
    b, kvh, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    bq = cfg.block_q

    def head(g, carry):
        h = kvh * cfg.heads_per_kv + g
        lb, lh = _sel(layout_dims, b, h)

        def visit(masked):
            def body(n, acc):
                dk, dv = acc
                i = (qi_ref if masked else fqi_ref)[lb, lh, j, n]
                q = q_ref[b, pl.ds(i * bq, bq), h, :]
                do = do_ref[b, pl.ds(i * bq, bq), h, :]
                lse = lse_ref[b, h, pl.ds(i * bq, bq)]
                delta = delta_ref[b, h, pl.ds(i * bq, bq)]
                p, dmod = _probs(cfg, q, k, b, h, i, j, lse, mask, masked)
                dv = dv + _dot(p.astype(do.dtype), do, (0, 0))
                dp = _dot(do, v, (1, 1))
                ds = p * (dp - delta[:, None])
                if dmod is not None:
                    ds = ds * dmod
                dk = dk + _dot(ds.astype(q.dtype), q, (0, 0))
                return dk, dv
            return body

        carry = jax.lax.fori_loop(0, fqn_ref[lb, lh, j], visit(False), carry)
        return jax.lax.fori_loop(0, qn_ref[lb, lh, j], visit(True), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, cfg.heads_per_kv, head, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(cfg: _Config, res, cts):
    qp, kp, vp, layout, em, op, lse = res
    do, dlse = cts
    b, t, h, d = do.shape
    kh = kp.shape[2]
    nq, nk = layout.n_q_blocks, layout.n_kv_blocks
    tp, sp = qp.shape[1], kp.shape[1]
    dop = _pad_axis(do, 1, tp)
    delta = jnp.einsum("bthd,bthd->bht", op.astype(jnp.float32), dop.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    if dlse is not None:
        delta = delta - _pad_axis(dlse.astype(jnp.float32), 2, tp)
    masks = _mask_arrays(em, tp, sp)
    static = dict(cfg=cfg, layout_dims=layout.kv_num_blocks.shape[:2], has_seg=em.q_segment_ids is not None,
                  dense_dims=None if em.dense is None else em.dense.shape[:2])
    q_block = pl.BlockSpec((None, cfg.block_q, None, d), lambda b, h, i: (b, i, h, 0))
    row_block = pl.BlockSpec((None, None, cfg.block_q), lambda b, h, i: (b, h, i))
    kv_lists = (layout.kv_num_blocks, layout.kv_indices, layout.full_kv_num_blocks, layout.full_kv_indices)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **static), grid=(b, h, nq),
        in_specs=[q_block, _whole(kp), _whole(vp), q_block, row_block, row_block, *map(_whole, kv_lists),
                  *map(_whole, masks)],
        out_specs=q_block, out_shape=jax.ShapeDtypeStruct(qp.shape, qp.dtype),
        interpret=cfg.interpret, name="block_sparse_attention_dq",
    )(qp, kp, vp, dop, lse, delta, *kv_lists, *masks)
    kv_block = pl.BlockSpec((None, cfg.block_kv, None, d), lambda b, kvh, j: (b, j, kvh, 0))
    q_lists = (layout.q_num_blocks, layout.q_indices, layout.full_q_num_blocks, layout.full_q_indices)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, **static), grid=(b, kh, nk),
        in_specs=[_whole(qp), kv_block, kv_block, _whole(dop), _whole(lse), _whole(delta), *map(_whole, q_lists),
                  *map(_whole, masks)],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(kp.shape, kp.dtype), jax.ShapeDtypeStruct(vp.shape, vp.dtype)],
        interpret=cfg.interpret, name="block_sparse_attention_dkv",
    )(qp, kp, vp, dop, lse, delta, *q_lists, *masks)
    return dq[:, :t], dk[:, :cfg.kv_len], dv[:, :cfg.kv_len], None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, layout, em, cfg):
    o, lse = _forward(q, k, v, layout, em, cfg)
    return o[:, :cfg.q_len], lse[:, :, :cfg.q_len]


def _attention_fwd(q, k, v, layout, em, cfg):
    o, lse = _forward(q, k, v, layout, em, cfg)
    res = (_pad_axis(q, 1, o.shape[1]), _pad_axis(k, 1, layout.n_kv_blocks * cfg.block_kv),
           _pad_axis(v, 1, layout.n_kv_blocks * cfg.block_kv), layout, em, o, lse)
    return (o[:, :cfg.q_len], lse[:, :, :cfg.q_len]), res


_attention.defvjp(_attention_fwd, _backward)


def block_sparse_attention(q, k, v, layout: SparseLayout, element_mask: ElementMask, *, scale: float | None = None,
                           score_mod: ScoreMod | None = None, return_lse: bool = False, interpret=False):
    """(o [B, T, H, D], LSE [B, H, T] float32 or None) over the listed blocks only."""
    check_inputs(q, k, v, layout, "pallas")
    d = q.shape[-1]
    cfg = _Config(scale=float(d ** -0.5 if scale is None else scale), score_mod=score_mod,
                  index_fn=element_mask.index_fn, interpret=interpret, heads_per_kv=q.shape[2] // k.shape[2],
                  q_len=layout.q_len, kv_len=layout.kv_len, block_q=layout.block_q, block_kv=layout.block_kv)
    o, lse = _attention(q, k, v, layout, element_mask, cfg)
    return o, (lse if return_lse else None)


def applies(q, k, v, layout: SparseLayout, element_mask: ElementMask, *, score_mod=None, interpret=False
            ) -> tuple[bool, str]:
    try:
        check_inputs(q, k, v, layout, "pallas")
    except ValueError as e:
        return False, str(e)
    d = q.shape[-1]
    if not interpret and (d < 16 or d & (d - 1)):
        return False, f"compiled (Triton) Pallas needs a power-of-two head_dim >= 16, got {d}"
    return True, "ok"
