"""Block-sparse attention on TPU through jax's splash attention (``jax.experimental.pallas.ops.tpu.
splash_attention``), which is used as it is: this file only converts a layout + element mask into
splash's mask objects and calls the kernel.

Conversion (:func:`to_splash`), per head a ``splash_attention_mask.Mask`` of the padded shape
(T rounded up to block_q, S to block_kv):

* an index function that describes itself (``common.describe``) becomes splash's structured masks:
  ``CausalMask``, ``LocalMask``, ``ChunkedCausalMask``, ``FullMask``, combined with ``LogicalAnd`` /
  ``LogicalOr`` (and a small ``Not`` mask); segment ids become splash's ``SegmentIds`` (they may be
  traced: splash reads them at run time). One mask is shared by every batch row (vmap over batch).
* anything else (a dense part, an opaque index function) becomes a ``NumpyMask`` per head (and
  per batch row when the mask varies along the batch: one splash kernel per row), evaluated from
  the layout and element mask. This needs concrete arrays: splash builds its block tables
  (``MaskInfo``) in numpy when the kernel is made, so a traced mask cannot be used here.
* padding (queries >= T, keys >= S) is masked by a length mask ANDed in, so splash's block
  classification equals the BlockMask's.

The lists of the layout are not passed to splash: splash derives the same block classification
from the mask objects (the tests check this), except that it does not skip blocks that only the
segment ids make empty. GQA maps to splash's q-head / kv-head grouping ([H, T, D] queries,
[K, S, D] keys per batch row). ``score_mod`` may only be soft-capping (``attn_logits_soft_cap``).

Empty rows: splash divides by a zero row sum when a query block has no computed block and averages
masked keys when a row is masked inside computed blocks; rows with no allowed key are therefore
fixed afterwards (o = 0, LSE = -inf) from splash's LSE, inside a ``custom_vjp`` whose backward
re-runs splash's own VJP (one extra forward). When every row is known to see a key and the LSE is
not asked for, splash's VJP is used directly. A gradient through the returned LSE raises
``NotImplementedError`` on this path (splash does not differentiate its LSE).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from pallas_kernels.block_sparse_attention.common import (ElementMask, SparseLayout, check_inputs, describe,
                                                          layout_to_dense)

LANES = 128  # splash's kv compute blocks are whole lanes
# Splash fills masked scores with DEFAULT_MASK_VALUE (-0.7 * float32 max); a row whose LSE is
# below half of it saw no allowed key.
EMPTY_LSE = 0.5 * sk.DEFAULT_MASK_VALUE


class LengthMask(sm.Mask):
    """Allowed where q < q_len and kv < kv_len (the padding of whole blocks is masked)."""

    def __init__(self, shape: tuple[int, int], q_len: int, kv_len: int):
        self._shape, self.q_len, self.kv_len = tuple(shape), q_len, kv_len

    @property
    def shape(self):
        return self._shape

    def __getitem__(self, idx):
        qs, ks = idx
        q = np.arange(self._shape[0])[qs]
        k = np.arange(self._shape[1])[ks]
        return (q[:, None] < self.q_len) & (k[None, :] < self.kv_len)

    def __eq__(self, other):
        return isinstance(other, LengthMask) and (self._shape, self.q_len, self.kv_len) == (
            other._shape, other.q_len, other.kv_len)

    def __hash__(self):
        return hash((LengthMask, self._shape, self.q_len, self.kv_len))


class NotMask(sm.Mask):
    """The complement of a splash mask."""

    def __init__(self, inner: sm.Mask):
        self.inner = inner

    @property
    def shape(self):
        return self.inner.shape

    def __getitem__(self, idx):
        return ~np.asarray(self.inner[idx])

    def __eq__(self, other):
        return isinstance(other, NotMask) and self.inner == other.inner

    def __hash__(self):
        return hash((NotMask, self.inner))


def structured_mask(d: tuple | None, shape: tuple[int, int]) -> sm.Mask | None:
    """Splash's own mask for a ``common.describe`` tuple, or None when it has none."""
    if d is None:
        return None
    kind, *args = d
    if kind == "full":
        return sm.FullMask(shape)
    if kind == "causal":
        return sm.CausalMask(shape, offset=int(args[0]))
    if kind == "local":
        left, right, offset = args
        return sm.LocalMask(shape, (left, right), offset=int(offset))
    if kind == "chunked_causal":
        return sm.ChunkedCausalMask(shape, int(args[0]))
    if kind in ("and", "or"):
        parts = [structured_mask(p, shape) for p in args]
        if any(p is None for p in parts):
            return None
        op = sm.LogicalAnd if kind == "and" else sm.LogicalOr
        return functools.reduce(op, parts)
    if kind == "not":
        inner = structured_mask(args[0], shape)
        return None if inner is None else NotMask(inner)
    return None


def _concrete(x):
    """numpy value of x, or None when it is traced."""
    if x is None:
        return None
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


@dataclasses.dataclass(frozen=True)
class SplashPlan:
    """What splash runs: ``masks`` (one MultiHeadMask shared by the batch, or one per batch row),
    optional segment ids [B, T_pad] / [B, S_pad], the padded shape and block sizes."""
    masks: tuple
    q_segment_ids: jax.Array | None
    kv_segment_ids: jax.Array | None
    q_len: int
    kv_len: int
    padded: tuple[int, int]
    block_q: int
    block_kv: int
    may_have_empty_rows: bool

    def dense(self, batch: int) -> np.ndarray:
        """The element mask splash computes, [batch, H, q_len, kv_len] (numpy; for tests)."""
        t, s = self.q_len, self.kv_len
        out = []
        for b in range(batch):
            mh = self.masks[b if len(self.masks) > 1 else 0]
            m = np.stack([np.asarray(mh.masks[h][(slice(0, t), slice(0, s))]) for h in range(len(mh.masks))])
            if self.q_segment_ids is not None:
                qs = np.asarray(self.q_segment_ids[b, :t])
                ks = np.asarray(self.kv_segment_ids[b, :s])
                m = m & (qs[:, None] == ks[None, :])[None]
            out.append(m)
        return np.stack(out)


def _needs_dense(em: ElementMask) -> bool:
    return em.dense is not None or (em.index_fn is not None and structured_mask(describe(em.index_fn), (8, 8)) is None)


def _rows_nonempty(mask: sm.Mask, q_len: int, kv_len: int, rows: int, qseg=None, kvseg=None) -> bool:
    """Whether every real query row of ``mask`` (and of the segment ids, numpy) sees a key;
    evaluated ``rows`` rows at a time."""
    for r0 in range(0, q_len, rows):
        r1 = min(q_len, r0 + rows)
        m = np.asarray(mask[(slice(r0, r1), slice(0, kv_len))])
        if qseg is not None:
            m = m & (qseg[r0:r1, None] == kvseg[None, :kv_len])
        if not m.any(axis=1).all():
            return False
    return True


@functools.lru_cache(maxsize=32)
def _static_rows_nonempty(mask: sm.Mask, q_len: int, kv_len: int, rows: int) -> bool:
    return _rows_nonempty(mask, q_len, kv_len, rows)


def to_splash(layout: SparseLayout, em: ElementMask, *, batch: int, heads: int) -> SplashPlan:
    """Converts a layout + element mask to splash masks (see the module docstring). Raises
    ``ValueError`` when the mask needs dense evaluation but its arrays are traced."""
    bq, bk, t, s = layout.block_q, layout.block_kv, layout.q_len, layout.kv_len
    tp, sp = layout.n_q_blocks * bq, layout.n_kv_blocks * bk
    shape = (tp, sp)
    length = LengthMask(shape, t, s) if (tp, sp) != (t, s) else None

    def with_length(m):
        return m if length is None else sm.LogicalAnd(m, length)

    if not _needs_dense(em):
        base = structured_mask(describe(em.index_fn), shape) if em.index_fn is not None else sm.FullMask(shape)
        head_mask = with_length(base)
        multi = sm.MultiHeadMask([head_mask] * heads)
        qseg = kvseg = None
        may_be_empty = True
        if em.q_segment_ids is not None:
            qseg = jnp.pad(em.q_segment_ids.astype(jnp.int32), ((0, 0), (0, tp - t)))
            kvseg = jnp.pad(em.kv_segment_ids.astype(jnp.int32), ((0, 0), (0, sp - s)))
            q_np, kv_np = _concrete(em.q_segment_ids), _concrete(em.kv_segment_ids)
            if q_np is not None and kv_np is not None:
                may_be_empty = not all(_rows_nonempty(head_mask, t, s, bq, q_np[b], kv_np[b]) for b in range(batch))
        else:
            may_be_empty = not _static_rows_nonempty(head_mask, t, s, bq)
        return SplashPlan((multi,), qseg, kvseg, t, s, shape, bq, bk, may_be_empty)

    arrays = [layout.kv_num_blocks, layout.kv_indices, layout.full_kv_num_blocks, layout.full_kv_indices,
              em.q_segment_ids, em.kv_segment_ids, em.dense]
    if any(a is not None and _concrete(a) is None for a in arrays):
        raise ValueError("splash: this mask must be evaluated densely (a dense part or an index function without a "
                         "structure) and splash builds its block tables in numpy, but the mask's arrays are traced. "
                         "Build the BlockMask outside jax.jit (a static mask closed over, not a jit argument), use "
                         "structured masks (causal / local / chunked_causal, with document segment ids, which may "
                         "be traced), or pass impl='reference'.")
    lb, lh = layout.kv_num_blocks.shape[:2]
    varies_b = lb > 1 or em.q_segment_ids is not None or (em.dense is not None and em.dense.shape[0] > 1)
    varies_h = lh > 1 or (em.dense is not None and em.dense.shape[1] > 1) or em.index_fn is not None
    db, dh = (batch if varies_b else 1), (heads if varies_h else 1)
    with jax.ensure_compile_time_eval():
        dense = np.asarray(layout_to_dense(layout, em, db, dh))
    dense = np.pad(dense, ((0, 0), (0, 0), (0, tp - t), (0, sp - s)))
    masks = tuple(sm.MultiHeadMask([sm.NumpyMask(np.ascontiguousarray(dense[b, h if dh > 1 else 0]))
                                    for h in range(heads)]) for b in range(db))
    may_be_empty = not dense[:, :, :t, :s].any(axis=-1).all()
    return SplashPlan(masks, None, None, t, s, shape, bq, bk, bool(may_be_empty))


def applies(q, k, v, layout: SparseLayout, element_mask: ElementMask, *, score_mod=None, interpret=False
            ) -> tuple[bool, str]:
    """Whether splash runs these inputs, and if not why (the TPU-or-interpret check is the
    registry's, ``api.py``)."""
    try:
        check_inputs(q, k, v, layout, "splash")
    except ValueError as e:
        return False, str(e)
    if layout.block_kv % LANES:
        return False, f"splash needs block_kv a multiple of {LANES}, got {layout.block_kv}"
    if element_mask.q_segment_ids is not None and not _needs_dense(element_mask) and layout.block_q % LANES:
        return False, f"splash with segment ids needs block_q a multiple of {LANES}, got {layout.block_q}"
    if score_mod is not None and (describe(score_mod) or ("",))[0] != "soft_cap":
        return False, "splash supports no score_mod other than soft-capping (common.SoftCap)"
    if _needs_dense(element_mask):
        arrays = [layout.kv_indices, layout.full_kv_indices, element_mask.q_segment_ids, element_mask.dense]
        if any(a is not None and _concrete(a) is None for a in arrays):
            return False, ("splash needs a static (concrete) mask for dense or unstructured masks; this one is traced")
    return True, "ok"


def traced_mask(layout: SparseLayout, element_mask: ElementMask) -> bool:
    """Whether splash is ruled out only because a mask that needs dense evaluation is traced."""
    arrays = [layout.kv_indices, layout.full_kv_indices, element_mask.q_segment_ids, element_mask.dense]
    return _needs_dense(element_mask) and any(a is not None and _concrete(a) is None for a in arrays)


def _block_sizes(bq: int, bk: int) -> sk.BlockSizes:
    return sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                         block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)


def block_sparse_attention(q, k, v, layout: SparseLayout, element_mask: ElementMask, *, scale=None, score_mod=None,
                           return_lse=False, interpret=False):
    """(o [B, T, H, D], LSE [B, H, T] or None) through splash; see the module docstring."""
    ok, why = applies(q, k, v, layout, element_mask, score_mod=score_mod, interpret=interpret)
    if not ok:
        raise ValueError(f"splash block_sparse_attention: {why}")
    b, t, h, d = q.shape
    plan = to_splash(layout, element_mask, batch=b, heads=h)
    tp, sp = plan.padded
    scale = d ** -0.5 if scale is None else scale
    cap = None if score_mod is None else describe(score_mod)[1]
    make = functools.partial(sk.make_splash_mha_single_device, block_sizes=_block_sizes(plan.block_q, plan.block_kv),
                             attn_logits_soft_cap=cap, interpret=interpret)
    # [B, H, T_pad, D] queries pre-scaled (splash does not scale), [B, K, S_pad, D] keys / values.
    qh = jnp.pad((q * scale).astype(q.dtype), ((0, 0), (0, tp - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    kh = jnp.pad(k, ((0, 0), (0, sp - k.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    vh = jnp.pad(v, ((0, 0), (0, sp - v.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    seg = None if plan.q_segment_ids is None else (plan.q_segment_ids, plan.kv_segment_ids)

    def run(kernels, q_, k_, v_):
        def one(kern, qb, kb, vb, sb):
            return kern(qb, kb, vb, None if sb is None else sk.SegmentIds(*sb))
        if len(kernels) == 1:
            return jax.vmap(functools.partial(one, kernels[0]))(q_, k_, v_, seg)
        outs = [one(kern, q_[i], k_[i], v_[i], None if seg is None else (seg[0][i], seg[1][i]))
                for i, kern in enumerate(kernels)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

    plain = [make(m, save_residuals=False) for m in plan.masks]
    if not (return_lse or plan.may_have_empty_rows):
        o = run(plain, qh, kh, vh)
        return o.transpose(0, 2, 1, 3)[:, :t], None
    with_lse = [make(m, save_residuals=True) for m in plan.masks]

    @jax.custom_vjp
    def attend(q_, k_, v_):
        o, (lse,) = run(with_lse, q_, k_, v_)
        valid = lse > EMPTY_LSE
        return jnp.where(valid[..., None], o, 0).astype(o.dtype), jnp.where(valid, lse, -jnp.inf)

    def attend_fwd(q_, k_, v_):  # symbolic_zeros: the primals come wrapped
        q_, k_, v_ = q_.value, k_.value, v_.value
        o, lse = attend(q_, k_, v_)
        return (o, lse), (q_, k_, v_, lse)

    def attend_bwd(res, cts):
        q_, k_, v_, lse = res
        do, dlse = cts
        if not isinstance(dlse, jax.custom_derivatives.SymbolicZero):
            raise NotImplementedError("splash block_sparse_attention: no gradient through the returned LSE "
                                      "(splash's kernel does not differentiate it); use impl='pallas' or 'reference'")
        if isinstance(do, jax.custom_derivatives.SymbolicZero):
            return tuple(jnp.zeros_like(x) for x in (q_, k_, v_))
        do = jnp.where((lse > -jnp.inf)[..., None], do, 0).astype(do.dtype)
        _, vjp = jax.vjp(lambda a, b_, c: run(plain, a, b_, c), q_, k_, v_)
        return vjp(do)

    attend.defvjp(attend_fwd, attend_bwd, symbolic_zeros=True)
    o, lse = attend(qh, kh, vh)
    o = o.transpose(0, 2, 1, 3)[:, :t]
    return o, (lse[:, :, :t] if return_lse else None)
