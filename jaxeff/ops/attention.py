"""Attention: one entry point over the registered implementations.

``attention(q, k, v, mask=..., impl=...)`` with queries ``q_BxTxHxD``, keys and values
``k_BxSxKxD`` (GQA: K key/value heads shared by H // K query heads each) and an
:class:`~jaxeff.ops.attention_mask.AttentionMask`. ``xla`` (the plain-jnp reference) always
applies; ``cudnn`` (:mod:`jaxeff.ops.attention_cudnn`) comes first on GPUs; ``block_sparse`` is
registered by :mod:`jaxeff.sparse`.
"""

from __future__ import annotations

import logging

import jax

from jaxeff.ops import attention_cudnn  # noqa: F401  (registers 'cudnn')
from jaxeff.ops.attention_mask import AttentionMask
from jaxeff.ops.attention_reference import attention_reference
from jaxeff.ops.attention_registry import AttentionImpl, attention_impl_for, implementation, register_attention_impl

log = logging.getLogger("jaxeff.attention")

register_attention_impl(AttentionImpl("xla", lambda q, k, v, mask: None,
                                      lambda q, k, v, mask, scale: attention_reference(q, k, v, mask=mask,
                                                                                       scale=scale)))


def attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, *,
              mask: AttentionMask | None = None, impl: str = "auto", scale: float | None = None) -> jax.Array:
    """Attention under ``mask`` (default: causal) through the implementation ``impl``."""
    mask = AttentionMask() if mask is None else mask
    name = attention_impl_for(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask=mask, impl=impl)
    log.debug("attention %s x %s (%s): %s", q_BxTxHxD.shape, k_BxSxKxD.shape, q_BxTxHxD.dtype, name)
    return implementation(name).fn(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask, scale)
