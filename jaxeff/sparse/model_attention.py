"""Block-sparse attention inside jaxeff models: ``ModelConfig(attention_impl='block_sparse')``.

Registers the ``block_sparse`` implementation of :func:`jaxeff.ops.attention`. The model's
:class:`~jaxeff.ops.AttentionMask` (its ``mask`` pattern, causality and packed documents) becomes
a mask function (``and_masks`` of the pattern and ``document(segment_ids)``), and
:func:`with_block_mask` builds the :class:`BlockMask` for a batch once (the models call it once
per forward pass, before the layers); :func:`jaxeff.sparse.block_sparse_attention` then runs with
``impl='auto'`` (the Hopper kernel on H100/H200, splash on TPU, the dense reference elsewhere).

It applies to index masks (training, prefill): position masks (KV caches, Mixture-of-Recursions'
gathered-token subsets, keys shared across recursions) keep the dense / cuDNN paths.
"""

from __future__ import annotations

import dataclasses

from jaxeff.ops.attention_mask import AttentionMask, parse_pattern, pattern_allows
from jaxeff.ops.attention_registry import AttentionImpl, register_attention_impl
from jaxeff.sparse.attention import block_sparse_attention
from jaxeff.sparse.block_mask import BlockMask, create_block_mask, next_pow2
from jaxeff.sparse.masks import MaskFn, and_masks, causal, chunked_causal, document, index_mask, local

DEFAULT_IMPL = "auto"  # the block_sparse_attention implementation models use


def model_mask_fn(mask: AttentionMask) -> MaskFn:
    """The mask function of an index mask: its pattern (with causality) AND its documents."""
    kind, arg = parse_pattern(mask.pattern)
    if kind == "local":
        parts = [local(arg, 0) if mask.causal else local(arg, None)]
    elif kind == "chunked":
        parts = [chunked_causal(arg)]
    elif kind == "custom":
        rule = index_mask(lambda b, h, q, kv: pattern_allows(mask.pattern, q, kv))
        parts = [causal(), rule] if mask.causal else [rule]
    else:
        parts = [causal()] if mask.causal else []
    if mask.q_segment_ids is not None:
        parts.append(document(mask.q_segment_ids, mask.kv_segment_ids))
    if not parts:  # non-causal, no documents: every key
        return index_mask(lambda b, h, q, kv: (q >= 0) & (kv >= 0))
    return and_masks(*parts)


def block_size_for(block: int, length: int) -> int:
    """The model's block size, shrunk to the padded length for short sequences."""
    return min(block, max(16, next_pow2(length)))


def with_block_mask(mask: AttentionMask, batch: int, t: int, s: int, block: int) -> AttentionMask:
    """``mask`` with its BlockMask built (one per batch; broadcast over heads, and over the batch
    when there are no documents)."""
    fn = model_mask_fn(mask)
    bm = create_block_mask(fn, batch if mask.q_segment_ids is not None else None, None, t, s,
                           block_q=block_size_for(block, t), block_kv=block_size_for(block, s))
    return dataclasses.replace(mask, block_mask=bm)


def _unsupported(q, k, v, mask: AttentionMask) -> str | None:
    if not mask.by_index:
        return "the mask goes by token position (a KV cache or a gathered token subset)"
    bm = mask.block_mask
    if bm is not None and (not isinstance(bm, BlockMask) or bm.seq_lengths != (q.shape[1], k.shape[1])):
        return "the mask's BlockMask was built for other lengths"
    return None


def _block_sparse(q, k, v, mask: AttentionMask, scale):
    bm = mask.block_mask
    if bm is None:  # a caller that did not build it once per batch: build it here
        bm = with_block_mask(mask, q.shape[0], q.shape[1], k.shape[1], 128).block_mask
    return block_sparse_attention(q, k, v, bm, scale=scale, impl=DEFAULT_IMPL)


register_attention_impl(AttentionImpl("block_sparse", _unsupported, _block_sparse), auto=False)


def prepare_mask(mask: AttentionMask, impl: str, batch: int, t: int, block: int) -> AttentionMask:
    """What a model calls once per forward pass: the BlockMask built when ``impl`` is
    ``block_sparse``, the mask unchanged otherwise."""
    if impl != "block_sparse":
        return mask
    return with_block_mask(mask, batch, t, t, block)


__all__ = ["DEFAULT_IMPL", "model_mask_fn", "prepare_mask", "with_block_mask"]
