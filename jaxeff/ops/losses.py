"""Losses."""

import jax
import jax.numpy as jnp


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array, mask_BxT: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy over unmasked positions, in float32.

    Returns (mean loss, number of counted tokens). A fully masked batch gives loss 0, not NaN.
    """
    logits = logits_BxTxV.astype(jnp.float32)
    logz_BxT = jax.nn.logsumexp(logits, axis=-1)
    # The target logit by comparison with an iota rather than a gather: its gradient is then an
    # elementwise select that fuses with the softmax gradient (one pass writing the logits'
    # gradient in their own dtype) instead of a scatter into a float32 [B, T, V] buffer.
    is_target_BxTxV = targets_BxT[..., None] == jnp.arange(logits.shape[-1], dtype=targets_BxT.dtype)
    target_logit_BxT = jnp.sum(jnp.where(is_target_BxTxV, logits, 0.0), axis=-1)
    nll_BxT = logz_BxT - target_logit_BxT
    if mask_BxT is None:
        mask_BxT = jnp.ones_like(nll_BxT, dtype=bool)
    count = mask_BxT.sum().astype(jnp.float32)
    # where, not multiply: a masked position's logits may be garbage (even NaN) and must not leak.
    return jnp.where(mask_BxT, nll_BxT, 0.0).sum() / jnp.maximum(count, 1.0), count


def next_token_mask(segment_ids_BxS: jax.Array) -> jax.Array:
    """Which targets count, for rows of S = T + 1 packed tokens: the target must continue the
    same document as its input (segment ids equal) and must not be padding (segment id 0)."""
    seg_in, seg_tgt = segment_ids_BxS[:, :-1], segment_ids_BxS[:, 1:]
    return (seg_in == seg_tgt) & (seg_tgt != 0)
