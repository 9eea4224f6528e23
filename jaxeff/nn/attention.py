"""Grouped-query self-attention module with RoPE and an optional KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.kv.cache import write_rows
from jaxeff.nn.params import param
from jaxeff.ops import apply_rope, attention
from jaxeff.parallel import constrain


class Attention(nnx.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *, rope_base: float,
                 rope_style: str, impl: str, std: float, out_std: float, dtype: str, param_dtype: str,
                 rngs: nnx.Rngs):
        self.wq = param(rngs, (d_model, n_heads, head_dim), ("embed", "heads", "head_dim"), std=std, dtype=param_dtype)
        self.wk = param(rngs, (d_model, n_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), std=std,
                        dtype=param_dtype)
        self.wv = param(rngs, (d_model, n_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), std=std,
                        dtype=param_dtype)
        self.wo = param(rngs, (n_heads, head_dim, d_model), ("heads", "head_dim", "embed"), std=out_std,
                        dtype=param_dtype)
        self.rope_base, self.rope_style, self.impl, self.dtype = rope_base, rope_style, impl, dtype

    def weight(self, name: str, lora: dict | None = None) -> jax.Array:
        """A projection in the compute dtype, plus its LoRA delta when one is given."""
        w = getattr(self, name)[...]
        if lora is not None and name in lora:
            w = w + lora[name].astype(w.dtype)
        return w.astype(jnp.dtype(self.dtype))

    def qkv(self, x_BxTxD: jax.Array, positions_BxT: jax.Array, lora: dict | None = None):
        """Projected, rotated queries and keys, and values."""
        x = x_BxTxD.astype(jnp.dtype(self.dtype))
        q_BxTxHxD = jnp.einsum("btd,dhk->bthk", x, self.weight("wq", lora))
        k_BxTxKxD = jnp.einsum("btd,dhk->bthk", x, self.weight("wk", lora))
        v_BxTxKxD = jnp.einsum("btd,dhk->bthk", x, self.weight("wv", lora))
        q_BxTxHxD = constrain(q_BxTxHxD, ("batch", "seq", "heads", "head_dim"))
        q_BxTxHxD = apply_rope(q_BxTxHxD, positions_BxT, self.rope_base, self.rope_style)
        k_BxTxKxD = apply_rope(k_BxTxKxD, positions_BxT, self.rope_base, self.rope_style)
        return q_BxTxHxD, k_BxTxKxD, v_BxTxKxD

    def out(self, o_BxTxHxD: jax.Array, lora: dict | None = None) -> jax.Array:
        return jnp.einsum("bthk,hkd->btd", o_BxTxHxD.astype(jnp.dtype(self.dtype)), self.weight("wo", lora))

    def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array, *, segment_ids_BxT: jax.Array | None = None,
                 kv: tuple[jax.Array, jax.Array, jax.Array] | None = None):
        """Self-attention. With ``kv = (k_cache, v_cache, lengths)`` the new keys/values are
        written at each row's ``lengths`` and attention runs over the whole cache; returns
        ``(out, (k_cache, v_cache))`` then, else ``(out, None)``."""
        q, k, v = self.qkv(x_BxTxD, positions_BxT)
        if kv is None:
            o = attention(q, k, v, impl=self.impl, segment_ids_BxT=segment_ids_BxT)
            return self.out(o), None
        k_cache, v_cache, lengths_B = kv
        k_cache = write_rows(k_cache, k, lengths_B)
        v_cache = write_rows(v_cache, v, lengths_B)
        o = attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), impl="xla",
                      q_offset_B=lengths_B)
        return self.out(o), (k_cache, v_cache)
