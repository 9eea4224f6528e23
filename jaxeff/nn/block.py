"""Pre-norm residual decoder block: x + attn(norm(x)), then + ffn(norm(x))."""

from __future__ import annotations

import jax
from flax import nnx

from jaxeff.config import ModelConfig
from jaxeff.nn.attention import Attention
from jaxeff.nn.ffn import make_ffn, residual_std
from jaxeff.nn.norm import RMSNorm
from jaxeff.parallel import constrain


def make_attention(cfg: ModelConfig, rngs: nnx.Rngs) -> Attention:
    return Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, rope_base=cfg.rope_base,
                     rope_style=cfg.rope_style, impl=cfg.attention_impl, std=cfg.init_std,
                     out_std=residual_std(cfg), dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


class Block(nnx.Module):
    """One layer. ``attn`` and ``ffn`` default to what the config describes for
    ``layer_index`` (:func:`jaxeff.nn.ffn.make_ffn`). The FFN is stored as ``mlp`` (and its
    norm as ``mlp_norm``), the names checkpoints and importers use."""

    def __init__(self, cfg: ModelConfig, layer_index: int = 0, *, rngs: nnx.Rngs, attn: Attention | None = None,
                 ffn: nnx.Module | None = None):
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype, rngs=rngs)
        self.attn = make_attention(cfg, rngs) if attn is None else attn
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype, rngs=rngs)
        self.mlp = make_ffn(cfg, layer_index, rngs) if ffn is None else ffn

    def lora_targets(self) -> dict[str, tuple[str, tuple[int, ...], int]]:
        """name -> (module attribute, weight shape, leading input dims) of the weights a
        per-recursion LoRA may relax, as the attention and FFN modules report them."""
        out = {}
        for attr in ("attn", "mlp"):
            for name, (shape, n_in) in getattr(self, attr).lora_targets().items():
                out[name] = (attr, tuple(shape), n_in)
        return out

    def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array, attend, *, lora: dict | None = None):
        """``attend(q, k, v) -> (o, extra)`` receives the fresh rotated projections and decides
        which keys they meet (the block's own under a mask, a cache, a gathered subset, keys
        shared from another recursion: :mod:`jaxeff.nn.attention`). ``lora`` maps weight names to
        deltas added to this block's weights. Returns ``(x, extra, aux)``, aux from the FFN."""
        q, k, v = self.attn.qkv(self.attn_norm(x_BxTxD), positions_BxT, lora)
        o, extra = attend(q, k, v)
        x_BxTxD = constrain(x_BxTxD + self.attn.out(o, lora).astype(x_BxTxD.dtype), ("batch", "seq", "act_embed"))
        y_BxTxD, aux = self.mlp(self.mlp_norm(x_BxTxD), lora)
        x_BxTxD = x_BxTxD + y_BxTxD.astype(x_BxTxD.dtype)
        return constrain(x_BxTxD, ("batch", "seq", "act_embed")), extra, aux
