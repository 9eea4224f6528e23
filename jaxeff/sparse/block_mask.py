"""``BlockMask`` and ``create_block_mask``: which (query block, key block) tiles attention computes,
in FlexAttention's layout (Dong et al., 2024, "Flex Attention: A Programming Model for Generating
Optimized Attention Kernels").

Rules:

* Blocks: ``block_q`` and ``block_kv`` are powers of two from 16 up to
  ``max(16, next_pow2(length))``; ``nQ = ceil(Q_LEN / block_q)`` query blocks and
  ``nKV = ceil(KV_LEN / block_kv)`` key blocks.
* Padding: elements past Q_LEN or KV_LEN (the tail of the last block) are masked, so a block that
  contains padding is never *full*; it is *partial* if some real element is allowed, else empty.
* Lists: for query block i, the first ``kv_num_blocks[b, h, i]`` entries of ``kv_indices[b, h, i]``
  are the partial key blocks, ascending; ``full_kv_*`` the same for full blocks; the two are
  disjoint and together hold exactly the non-empty blocks (one exception: a ``document`` row whose
  ids come back after another lists some empty blocks as partial, see
  :mod:`jaxeff.sparse.block_states`; the element mask still masks them). Entries past a count repeat the row's
  last active index (0 for an empty row). The ``q_*`` lists are the transpose (per key block, the
  query blocks that see it), for the dK/dV backward pass. The lists have a fixed length (the
  number of blocks), so a changed sparsity pattern under ``jax.jit`` does not recompile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from jaxeff.sparse.block_states import structural_states
from jaxeff.sparse.masks import BlockTable, MaskFn, as_mask_fn, evaluate
from pallas_kernels.block_sparse_attention.common import ElementMask, SparseLayout, block_states

MIN_BLOCK = 16
# Mask elements evaluated per lax.map step in create_block_mask (bounds the memory at long lengths).
CLASSIFY_BUDGET = 1 << 24


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def check_block_size(name: str, block: int, length: int) -> int:
    """Raises ``ValueError`` unless ``block`` is a power of two in [16, max(16, next_pow2(length))]."""
    top = max(MIN_BLOCK, next_pow2(length))
    if isinstance(block, bool) or not isinstance(block, int) or block < MIN_BLOCK or block & (block - 1) or block > top:
        raise ValueError(f"{name} must be a power of two between {MIN_BLOCK} and {top} (the padded length "
                         f"{length} rounded up to a power of two), got {block!r}")
    return block


def _positive(name: str, x, allow_none: bool = False):
    if x is None and allow_none:
        return None
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise ValueError(f"{name} must be a positive integer" + (" or None" if allow_none else "") + f", got {x!r}")
    return x


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockMask:
    """A block-sparse attention mask: the block lists (see the module docstring) plus the mask
    function that defines the elements inside partial blocks. A pytree: the lists and the arrays
    the mask function holds are leaves, block sizes and lengths static."""

    kv_num_blocks: jax.Array  # [B, H, nQ] int32, partial blocks
    kv_indices: jax.Array  # [B, H, nQ, nKV]
    full_kv_num_blocks: jax.Array  # [B, H, nQ]
    full_kv_indices: jax.Array  # [B, H, nQ, nKV]
    q_num_blocks: jax.Array  # [B, H, nKV]
    q_indices: jax.Array  # [B, H, nKV, nQ]
    full_q_num_blocks: jax.Array  # [B, H, nKV]
    full_q_indices: jax.Array  # [B, H, nKV, nQ]
    mask_fn: MaskFn
    block_size: tuple[int, int] = dataclasses.field(metadata=dict(static=True), default=(128, 128))
    seq_lengths: tuple[int, int] = dataclasses.field(metadata=dict(static=True), default=(0, 0))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, Q_LEN, KV_LEN) of the mask, B and H being 1 where broadcast."""
        return (*self.kv_num_blocks.shape[:2], *self.seq_lengths)

    @property
    def num_blocks(self) -> tuple[int, int]:
        return self.kv_num_blocks.shape[-1], self.q_num_blocks.shape[-1]

    def layout(self) -> SparseLayout:
        """The kernel-side block lists (``common.SparseLayout``)."""
        return SparseLayout(self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks, self.full_kv_indices,
                            self.q_num_blocks, self.q_indices, self.full_q_num_blocks, self.full_q_indices,
                            block_q=self.block_size[0], block_kv=self.block_size[1],
                            q_len=self.seq_lengths[0], kv_len=self.seq_lengths[1])

    def element_mask(self, batch: int | None = None, heads: int | None = None) -> ElementMask:
        """How kernels evaluate partial blocks (``common.ElementMask``), for inputs with ``batch``
        rows and ``heads`` query heads (default: the mask's own, possibly broadcast, sizes)."""
        b, h, q, k = self.shape
        return self.mask_fn.element_mask(batch or b, heads or h, q, k, unknown_dims=(b, h),
                                         aligned_blocks=self.block_size)

    def to_dense(self) -> jax.Array:
        """The element mask [B, H, Q_LEN, KV_LEN] (bool) evaluated from ``mask_fn`` directly (not
        from the lists: this is the oracle the lists are tested against)."""
        return evaluate(self.mask_fn, *self.shape)

    def block_states(self) -> jax.Array:
        """[B, H, nQ, nKV] int8: 0 empty (skipped), 1 partial, 2 full."""
        return block_states(self.layout())

    def block_density(self) -> jax.Array:
        """The fraction of blocks that are computed: (partial + full) / (B * H * nQ * nKV), over
        the mask's own (possibly broadcast) B and H; 1.0 for a dense mask."""
        computed = self.kv_num_blocks.sum() + self.full_kv_num_blocks.sum()
        return computed / (self.kv_indices.size)

    def plot(self, path, b: int = 0, h: int = 0, *, title: str | None = None):
        """Draws the block pattern of (b, h) (full / partial / empty) to a PNG at ``path``
        (needs matplotlib: ``pip install 'jaxeff[plot]'``). Returns ``path``."""
        from jaxeff.sparse.picture import save_block_picture
        return save_block_picture(self, path, b=b, h=h, title=title)

    save_picture = plot


def _list_from_flags(flags: jax.Array) -> tuple[jax.Array, jax.Array]:
    """flags [..., n] bool -> (counts [...], indices [..., n]): active indices ascending, then the
    last active index repeated (0 when none)."""
    n = flags.shape[-1]
    pos = jnp.arange(n, dtype=jnp.int32)
    counts = flags.sum(-1).astype(jnp.int32)
    idx = jnp.sort(jnp.where(flags, pos, n), axis=-1).astype(jnp.int32)
    last = jnp.take_along_axis(idx, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    last = jnp.where(counts[..., None] > 0, last, 0)
    return counts, jnp.where(pos < counts[..., None], idx, last)


def _classify(mask_fn: MaskFn, batch: int, heads: int, q_len: int, kv_len: int, bq: int, bk: int) -> jax.Array:
    """[batch, heads, nQ, nKV] int8 block states, one query block row of one (b, h) at a time:
    each step sees [bq, nKV * bk] elements and reduces them per block, so memory is bounded by
    CLASSIFY_BUDGET elements whatever B, H and the lengths."""
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    kv = jnp.arange(nk * bk, dtype=jnp.int32)

    def row(item):
        b, h, i = item // (heads * nq), (item // nq) % heads, item % nq
        q = i * bq + jnp.arange(bq, dtype=jnp.int32)
        ok = mask_fn(b, h, q[:, None], kv[None, :])
        ok = jnp.broadcast_to(ok, (bq, nk * bk)) & (q[:, None] < q_len) & (kv[None, :] < kv_len)
        ok = ok.reshape(bq, nk, bk)
        return ok.any(axis=(0, 2)).astype(jnp.int8) + ok.all(axis=(0, 2)).astype(jnp.int8)

    items = batch * heads * nq
    per_step = max(1, CLASSIFY_BUDGET // (bq * nk * bk))
    states = jax.lax.map(row, jnp.arange(items, dtype=jnp.int32), batch_size=min(per_step, items))
    return states.reshape(batch, heads, nq, nk)


def _table_states(table: BlockTable, batch: int, heads: int, q_len: int, kv_len: int, bq: int, bk: int):
    """Block states of a block table at its own block size: full where the table says so, but
    partial where a block holds padding (past Q_LEN or KV_LEN)."""
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    on = jnp.broadcast_to(table.table, (batch, heads, nq, nk))
    padded = (jnp.arange(nq) == nq - 1)[:, None] & (q_len % bq != 0) | (jnp.arange(nk) == nk - 1)[None, :] & (
        kv_len % bk != 0)
    return jnp.where(on, jnp.where(padded, 1, 2), 0).astype(jnp.int8)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _build(mask_fn, batch, heads, q_len, kv_len, bq, bk):
    if isinstance(mask_fn, BlockTable) and (mask_fn.block_q, mask_fn.block_kv) == (bq, bk):
        states = _table_states(mask_fn, batch, heads, q_len, kv_len, bq, bk)
    else:  # bands and documents from their structure (block_states); anything else per element
        states = structural_states(mask_fn, batch, heads, q_len, kv_len, bq, bk)
        states = _classify(mask_fn, batch, heads, q_len, kv_len, bq, bk) if states is None else states
    partial, full = states == 1, states == 2
    kvn, kvi = _list_from_flags(partial)
    fkvn, fkvi = _list_from_flags(full)
    qn, qi = _list_from_flags(partial.swapaxes(-1, -2))
    fqn, fqi = _list_from_flags(full.swapaxes(-1, -2))
    return kvn, kvi, fkvn, fkvi, qn, qi, fqn, fqi


def create_block_mask(mask_fn: Callable, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int, *,
                      block_q: int = 128, block_kv: int = 128) -> BlockMask:
    """Evaluates ``mask_fn(b, h, q_idx, kv_idx)`` block by block and lists the partial and full
    blocks. ``B`` / ``H`` = None: one mask shared by every batch row / head (a size-1 axis).
    Works eagerly on concrete masks (the result is plain arrays: compute once, reuse) and inside
    ``jax.jit`` on traced arrays (e.g. traced segment ids); only array values, never shapes,
    depend on the pattern, so a new pattern does not recompile."""
    mask_fn = as_mask_fn(mask_fn)
    B = _positive("create_block_mask: B", B, allow_none=True)
    H = _positive("create_block_mask: H", H, allow_none=True)
    Q_LEN = _positive("create_block_mask: Q_LEN", Q_LEN)
    KV_LEN = _positive("create_block_mask: KV_LEN", KV_LEN)
    check_block_size("create_block_mask: block_q", block_q, Q_LEN)
    check_block_size("create_block_mask: block_kv", block_kv, KV_LEN)
    mask_fn.check(B, H, Q_LEN, KV_LEN)
    lists = _build(mask_fn, B or 1, H or 1, Q_LEN, KV_LEN, block_q, block_kv)
    return BlockMask(*lists, mask_fn=mask_fn, block_size=(block_q, block_kv), seq_lengths=(Q_LEN, KV_LEN))
