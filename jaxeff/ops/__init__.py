"""Pure functions on arrays: the maths every module and kernel is checked against."""

from jaxeff.ops.attention import (attention, attention_by_position, attention_mask, attention_reference,
                                  masked_attention_reference, position_mask)
from jaxeff.ops.losses import cross_entropy, next_token_mask
from jaxeff.ops.mlp import swiglu
from jaxeff.ops.norms import rms_norm
from jaxeff.ops.rope import apply_rope, interleaved_to_half_permutation, rope_angles

__all__ = ["attention", "attention_by_position", "masked_attention_reference", "position_mask", "attention_mask", "attention_reference", "cross_entropy", "next_token_mask", "swiglu",
           "rms_norm", "apply_rope", "interleaved_to_half_permutation", "rope_angles"]
