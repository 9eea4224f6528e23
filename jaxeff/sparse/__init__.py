"""Block-sparse attention with a FlexAttention-style API: mask functions, ``BlockMask`` and
``block_sparse_attention`` (kernels in ``pallas_kernels.block_sparse_attention``)."""

from jaxeff.sparse.masks import (MaskFn, and_masks, causal, chunked_causal, document, from_blocks, from_dense,
                                 index_mask, local, not_mask, or_masks, prefix_lm)
from jaxeff.sparse.block_mask import BlockMask, create_block_mask
from jaxeff.sparse.attention import block_sparse_attention, which_impl
from jaxeff.sparse import model_attention  # noqa: F401  (registers attention_impl='block_sparse')
from pallas_kernels.block_sparse_attention.common import SoftCap


def soft_cap(cap: float) -> SoftCap:
    """score_mod ``cap * tanh(score / cap)`` (attention logit soft-capping, Gemma 2)."""
    return SoftCap(float(cap))


__all__ = ["BlockMask", "MaskFn", "and_masks", "block_sparse_attention", "causal", "chunked_causal",
           "create_block_mask", "document", "from_blocks", "from_dense", "index_mask", "local", "not_mask", "or_masks",
           "prefix_lm", "soft_cap", "which_impl"]
