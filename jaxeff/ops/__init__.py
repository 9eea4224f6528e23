"""Pure functions on arrays: the maths every module and kernel is checked against."""

from jaxeff.ops.attention import attention
from jaxeff.ops.attention_mask import AttentionMask, register_mask_pattern
from jaxeff.ops.attention_reference import attention_reference, attention_weights, masked_attention_reference
from jaxeff.ops.attention_registry import AUTO_ORDER, AttentionImpl, attention_impl_for, register_attention_impl
from jaxeff.ops.losses import cross_entropy, next_token_mask
from jaxeff.ops.mlp import swiglu
from jaxeff.ops.norms import rms_norm
from jaxeff.ops.rope import apply_rope, interleaved_to_half_permutation, rope_angles

__all__ = ["AUTO_ORDER", "AttentionImpl", "AttentionMask", "apply_rope", "attention", "attention_impl_for",
           "attention_reference", "attention_weights", "cross_entropy", "interleaved_to_half_permutation",
           "masked_attention_reference", "next_token_mask", "register_attention_impl", "register_mask_pattern", "rms_norm", "rope_angles",
           "swiglu"]
