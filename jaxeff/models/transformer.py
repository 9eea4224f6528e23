"""The dense decoder-only LM: every method in jaxeff is compared against this baseline."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.config import ModelConfig
from jaxeff.kv.cache import KVCache
from jaxeff.models.decoder import LMEnds
from jaxeff.nn import Block, cache_attend, merge_layer_aux, self_attend
from jaxeff.ops import AttentionMask
from jaxeff.parallel import constrain
from jaxeff.sparse.model_attention import prepare_mask


def _block_forward(block: Block, x_BxTxD, positions_BxT, mask: AttentionMask):
    x_BxTxD, _, aux = block(x_BxTxD, positions_BxT, self_attend(mask, block.attn.impl))
    return x_BxTxD, aux


_block_forward_remat = nnx.remat(_block_forward)


def token_positions(tokens_BxT: jax.Array, positions: jax.Array | None) -> jax.Array:
    b, t = tokens_BxT.shape
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if positions is None else positions


def model_mask(cfg: ModelConfig, shape_BxT: tuple[int, int], segment_ids_BxT: jax.Array | None) -> AttentionMask:
    """The training mask of a batch: causal, the model's pattern, packed documents; with
    ``attention_impl='block_sparse'`` its BlockMask is built here, once for all layers."""
    mask = AttentionMask.training(segment_ids_BxT, pattern=cfg.mask)
    return prepare_mask(mask, cfg.attention_impl, shape_BxT[0], shape_BxT[1], cfg.attention_block)


class Transformer(LMEnds, nnx.Module):
    """Token embedding -> n_layers pre-norm blocks -> RMSNorm -> LM head (optionally tied).

    ``model(tokens) -> (logits, aux)``: ``aux`` holds the layers' auxiliary losses and metrics
    (empty for dense FFNs). Decoding follows :class:`jaxeff.models.decoder.Decoder` with a
    :class:`~jaxeff.kv.KVCache`.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self._make_embedding(cfg, rngs)
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
        self._make_head(cfg, rngs)

    def __call__(self, tokens_BxT: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, dict]:
        positions_BxT = token_positions(tokens_BxT, positions)
        mask = model_mask(self.cfg, tokens_BxT.shape, segment_ids)
        x_BxTxD = constrain(self.embed(tokens_BxT), ("batch", "seq", "act_embed"))
        run = _block_forward_remat if self.cfg.remat else _block_forward
        auxes = []
        for block in self.blocks:
            x_BxTxD, aux = run(block, x_BxTxD, positions_BxT, mask)
            auxes.append(aux)
        return self.logits(x_BxTxD), merge_layer_aux(auxes)

    def init_cache(self, batch: int, capacity: int, dtype=None) -> KVCache:
        cfg = self.cfg
        return KVCache.empty(cfg.n_layers, batch, capacity, cfg.n_kv_heads, cfg.resolved_head_dim,
                             dtype=jnp.dtype(dtype or cfg.dtype))

    def extend(self, tokens_BxT: jax.Array, cache: KVCache, *, valid_lengths: jax.Array | None = None,
               stats_rows: int = 0, stats_sums: bool = False) -> tuple[jax.Array, KVCache, dict]:
        """Runs T new tokens per row at positions ``cache.lengths + t``, appending their keys and
        values to the cache. ``valid_lengths[b]`` (default T) says how many of row b's tokens
        are real; the rest are padding, neither stored nor counted. With ``stats_rows``, the
        stats hold per layer the attention probabilities of each row's last valid rows over the
        cache slots (``probs``), their queries (``queries``) and positions (``q_positions``);
        with ``stats_sums`` the column sums of all valid rows' probabilities (``sums``):
        :func:`jaxeff.nn.cache_attend`."""
        check_cache(self.cfg, cache)
        b, t = tokens_BxT.shape
        positions_BxT = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        added_B = jnp.full((b,), t, jnp.int32) if valid_lengths is None else valid_lengths.astype(jnp.int32)
        keep_BxT = jnp.arange(t)[None, :] < added_B[:, None]
        x_BxTxD = self.embed(tokens_BxT)
        layers, stats = [], []
        for block, layer in zip(self.blocks, cache.layers):
            attend = cache_attend(layer, positions_BxT, block.attn.impl, keep_BxT=keep_BxT, stats_rows=stats_rows,
                                  pattern=self.cfg.mask, stats_sums=stats_sums)
            x_BxTxD, (layer, st), _ = block(x_BxTxD, positions_BxT, attend)
            layers.append(layer)
            stats.append(st)
        new_cache = dataclasses.replace(cache, layers=tuple(layers), lengths=cache.lengths + added_B)
        out_stats = {k: tuple(s[k] for s in stats) for k in stats[0]} if (stats_rows or stats_sums) else {}
        return self.logits(x_BxTxD), new_cache, out_stats


def check_cache(cfg: ModelConfig, cache) -> None:
    """A cache made for another model shape fails here, at trace time, naming what differs."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"extend: cache must be a jaxeff.kv.KVCache, got {type(cache).__name__}")
    if len(layers) != cfg.n_layers:
        raise ValueError(f"extend: cache has {len(layers)} layers, the model {cfg.n_layers} "
                         f"(a cache from another model shape)")
    layer = layers[0]
    if layer.n_kv_heads != cfg.n_kv_heads or layer.head_dim != cfg.resolved_head_dim:
        raise ValueError(f"extend: cache layers hold {layer.n_kv_heads} key/value heads of dimension {layer.head_dim}, "
                         f"the model {cfg.n_kv_heads} of {cfg.resolved_head_dim} (a cache from another model shape)")
