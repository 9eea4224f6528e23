"""The dense decoder-only LM: every method in jaxeff is compared against this baseline."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.config import ModelConfig
from jaxeff.kv.cache import KVCache
from jaxeff.nn import Block, Embedding, LMHead, RMSNorm
from jaxeff.parallel import constrain


def _block_forward(block: Block, x_BxTxD, positions_BxT, segment_ids_BxT):
    return block(x_BxTxD, positions_BxT, segment_ids_BxT=segment_ids_BxT)[0]


_block_forward_remat = nnx.remat(_block_forward)


class Transformer(nnx.Module):
    """Token embedding -> n_layers pre-norm blocks -> RMSNorm -> LM head (optionally tied).

    ``model(tokens) -> (logits, aux)``: ``aux`` holds auxiliary losses and metrics (empty for
    the dense model). ``model.extend(tokens, cache) -> (logits, cache)`` appends tokens to a
    :class:`KVCache` (prefill when the cache is empty, decode with one token per row).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.d_model, std=cfg.init_std, dtype=cfg.dtype,
                               param_dtype=cfg.param_dtype, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else LMHead(
            cfg.d_model, cfg.vocab_size, std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

    def logits(self, x_BxTxD: jax.Array) -> jax.Array:
        x_BxTxD = self.final_norm(x_BxTxD)
        logits_BxTxV = self.embed.attend(x_BxTxD) if self.lm_head is None else self.lm_head(x_BxTxD)
        return constrain(logits_BxTxV, ("batch", "seq", "vocab"))

    def __call__(self, tokens_BxT: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, dict]:
        b, t = tokens_BxT.shape
        positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if positions is None else positions
        x_BxTxD = constrain(self.embed(tokens_BxT), ("batch", "seq", "act_embed"))
        run = _block_forward_remat if self.cfg.remat else _block_forward
        for block in self.blocks:
            x_BxTxD = run(block, x_BxTxD, positions_BxT, segment_ids)
        return self.logits(x_BxTxD), {}

    def init_cache(self, batch: int, capacity: int, dtype=None) -> KVCache:
        cfg = self.cfg
        return KVCache.empty(cfg.n_layers, batch, capacity, cfg.n_kv_heads, cfg.resolved_head_dim,
                             dtype=jnp.dtype(dtype or cfg.dtype))

    def extend(self, tokens_BxT: jax.Array, cache: KVCache, *, valid_lengths: jax.Array | None = None
               ) -> tuple[jax.Array, KVCache]:
        """Runs T new tokens per row at positions ``cache.lengths + t``, writing their keys and
        values into the cache. ``valid_lengths[b]`` (default T) says how many of row b's tokens
        are real; the rest are padding that later tokens overwrite."""
        b, t = tokens_BxT.shape
        positions_BxT = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        x_BxTxD = self.embed(tokens_BxT)
        new_k, new_v = [], []
        for block, k_cache, v_cache in zip(self.blocks, cache.k, cache.v):
            x_BxTxD, (k_cache, v_cache) = block(x_BxTxD, positions_BxT, kv=(k_cache, v_cache, cache.lengths))
            new_k.append(k_cache)
            new_v.append(v_cache)
        added = jnp.full((b,), t, jnp.int32) if valid_lengths is None else valid_lengths.astype(jnp.int32)
        return self.logits(x_BxTxD), KVCache(k=tuple(new_k), v=tuple(new_v), lengths=cache.lengths + added)
