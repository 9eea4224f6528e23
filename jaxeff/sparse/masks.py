"""Mask functions with FlexAttention's signature ``mask_fn(b, h, q_idx, kv_idx) -> bool``.

``b`` and ``h`` are the batch and (query) head index, ``q_idx`` and ``kv_idx`` token indices;
all four are int32 scalars or arrays that broadcast against each other, and the result is a
boolean array of the broadcast shape (True: the query may attend to the key). ``q_idx`` counts
from 0 at the first row of the query array and ``kv_idx`` from 0 at the first key: to decode a
chunk against a longer cache, offset inside the mask (``causal(offset=cache_len)``).

Every constructor returns a :class:`MaskFn`, a small frozen dataclass registered as a pytree whose
leaves are the arrays it closes over (segment ids, prefix lengths, dense masks) and whose
structure and parameters are static. A :class:`BlockMask` holding one therefore crosses
``jax.jit`` with traced segment ids, and the mask can describe itself to kernels
(:meth:`MaskFn.element_mask`): index-only masks (pure arithmetic on indices) become the kernel's
``index_fn``, ``document`` becomes segment ids, ``and_masks`` the AND of its parts' descriptions,
and anything else a dense boolean array evaluated from the mask. A plain Python callable is
dense unless marked index-only with :func:`index_mask`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention.common import ElementMask

# A mask axis size for "depends on it, size unknown" (custom callables): materialise at the
# BlockMask's size.
UNKNOWN = -1


def _static(**kw):
    return dataclasses.field(metadata=dict(static=True), **kw)


def _pick(x: jax.Array, i, axis_size: int):
    """``x[i]`` along a leading axis that is 1 (broadcast) or the full size."""
    return x[0 if axis_size == 1 else i]


def _clip(idx, n: int):
    return jnp.clip(jnp.asarray(idx, jnp.int32), 0, n - 1)


class MaskFn:
    """Base of the mask functions: ``fn(b, h, q_idx, kv_idx) -> bool array``.

    Subclasses set ``index_only`` (pure index arithmetic, safe to evaluate on index tiles in a
    kernel), may set ``structure`` (``common.describe``), and say which axes they vary along
    (:meth:`dims`)."""

    index_only: bool = False
    structure: tuple | None = None

    def __call__(self, b, h, q_idx, kv_idx) -> jax.Array:
        raise NotImplementedError

    def dims(self) -> tuple[int, int]:
        """(batch, heads) sizes this mask varies along: 1 = independent, ``UNKNOWN`` = unknown."""
        return (1, 1)

    def check(self, batch: int | None, heads: int | None, q_len: int, kv_len: int) -> None:
        """Raises ``ValueError`` when the arrays it holds do not fit these sizes."""

    def and_parts(self) -> tuple[MaskFn, ...]:
        return (self,)

    def element_mask(self, batch: int, heads: int, q_len: int, kv_len: int,
                     unknown_dims: tuple[int, int] | None = None,
                     aligned_blocks: tuple[int, int] | None = None) -> ElementMask:
        """The kernel-side description (``common.ElementMask``) for inputs of this batch size,
        number of heads and lengths. Dense parts are materialised over the axes they vary along;
        along an axis of unknown dependence (custom callables) at ``unknown_dims`` (the sizes the
        block lists were built with; default ``(batch, heads)``). ``aligned_blocks``: the block
        size of the lists, which block tables of that size need not be evaluated for."""
        ub, uh = unknown_dims or (batch, heads)
        parts = self.and_parts()
        index_parts = tuple(p for p in parts if p.index_only)
        docs = [p for p in parts if isinstance(p, Document)]
        doc = docs[0] if docs else None
        # a block table aligned with the lists decides whole blocks: nothing to evaluate inside
        rest = tuple(p for p in parts if not p.index_only and p is not doc
                     and not (isinstance(p, BlockTable) and aligned_blocks == (p.block_q, p.block_kv)))
        index_fn = None
        if index_parts:
            index_fn = index_parts[0] if len(index_parts) == 1 else And(index_parts)
        q_seg = kv_seg = None
        if doc is not None:
            q_seg = jnp.broadcast_to(doc.q_segment_ids, (batch, q_len)).astype(jnp.int32)
            kv_seg = jnp.broadcast_to(doc.kv_segments, (batch, kv_len)).astype(jnp.int32)
        dense = None
        if rest:
            part = rest[0] if len(rest) == 1 else And(rest)
            db, dh = part.dims()
            # A static mask stays static under jit (splash needs it concrete): evaluate it eagerly.
            static = not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(part))
            with jax.ensure_compile_time_eval() if static else contextlib.nullcontext():
                dense = evaluate(part, ub if db == UNKNOWN else db, uh if dh == UNKNOWN else dh, q_len, kv_len)
        return ElementMask(q_segment_ids=q_seg, kv_segment_ids=kv_seg, dense=dense, index_fn=index_fn)

    def __and__(self, other) -> MaskFn:
        return and_masks(self, other)

    def __or__(self, other) -> MaskFn:
        return or_masks(self, other)

    def __invert__(self) -> MaskFn:
        return not_mask(self)


def _mask_dataclass(cls):
    return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


# --- Index-only masks ------------------------------------------------------------------------------

@_mask_dataclass
class Causal(MaskFn):
    offset: int = _static(default=0)
    index_only = True

    @property
    def structure(self):
        return ("causal", self.offset)

    def __call__(self, b, h, q_idx, kv_idx):
        return jnp.asarray(kv_idx) <= jnp.asarray(q_idx) + self.offset


@_mask_dataclass
class Local(MaskFn):
    window_left: int | None = _static(default=None)
    window_right: int | None = _static(default=None)
    offset: int = _static(default=0)
    index_only = True

    @property
    def structure(self):
        return ("local", self.window_left, self.window_right, self.offset)

    def __call__(self, b, h, q_idx, kv_idx):
        q = jnp.asarray(q_idx) + self.offset
        kv = jnp.asarray(kv_idx)
        ok = jnp.ones(jnp.broadcast_shapes(q.shape, kv.shape), bool)
        if self.window_left is not None:
            ok = ok & (q - self.window_left <= kv)
        if self.window_right is not None:
            ok = ok & (kv <= q + self.window_right)
        return ok


@_mask_dataclass
class ChunkedCausal(MaskFn):
    chunk: int = _static(default=1)
    index_only = True

    @property
    def structure(self):
        return ("chunked_causal", self.chunk)

    def __call__(self, b, h, q_idx, kv_idx):
        q, kv = jnp.asarray(q_idx), jnp.asarray(kv_idx)
        return (q // self.chunk == kv // self.chunk) & (kv <= q)


@_mask_dataclass
class IndexMask(MaskFn):
    """A user callable marked index-only: kernels evaluate it on index tiles."""
    fn: Callable = _static(default=None)
    index_only = True

    def dims(self):
        return (UNKNOWN, UNKNOWN)

    def __call__(self, b, h, q_idx, kv_idx):
        return jnp.asarray(self.fn(b, h, q_idx, kv_idx), bool)


# --- Masks over arrays ----------------------------------------------------------------------------

@_mask_dataclass
class Document(MaskFn):
    """Queries attend to keys of their own segment (packed documents)."""
    q_segment_ids: jax.Array = None  # [Bs, T]
    kv_segment_ids: jax.Array | None = None  # [Bs, S], None: the same as q's

    @property
    def kv_segments(self) -> jax.Array:
        return self.q_segment_ids if self.kv_segment_ids is None else self.kv_segment_ids

    def dims(self):
        return (max(self.q_segment_ids.shape[0], self.kv_segments.shape[0]), 1)

    def check(self, batch, heads, q_len, kv_len):
        q, kv = self.q_segment_ids, self.kv_segments
        if q.shape[1] != q_len or kv.shape[1] != kv_len:
            which = "document(segment_ids)" if self.kv_segment_ids is None else "document(q_segment_ids, kv_segment_ids)"
            raise ValueError(f"{which}: segment ids have lengths ({q.shape[1]}, {kv.shape[1]}), the block mask "
                             f"has (Q_LEN={q_len}, KV_LEN={kv_len})"
                             + ("; for Q_LEN != KV_LEN pass kv_segment_ids too" if self.kv_segment_ids is None else ""))
        _check_batch("document segment ids", max(q.shape[0], kv.shape[0]), batch)
        if q.shape[0] != kv.shape[0] and 1 not in (q.shape[0], kv.shape[0]):
            raise ValueError(f"document: q and kv segment ids have batch sizes {q.shape[0]} and {kv.shape[0]}")

    def __call__(self, b, h, q_idx, kv_idx):
        q, kv = self.q_segment_ids, self.kv_segments
        qs = q[0 if q.shape[0] == 1 else b, _clip(q_idx, q.shape[1])]
        ks = kv[0 if kv.shape[0] == 1 else b, _clip(kv_idx, kv.shape[1])]
        return qs == ks


@_mask_dataclass
class PrefixLM(MaskFn):
    """Bidirectional over the first ``prefix_len[b]`` keys, causal after."""
    prefix_len: jax.Array = None  # [Bs]

    def dims(self):
        return (self.prefix_len.shape[0], 1)

    def check(self, batch, heads, q_len, kv_len):
        _check_batch("prefix_lm(prefix_len)", self.prefix_len.shape[0], batch)

    def __call__(self, b, h, q_idx, kv_idx):
        p = self.prefix_len[0 if self.prefix_len.shape[0] == 1 else b]
        kv = jnp.asarray(kv_idx)
        return (kv < p) | (kv <= jnp.asarray(q_idx))


@_mask_dataclass
class FromDense(MaskFn):
    mask: jax.Array = None  # [Bd, Hd, Q, K] bool

    def dims(self):
        return self.mask.shape[:2]

    def check(self, batch, heads, q_len, kv_len):
        bd, hd, q, k = self.mask.shape
        if (q, k) != (q_len, kv_len):
            raise ValueError(f"from_dense(mask): mask has lengths ({q}, {k}), the block mask has "
                             f"(Q_LEN={q_len}, KV_LEN={kv_len})")
        _check_batch("from_dense(mask)", bd, batch)
        if hd != 1 and hd != heads:
            raise ValueError(f"from_dense(mask): mask has {hd} heads but H={heads}"
                             + (" (pass H to create_block_mask)" if heads is None else ""))

    def __call__(self, b, h, q_idx, kv_idx):
        bd, hd, q, k = self.mask.shape
        bi = 0 if bd == 1 else b
        hi = 0 if hd == 1 else h
        return self.mask[bi, hi, _clip(q_idx, q), _clip(kv_idx, k)]


@_mask_dataclass
class BlockTable(MaskFn):
    """A mask given per block: element (q, kv) is allowed iff ``table[b, h, q // block_q,
    kv // block_kv]``. Built with the same block sizes, a BlockMask of it has only full and empty
    blocks (partial ones only where the lengths are not block multiples, masked by length), so
    kernels never need its elements: what block-selection methods return."""
    table: jax.Array = None  # [Bt, Ht, nQ, nK] bool
    block_q: int = _static(default=128)
    block_kv: int = _static(default=128)

    def dims(self):
        return self.table.shape[:2]

    def check(self, batch, heads, q_len, kv_len):
        bt, ht, nq, nk = self.table.shape
        want = (-(-q_len // self.block_q), -(-kv_len // self.block_kv))
        if (nq, nk) != want:
            raise ValueError(f"from_blocks(table): table has {nq} x {nk} blocks, lengths (Q_LEN={q_len}, "
                             f"KV_LEN={kv_len}) in blocks of ({self.block_q}, {self.block_kv}) need {want[0]} x {want[1]}")
        _check_batch("from_blocks(table)", bt, batch)
        if ht != 1 and ht != heads:
            raise ValueError(f"from_blocks(table): table has {ht} heads but H={heads}"
                             + (" (pass H to create_block_mask)" if heads is None else ""))

    def __call__(self, b, h, q_idx, kv_idx):
        bt, ht, nq, nk = self.table.shape
        return self.table[0 if bt == 1 else b, 0 if ht == 1 else h,
                          _clip(jnp.asarray(q_idx) // self.block_q, nq), _clip(jnp.asarray(kv_idx) // self.block_kv, nk)]


@_mask_dataclass
class Custom(MaskFn):
    """A plain Python callable: evaluated densely for kernels."""
    fn: Callable = _static(default=None)

    def dims(self):
        return (UNKNOWN, UNKNOWN)

    def __call__(self, b, h, q_idx, kv_idx):
        return jnp.asarray(self.fn(b, h, q_idx, kv_idx), bool)


def _check_batch(what: str, size: int, batch: int | None) -> None:
    if size != 1 and size != batch:
        raise ValueError(f"{what}: batch size {size} but B={batch}"
                         + (" (pass B to create_block_mask: the mask depends on the batch)" if batch is None else ""))


# --- Combinators ----------------------------------------------------------------------------------

def _combine_dims(parts) -> tuple[int, int]:
    out = [1, 1]
    for p in parts:
        for i, d in enumerate(p.dims()):
            if d == UNKNOWN or out[i] == UNKNOWN:
                out[i] = UNKNOWN
            else:
                out[i] = max(out[i], d)
    return out[0], out[1]


@_mask_dataclass
class And(MaskFn):
    parts: tuple = ()

    @property
    def index_only(self):
        return all(p.index_only for p in self.parts)

    @property
    def structure(self):
        ds = [p.structure for p in self.parts]
        return None if any(d is None for d in ds) else ("and", *ds)

    def dims(self):
        return _combine_dims(self.parts)

    def check(self, *args):
        for p in self.parts:
            p.check(*args)

    def and_parts(self):
        return tuple(q for p in self.parts for q in p.and_parts())

    def __call__(self, b, h, q_idx, kv_idx):
        out = self.parts[0](b, h, q_idx, kv_idx)
        for p in self.parts[1:]:
            out = out & p(b, h, q_idx, kv_idx)
        return out


@_mask_dataclass
class Or(MaskFn):
    parts: tuple = ()

    @property
    def index_only(self):
        return all(p.index_only for p in self.parts)

    @property
    def structure(self):
        ds = [p.structure for p in self.parts]
        return None if any(d is None for d in ds) else ("or", *ds)

    def dims(self):
        return _combine_dims(self.parts)

    def check(self, *args):
        for p in self.parts:
            p.check(*args)

    def __call__(self, b, h, q_idx, kv_idx):
        out = self.parts[0](b, h, q_idx, kv_idx)
        for p in self.parts[1:]:
            out = out | p(b, h, q_idx, kv_idx)
        return out


@_mask_dataclass
class Not(MaskFn):
    part: MaskFn = None

    @property
    def index_only(self):
        return self.part.index_only

    @property
    def structure(self):
        d = self.part.structure
        return None if d is None else ("not", d)

    def dims(self):
        return self.part.dims()

    def check(self, *args):
        self.part.check(*args)

    def __call__(self, b, h, q_idx, kv_idx):
        return ~self.part(b, h, q_idx, kv_idx)


# --- Public constructors --------------------------------------------------------------------------

def _int(name: str, x, *, minimum: int, allow_none: bool = False):
    if x is None and allow_none:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}" + (" or None" if allow_none else "") + f", got {x!r}")
    return int(x)


def causal(offset: int = 0) -> MaskFn:
    """kv_idx <= q_idx + offset (``offset``: how many keys precede query 0, e.g. a cache length)."""
    return Causal(_int("causal: offset", offset, minimum=-(2 ** 31)))


def local(window_left: int | None, window_right: int | None = 0, *, offset: int = 0) -> MaskFn:
    """Sliding window: q - window_left <= kv <= q + window_right (q shifted by ``offset``);
    ``local(w, 0)`` is causal sliding attention over the w previous keys and the diagonal;
    ``None`` leaves that side unbounded."""
    return Local(_int("local: window_left", window_left, minimum=0, allow_none=True),
                 _int("local: window_right", window_right, minimum=0, allow_none=True),
                 _int("local: offset", offset, minimum=-(2 ** 31)))


def chunked_causal(chunk: int) -> MaskFn:
    """Causal inside consecutive chunks of ``chunk`` tokens (Llama 4's chunked attention)."""
    return ChunkedCausal(_int("chunked_causal: chunk", chunk, minimum=1))


def _int_array(name: str, x, ndim: int) -> jax.Array:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = np.asarray(x)
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got {x.dtype}")
    return jnp.asarray(x, jnp.int32)


def document(segment_ids_BxT, kv_segment_ids_BxS=None) -> MaskFn:
    """A query attends to keys of its own document: segment_ids[b, q] == kv_segment_ids[b, kv]
    (``kv_segment_ids`` defaults to ``segment_ids``; pass it when Q_LEN != KV_LEN)."""
    q = _int_array("document: segment_ids", segment_ids_BxT, 2)
    kv = None if kv_segment_ids_BxS is None else _int_array("document: kv_segment_ids", kv_segment_ids_BxS, 2)
    return Document(q, kv)


def prefix_lm(prefix_len_B) -> MaskFn:
    """kv < prefix_len[b] (bidirectional prefix) or kv <= q (causal after it)."""
    return PrefixLM(_int_array("prefix_lm: prefix_len", prefix_len_B, 1))


def from_dense(mask) -> MaskFn:
    """A boolean mask [Q, K], [H, Q, K] or [B, H, Q, K] (size-1 axes broadcast)."""
    if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
        mask = np.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise ValueError(f"from_dense: mask must be a boolean array, got {mask.dtype}")
    if mask.ndim not in (2, 3, 4):
        raise ValueError(f"from_dense: mask must be [Q, K], [H, Q, K] or [B, H, Q, K], got shape {tuple(mask.shape)}")
    mask = jnp.asarray(mask)
    return FromDense(mask.reshape((1,) * (4 - mask.ndim) + mask.shape))


def from_blocks(table, block_q: int = 128, block_kv: int | None = None) -> MaskFn:
    """A mask given per block: a boolean table [nQ, nK], [H, nQ, nK] or [B, H, nQ, nK] over blocks
    of ``block_q`` x ``block_kv`` (default: square) tokens. ``create_block_mask`` with the same
    block sizes lists exactly the table's blocks, without evaluating elements."""
    if not hasattr(table, "shape") or not hasattr(table, "dtype"):
        table = np.asarray(table)
    if table.dtype != jnp.bool_:
        raise ValueError(f"from_blocks: table must be a boolean array, got {table.dtype}")
    if table.ndim not in (2, 3, 4):
        raise ValueError(f"from_blocks: table must be [nQ, nK], [H, nQ, nK] or [B, H, nQ, nK], got shape "
                         f"{tuple(table.shape)}")
    block_q = _int("from_blocks: block_q", block_q, minimum=1)
    block_kv = block_q if block_kv is None else _int("from_blocks: block_kv", block_kv, minimum=1)
    table = jnp.asarray(table)
    return BlockTable(table.reshape((1,) * (4 - table.ndim) + table.shape), block_q, block_kv)


def index_mask(fn: Callable) -> MaskFn:
    """Marks a callable ``fn(b, h, q_idx, kv_idx)`` as index-only: arithmetic and comparisons on
    its arguments, no arrays closed over, so kernels may evaluate it on index tiles."""
    if isinstance(fn, MaskFn):
        if not fn.index_only:
            raise ValueError(f"index_mask: {type(fn).__name__} is not index-only")
        return fn
    if not callable(fn):
        raise ValueError(f"index_mask: expected a callable, got {type(fn).__name__}")
    return IndexMask(fn)


def as_mask_fn(fn: Any, name: str = "mask_fn") -> MaskFn:
    """Ours as they are; other callables as dense custom masks."""
    if isinstance(fn, MaskFn):
        return fn
    if not callable(fn):
        raise ValueError(f"{name} must be callable as fn(b, h, q_idx, kv_idx), got {type(fn).__name__}")
    return Custom(fn)


def and_masks(*fns) -> MaskFn:
    """Allowed where every mask allows."""
    if not fns:
        raise ValueError("and_masks: needs at least one mask function")
    parts = tuple(as_mask_fn(f, "and_masks argument") for f in fns)
    return parts[0] if len(parts) == 1 else And(parts)


def or_masks(*fns) -> MaskFn:
    """Allowed where any mask allows."""
    if not fns:
        raise ValueError("or_masks: needs at least one mask function")
    parts = tuple(as_mask_fn(f, "or_masks argument") for f in fns)
    return parts[0] if len(parts) == 1 else Or(parts)


def not_mask(fn) -> MaskFn:
    """Allowed where ``fn`` forbids."""
    return Not(as_mask_fn(fn, "not_mask argument"))


# --- Evaluation -----------------------------------------------------------------------------------

ROW_BUDGET = 1 << 22  # mask elements evaluated per step when evaluating block-row by block-row


def evaluate(fn: MaskFn, batch: int, heads: int, q_len: int, kv_len: int, *, rows: int = 128) -> jax.Array:
    """The element mask [batch, heads, q_len, kv_len] of ``fn``, evaluated ``rows`` query rows at
    a time (``lax.map``) so the intermediates stay bounded at long lengths."""
    rows = max(1, min(rows, q_len))
    n = -(-q_len // rows)
    kv = jnp.arange(kv_len, dtype=jnp.int32)

    def block(i):
        q = i * rows + jnp.arange(rows, dtype=jnp.int32)
        b = jnp.arange(batch, dtype=jnp.int32)[:, None, None, None]
        h = jnp.arange(heads, dtype=jnp.int32)[None, :, None, None]
        out = fn(b, h, q[None, None, :, None], kv[None, None, None, :])
        return jnp.broadcast_to(out, (batch, heads, rows, kv_len))

    per_step = max(1, ROW_BUDGET // max(1, batch * heads * rows * kv_len))
    out = jax.lax.map(block, jnp.arange(n, dtype=jnp.int32), batch_size=min(per_step, n))
    out = jnp.moveaxis(out, 0, 2).reshape(batch, heads, n * rows, kv_len)
    return out[:, :, :q_len]
