"""What every block-sparse attention implementation receives: the kernel-side description of a
block mask, independent of how it was built (``jaxeff.sparse.BlockMask`` converts to it).

Two pieces:

* :class:`SparseLayout`: which (query block, key block) pairs are computed. Block lists in the
  FlexAttention / splash style: for query block i of (batch b, head h), the first
  ``kv_num_blocks[b, h, i]`` entries of ``kv_indices[b, h, i]`` are the *partial* key blocks
  (some elements masked), ascending; the first ``full_kv_num_blocks[b, h, i]`` entries of
  ``full_kv_indices[b, h, i]`` are the *full* key blocks (every element allowed), ascending.
  Partial and full lists are disjoint; blocks in neither are skipped. The ``q_*`` lists are the
  transpose (for key block j, the query blocks that see it), used by the dK/dV backward pass.
  Entries past a count repeat the row's last active index (0 for an empty row), so a pipeline
  that prefetches one entry too far reads a valid block. The batch and head axes of every list
  have size 1 (broadcast) or B / H.
* :class:`ElementMask`: how to evaluate the element mask *inside a partial block*: the AND of an
  index function (pure arithmetic on indices: causal, sliding window, chunks), document
  membership (query and key segment ids equal), and a dense boolean array; any of the three may
  be absent. Keys at index >= ``kv_len`` (padding up to a whole block) are always masked.

Shapes: q ``[B, T, H, D]``, k and v ``[B, S, K, D]`` with H % K == 0 (GQA), T and S padded
internally to whole blocks. Outputs: o ``[B, T, H, D]`` (q's dtype), and the log-sum-exp
``[B, H, T]`` in float32 (natural log; ``-inf`` for a query row with no allowed key, whose output
is 0).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

# index_fn(b, h, q_idx, kv_idx) -> bool array. b and h are int32 scalars, q_idx and kv_idx int32
# arrays that broadcast against each other (absolute token indices). Only arithmetic and
# comparisons on its arguments: kernels evaluate it on a tile of indices in registers.
IndexFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
# score_mod(score, b, h, q_idx, kv_idx) -> score, elementwise on float32 scores (after scaling).
ScoreMod = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def describe(fn) -> tuple | None:
    """The kernel-neutral description an index function or score_mod may carry (its ``structure``
    attribute), for backends with native masks (splash) or special cases:

    ``("full",)``; ``("causal", offset)``: kv <= q + offset; ``("local", left, right, offset)``:
    q + offset - left <= kv <= q + offset + right (``None``: that side unbounded);
    ``("chunked_causal", chunk)``: same chunk of ``chunk`` tokens and kv <= q;
    ``("and", d1, d2, ...)``, ``("or", d1, ...)``, ``("not", d)``; ``("soft_cap", cap)`` for a
    score_mod. ``None``: opaque, evaluate the function itself. The description never replaces the
    function: ``fn`` stays the definition, the tuple a hint that must agree with it.
    """
    return getattr(fn, "structure", None)


@dataclasses.dataclass(frozen=True)
class SoftCap:
    """score_mod ``cap * tanh(score / cap)`` (Gemma 2's attention logit soft-capping); kernels may
    recognise it by type or by ``describe`` (splash maps it onto ``attn_logits_soft_cap``)."""
    cap: float

    def __post_init__(self):
        if not self.cap > 0:
            raise ValueError(f"soft_cap: cap must be positive, got {self.cap}")

    @property
    def structure(self) -> tuple:
        return ("soft_cap", float(self.cap))

    def __call__(self, score, b, h, q_idx, kv_idx):
        del b, h, q_idx, kv_idx
        return self.cap * jnp.tanh(score / self.cap)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SparseLayout:
    kv_num_blocks: jax.Array  # [Bm, Hm, nQ] int32
    kv_indices: jax.Array  # [Bm, Hm, nQ, nKV] int32
    full_kv_num_blocks: jax.Array  # [Bm, Hm, nQ]
    full_kv_indices: jax.Array  # [Bm, Hm, nQ, nKV]
    q_num_blocks: jax.Array  # [Bm, Hm, nKV]
    q_indices: jax.Array  # [Bm, Hm, nKV, nQ]
    full_q_num_blocks: jax.Array  # [Bm, Hm, nKV]
    full_q_indices: jax.Array  # [Bm, Hm, nKV, nQ]
    block_q: int = dataclasses.field(metadata=dict(static=True), default=128)
    block_kv: int = dataclasses.field(metadata=dict(static=True), default=128)
    q_len: int = dataclasses.field(metadata=dict(static=True), default=0)
    kv_len: int = dataclasses.field(metadata=dict(static=True), default=0)

    @property
    def n_q_blocks(self) -> int:
        return self.kv_num_blocks.shape[-1]

    @property
    def n_kv_blocks(self) -> int:
        return self.q_num_blocks.shape[-1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ElementMask:
    q_segment_ids: jax.Array | None = None  # [B, q_len] int32: a query sees keys of its own segment
    kv_segment_ids: jax.Array | None = None  # [B, kv_len] int32
    dense: jax.Array | None = None  # [Bm, Hm, q_len, kv_len] bool
    index_fn: IndexFn | None = dataclasses.field(metadata=dict(static=True), default=None)

    def __post_init__(self):
        if (self.q_segment_ids is None) != (self.kv_segment_ids is None):
            raise ValueError("ElementMask: q_segment_ids and kv_segment_ids go together")

    def evaluate(self, b, h, q_idx, kv_idx, kv_len: int) -> jax.Array:
        """The element mask at absolute indices (jnp; kernels may specialise this). ``b``/``h``
        are scalars or arrays broadcasting with the indices; indices past the real lengths
        evaluate to False."""
        allowed = kv_idx < kv_len
        if self.index_fn is not None:
            allowed = allowed & self.index_fn(b, h, q_idx, kv_idx)
        if self.q_segment_ids is not None:
            t, s = self.q_segment_ids.shape[1], self.kv_segment_ids.shape[1]
            qs = self.q_segment_ids[b, jnp.clip(q_idx, 0, t - 1)]
            ks = self.kv_segment_ids[b, jnp.clip(kv_idx, 0, s - 1)]
            allowed = allowed & (qs == ks)
        if self.dense is not None:
            bm, hm, t, s = self.dense.shape
            bi = b if bm > 1 else 0
            hi = h if hm > 1 else 0
            allowed = allowed & (q_idx < t) & self.dense[bi, hi, jnp.clip(q_idx, 0, t - 1), jnp.clip(kv_idx, 0, s - 1)]
        return allowed


def block_states(layout: SparseLayout) -> jax.Array:
    """[Bm, Hm, nQ, nKV] int8: 0 for a skipped block, 1 partial, 2 full (splash's block_mask
    convention), read back from the lists."""
    nk = layout.n_kv_blocks

    def listed(num, idx):
        pos = jnp.arange(idx.shape[-1])
        active = pos < num[..., None]
        hit = (idx[..., :, None] == jnp.arange(nk)) & active[..., None]
        return hit.any(axis=-2)

    partial = listed(layout.kv_num_blocks, layout.kv_indices)
    full = listed(layout.full_kv_num_blocks, layout.full_kv_indices)
    return (partial.astype(jnp.int8) + 2 * full.astype(jnp.int8)).astype(jnp.int8)


def layout_to_dense(layout: SparseLayout, element_mask: ElementMask, batch: int, heads: int) -> jax.Array:
    """The element mask [B, H, q_len, kv_len] the layout and element mask describe together:
    full blocks allowed, partial blocks by ``element_mask``, the rest masked (jnp, for the
    reference implementation and tests)."""
    bq, bk, t, s = layout.block_q, layout.block_kv, layout.q_len, layout.kv_len
    nq, nk = layout.n_q_blocks, layout.n_kv_blocks

    def block_state(num, idx):  # [Bm, Hm, nQ, nKV] bool: which blocks the lists name
        pos = jnp.arange(idx.shape[-1])
        listed = pos[None, None, None, :] < num[..., None]
        hit = (idx[..., :, None] == jnp.arange(nk)[None, None, None, None, :]) & listed[..., None]
        return hit.any(axis=-2)

    partial = jnp.broadcast_to(block_state(layout.kv_num_blocks, layout.kv_indices), (batch, heads, nq, nk))
    full = jnp.broadcast_to(block_state(layout.full_kv_num_blocks, layout.full_kv_indices), (batch, heads, nq, nk))
    q_blk = jnp.arange(t) // bq
    k_blk = jnp.arange(s) // bk
    partial_el = partial[:, :, q_blk][:, :, :, k_blk]
    full_el = full[:, :, q_blk][:, :, :, k_blk]
    b = jnp.arange(batch)[:, None, None, None]
    h = jnp.arange(heads)[None, :, None, None]
    elem = element_mask.evaluate(b, h, jnp.arange(t)[None, None, :, None], jnp.arange(s)[None, None, None, :], s)
    return full_el | (partial_el & elem)


def check_inputs(q, k, v, layout: SparseLayout, where: str = "block_sparse_attention") -> None:
    """Raises ``ValueError`` naming the argument when shapes, dtypes or the layout do not fit."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{where}: {name} must be [batch, seq, heads, head_dim], got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{where}: {name} must be a floating-point array, got {x.dtype}")
    b, t, h, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{where}: k and v must have the same shape, got {k.shape} and {v.shape}")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"{where}: k must be [batch={b}, seq, kv_heads, head_dim={d}] like q, got {k.shape}")
    if h % k.shape[2]:
        raise ValueError(f"{where}: q's heads ({h}) must be a multiple of k's heads ({k.shape[2]})")
    if (layout.q_len, layout.kv_len) != (t, k.shape[1]):
        raise ValueError(f"{where}: block_mask was built for lengths (Q={layout.q_len}, KV={layout.kv_len}), "
                         f"the inputs have (Q={t}, KV={k.shape[1]})")
    bm, hm = layout.kv_num_blocks.shape[:2]
    if bm not in (1, b) or hm not in (1, h):
        raise ValueError(f"{where}: block_mask has batch/heads ({bm}, {hm}); expected 1 or ({b}, {h})")
