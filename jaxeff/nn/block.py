"""Pre-norm residual decoder block: x + attn(norm(x)), then + mlp(norm(x))."""

from __future__ import annotations

import jax
from flax import nnx

from jaxeff.config import ModelConfig
from jaxeff.nn.attention import Attention
from jaxeff.nn.mlp import SwiGLU
from jaxeff.nn.norm import RMSNorm
from jaxeff.parallel import constrain


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5  # GPT-2: residual branches scaled by depth
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype, rngs=rngs)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim,
                              rope_base=cfg.rope_base, rope_style=cfg.rope_style, impl=cfg.attention_impl,
                              std=cfg.init_std, out_std=out_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                              rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype, rngs=rngs)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_ff, std=cfg.init_std, out_std=out_std, dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype, rngs=rngs)

    def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array, *, segment_ids_BxT=None, kv=None):
        h, new_kv = self.attn(self.attn_norm(x_BxTxD), positions_BxT, segment_ids_BxT=segment_ids_BxT, kv=kv)
        x_BxTxD = constrain(x_BxTxD + h.astype(x_BxTxD.dtype), ("batch", "seq", "act_embed"))
        x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD)).astype(x_BxTxD.dtype)
        return constrain(x_BxTxD, ("batch", "seq", "act_embed")), new_kv

    def forward_with(self, x_BxTxD: jax.Array, positions_BxT: jax.Array, attend, *, lora: dict | None = None):
        """The block with attention delegated: ``attend(q, k, v) -> (o, extra)`` receives the
        fresh rotated projections and decides which keys they meet (a gathered subset, a cache,
        keys shared from another recursion). Returns ``(x, extra)``. ``lora`` maps weight names
        (wq, wk, wv, wo, w_gate, w_up, w_down) to deltas added to this block's weights."""
        q, k, v = self.attn.qkv(self.attn_norm(x_BxTxD), positions_BxT, lora)
        o, extra = attend(q, k, v)
        x_BxTxD = constrain(x_BxTxD + self.attn.out(o, lora).astype(x_BxTxD.dtype), ("batch", "seq", "act_embed"))
        x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD), lora).astype(x_BxTxD.dtype)
        return constrain(x_BxTxD, ("batch", "seq", "act_embed")), extra
