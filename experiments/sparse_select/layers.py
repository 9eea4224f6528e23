"""Runs a stack of ``jaxeff.nn.Block`` layers one at a time with any attention in between, so a
block selector can replace the attention of every layer: the projections (``qkv``) and the rest
of the layer (``finish``: output projection, residual, MLP) are jitted once for all layers
(they share one graph), the attention is whatever the caller passes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.block_sparse_attention.reference import attention as masked_attention


class Layers:
    def __init__(self, blocks):
        self.graphdef = nnx.split(blocks[0])[0]
        self.states = [nnx.split(b)[1] for b in blocks]
        gd = self.graphdef

        @jax.jit
        def qkv(state, x_BxTxD, positions_BxT):
            blk = nnx.merge(gd, state)
            return blk.attn.qkv(blk.attn_norm(x_BxTxD), positions_BxT)

        @jax.jit
        def finish(state, x_BxTxD, o_BxTxHxD):
            blk = nnx.merge(gd, state)
            x_BxTxD = x_BxTxD + blk.attn.out(o_BxTxHxD).astype(x_BxTxD.dtype)
            y_BxTxD, _ = blk.mlp(blk.mlp_norm(x_BxTxD), None)
            return x_BxTxD + y_BxTxD.astype(x_BxTxD.dtype)

        self.qkv, self.finish = qkv, finish

    def __len__(self):
        return len(self.states)

    def run(self, x_BxTxD, positions_BxT, attend, capture: bool = False, rotate=None):
        """``attend(layer, q, k, v) -> o`` in every layer (q and k through ``rotate`` first, for
        positional rotations the blocks do not apply themselves). Returns x (and with
        ``capture`` the per-layer (q, k, v, o) tuples, q and k as attention saw them)."""
        seen = []
        for i, st in enumerate(self.states):
            q, k, v = self.qkv(st, x_BxTxD, positions_BxT)
            if rotate is not None:
                q, k = rotate(q), rotate(k)
            o = attend(i, q, k, v)
            if capture:
                seen.append((q, k, v, o))
            x_BxTxD = self.finish(st, x_BxTxD, o)
        return (x_BxTxD, seen) if capture else x_BxTxD


def _dense(q, k, v, causal: bool):
    t, s = q.shape[1], k.shape[1]
    mask = jnp.ones((1, 1, t, s), bool) if not causal else jnp.tril(jnp.ones((t, s), bool))[None, None]
    return masked_attention(q, k, v, mask, return_lse=True)


dense_attention = jax.jit(_dense, static_argnames=("causal",))
"""(o [B, T, H, D], lse [B, H, T]) of dense softmax attention (GQA, float32 statistics)."""
