"""The LLM half of the evaluation: SmolLM2-135M (jaxeff's GGUF importer) on real English text
(Shakespeare, from jaxeff's corpora), with a sparse prefill in every layer.

The sequence is a prompt of ``prefill`` tokens followed by ``continuation`` tokens. In every
layer the prompt's queries attend under the selector's BlockMask, estimated from the prompt's
own q/k (what a prefill sees); the continuation's queries attend densely to everything before
them (decoding against the KV cache the sparse prefill produced). Reported: per-layer attention
metrics on the prompt (``metrics.layer_metrics``, causal), the perplexity of the prompt's own
next-token predictions (the direct effect) and of the continuation (the effect through the KV
cache), against dense attention and a sink + local window baseline of the same density.

PARO and Efficient-vDiT need a (frames, height, width) grid that text has not. SVG2 runs for
comparison: its permutation scrambles causality, so its mask is its block cover AND causality
in the original order (an element mask inside the blocks, evaluated densely here).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import metrics
from .layers import Layers, dense_attention
from jaxeff.sparse.block_mask import create_block_mask
from jaxeff.sparse.masks import and_masks, from_blocks, from_dense
from jaxeff.sparse.select import select
from jaxeff.sparse.select.common import permute
from jaxeff.sparse.select.svg2 import cluster_table, permutation, svg2_clusters


def load_text_tokens(tokenizer, n: int) -> np.ndarray:
    """The first ``n`` tokens of the first Shakespeare play (real English, fixed)."""
    from jaxeff.data.corpora import load_corpus
    docs = load_corpus("shakespeare")
    ids = tokenizer.encode(docs[0].text[: 12 * n])
    if len(ids) < n:
        raise ValueError(f"the text has {len(ids)} tokens, {n} needed")
    return np.asarray(ids[:n], np.int32)[None]


def nll(logits_BxTxV, tokens_BxT, lo: int, hi: int) -> float:
    """Mean next-token NLL of rows lo..hi-1 (row t predicts token t + 1)."""
    lp = jax.nn.log_softmax(logits_BxTxV[:, lo:hi].astype(jnp.float32), -1)
    tgt = tokens_BxT[:, lo + 1:hi + 1]
    return float(-jnp.take_along_axis(lp, tgt[..., None], -1).mean())


class LLM:
    def __init__(self, model):
        self.model = model
        self.layers = Layers(list(model.blocks))
        self.logits = jax.jit(lambda x: model.logits(x))
        self.embed = jax.jit(lambda t: model.embed(t))

    def run(self, tokens_BxT, attend) -> jax.Array:
        pos = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1], dtype=jnp.int32), tokens_BxT.shape)
        return self.logits(self.layers.run(self.embed(tokens_BxT), pos, attend))


def _svg2_causal(knobs, options, block):
    """SVG2 on causal attention: (q, k) -> (BlockMask with causality in the original order, perm)."""
    opts = {k: v for k, v in options.items() if k != "block"}

    @jax.jit
    def fn(q, k):
        cl = svg2_clusters(q, k, **knobs, **opts)
        perm = permutation(cl)
        table = cluster_table(cl, block, block)
        causal_perm = perm.q[:, :, :, None] >= jnp.repeat(perm.kv, q.shape[2] // k.shape[2], axis=1)[:, :, None, :]
        b, h = table.shape[:2]
        mask = and_masks(from_blocks(table, block, block), from_dense(causal_perm))
        return create_block_mask(mask, b, h, q.shape[1], k.shape[1], block_q=block, block_kv=block), perm, causal_perm
    return fn


def _svg2_recall(q, k, lse, bm, perm, causal_perm) -> float:
    """Recall for SVG2's permuted causal mask, from the dense probabilities (small lengths)."""
    qp, kp, _ = permute(q, k, k, perm)
    h, kh, d = q.shape[2], k.shape[2], q.shape[3]
    sc = jnp.einsum("bthd,bshd->bhts", qp, jnp.repeat(kp, h // kh, axis=2), precision="highest") * d ** -0.5
    lse_p = jnp.take_along_axis(lse, perm.q, axis=-1)
    p = jnp.where(causal_perm, jnp.exp(sc - lse_p[..., None]), 0.0)
    bq, bk = bm.block_size
    on = (bm.block_states() > 0)
    t, s = q.shape[1], k.shape[1]
    on_el = jnp.repeat(jnp.repeat(on, bq, axis=2), bk, axis=3)[:, :, :t, :s]
    return float((p * on_el).sum() / (q.shape[0] * h * t))


def run_setting(llm: LLM, tokens, prefill: int, method: str, knobs: dict, options: dict, block: int) -> dict:
    """One (method, setting) with the sparse prefill in every layer (module docstring)."""
    rows, masks, first = [], [], {}
    if method == "local_window":
        bm_fixed, w = metrics.local_window(prefill, block, knobs["density"], causal=True)
        extra = {"half_width_blocks": w}
    else:
        extra = {}
        if method == "svg2":
            fn = _svg2_causal(knobs, options, block)
        else:
            sel = jax.jit(functools.partial(select, method=method, **knobs, **options))

    def attend_fn(i, q, k, v):
        o_dense, lse = dense_attention(q, k, v, causal=True)
        qp, kp, vp = q[:, :prefill], k[:, :prefill], v[:, :prefill]
        od, lp = o_dense[:, :prefill], lse[:, :, :prefill]
        if method == "local_window":
            bm, perm = bm_fixed, None
        elif method == "svg2":
            bm, perm, causal_perm = fn(qp, kp)
        else:
            bm, perm, _ = sel(qp, kp)
        if method == "svg2":  # recall from dense probabilities: the mask is not causal in its order
            o = metrics.attend_jit(qp, kp, vp, bm, perm)
            m = {"rel_error": metrics.rel_error(o, od), "density": metrics.density(bm, causal=True),
                 "recall": _svg2_recall(qp, kp, lp, bm, perm, causal_perm)}
        else:
            m, o = metrics.layer_metrics(qp, kp, vp, od, lp, bm, perm, causal=True)
        rows.append(m)
        masks.append(np.asarray(bm.block_states())[0, 0].astype(np.int8).tolist())
        if i == 0:
            first.update(q=qp, k=kp, v=vp, bm=bm, perm=perm)
        return jnp.concatenate([o.astype(o_dense.dtype), o_dense[:, prefill:]], axis=1)

    logits = llm.run(tokens, attend_fn)
    t = tokens.shape[1]
    out = {"method": method, "knobs": knobs, **extra, "per_layer": rows,
           **{key: metrics.mean_of(rows, key) for key in ("rel_error", "density", "recall")},
           "nll_prefill": nll(logits, tokens, 0, prefill - 1), "nll_continuation": nll(logits, tokens, prefill, t - 1),
           "mask_layer1_head0": masks[min(1, len(masks) - 1)]}
    if method not in ("local_window", "svg2"):
        _, out["select_seconds"] = metrics.timed(sel, first["q"], first["k"])
    elif method == "svg2":
        _, out["select_seconds"] = metrics.timed(fn, first["q"], first["k"])
    else:
        out["select_seconds"] = 0.0
    _, out["attention_seconds"] = metrics.timed(metrics.attend_jit, first["q"], first["k"], first["v"], first["bm"],
                                                first["perm"])
    return out


def run_dense(llm: LLM, tokens, prefill: int) -> dict:
    logits = llm.run(tokens, lambda i, q, k, v: dense_attention(q, k, v, causal=True)[0])
    t = tokens.shape[1]
    return {"method": "dense", "rel_error": 0.0, "density": 1.0, "recall": 1.0,
            "nll_prefill": nll(logits, tokens, 0, prefill - 1), "nll_continuation": nll(logits, tokens, prefill, t - 1)}
