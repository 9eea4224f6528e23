"""Grouped-query self-attention: the projections with RoPE, and the ways a block attends.

The module owns the projections (``qkv``, ``out``); what the fresh queries meet is decided by an
*attend* function ``attend(q, k, v) -> (o, extra)`` that the caller hands to the block
(:meth:`jaxeff.nn.Block.__call__`). The common ones are built here:

* :func:`self_attend`: the block's own keys under an :class:`~jaxeff.ops.AttentionMask`;
* :func:`cache_attend`: append the new keys/values to a layer of a
  :class:`~jaxeff.kv.KVCache` and attend over the whole layer (prefill and decoding), optionally
  handing back attention statistics for KV-cache policies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.kv.cache import LayerKV
from jaxeff.nn.params import param
from jaxeff.ops import AttentionMask, apply_rope, attention, attention_weights
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

    def lora_targets(self) -> dict[str, tuple[tuple[int, ...], int]]:
        """name -> (weight shape, number of leading input dims)."""
        return {"wq": (self.wq.shape, 1), "wk": (self.wk.shape, 1), "wv": (self.wv.shape, 1),
                "wo": (self.wo.shape, 2)}

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


def position_impl(impl: str) -> str:
    """The implementation for position masks (caches, gathered tokens): the block-sparse kernel
    takes index masks only, so a model configured with it uses the automatic choice there."""
    return "auto" if impl == "block_sparse" else impl


def self_attend(mask: AttentionMask, impl: str):
    """The block's queries against its own keys: ``(o, None)``."""
    def attend(q, k, v):
        return attention(q, k, v, mask=mask, impl=impl), None
    return attend


def cache_attend(layer: LayerKV, positions_BxT: jax.Array, impl: str, *, keep_BxT: jax.Array | None = None,
                 stats_rows: int = 0, pattern: str = "causal", stats_sums: bool = False):
    """Appends the kept new tokens' keys/values to ``layer`` and attends over all of it by
    position: ``(o, (new_layer, stats))``. With ``stats_rows`` > 0, ``stats`` holds what
    KV-cache policies score slots with, for each row's last ``rows`` *kept* queries (rows with
    fewer tokens get position -1 and zero probabilities): ``probs`` [B, H, rows, C], their
    attention probabilities over the layer's slots, ``queries`` [B, rows, H, D] and
    ``q_positions`` [B, rows]; with ``stats_sums`` also ``sums`` [B, H, C], the column sums of
    the probabilities of every kept query.

    Layer types may change how a read happens: ``rotate_queries(q, positions)`` (keys stored
    before RoPE, :class:`jaxeff.kv.RopeLayerKV`), ``select(q, mask)`` (read-time selection,
    Quest) and ``read_impl`` (a decode-attention kernel, :func:`jaxeff.kv.with_decode_kernel`)."""
    def attend(q, k, v):
        new_layer, _ = layer.append(k, v, positions_BxT, keep_BxT)
        if hasattr(new_layer, "rotate_queries"):
            q = new_layer.rotate_queries(q, positions_BxT)
        k_all, v_all = new_layer.keys_values(q.dtype)
        mask = new_layer.mask(positions_BxT, pattern=pattern)
        if hasattr(new_layer, "select"):
            mask = new_layer.select(q, k_all, mask)
        from jaxeff.kv.decode import decode_read, uses_kernel
        if pattern == "causal" and mask.kv_valid is None and uses_kernel(new_layer, q, k_all.shape[2]):
            o = decode_read(new_layer, q, positions_BxT, new_layer.read_impl)
        else:
            o = attention(q, k_all, v_all, mask=mask, impl=position_impl(impl))
        stats = {}
        if stats_rows:
            b, t = positions_BxT.shape
            kept_B = jnp.full((b,), t, jnp.int32) if keep_BxT is None else keep_BxT.sum(1).astype(jnp.int32)
            idx_BxR = kept_B[:, None] - stats_rows + jnp.arange(stats_rows, dtype=jnp.int32)[None, :]
            real_BxR = idx_BxR >= 0
            idx_BxR = jnp.clip(idx_BxR, 0, t - 1)
            q_rows = jnp.take_along_axis(q, idx_BxR[:, :, None, None], axis=1)
            pos_rows = jnp.where(real_BxR, jnp.take_along_axis(positions_BxT, idx_BxR, axis=1), -1)
            probs = attention_weights(q_rows, k_all, mask=new_layer.mask(pos_rows, pattern=pattern))
            stats = {"probs": probs * real_BxR[:, None, :, None], "queries": q_rows, "q_positions": pos_rows}
        if stats_sums:
            probs_all = attention_weights(q, k_all, mask=mask)
            if keep_BxT is not None:
                probs_all = probs_all * keep_BxT[:, None, :, None]
            stats["sums"] = probs_all.sum(2)
        return o, (new_layer, stats)
    return attend
