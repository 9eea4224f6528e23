# %% [markdown]
# # Block-sparse attention in JAX: FlexAttention's masks, real block skipping
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/jaxeff/jaxeff/blob/main/colab/block_sparse_attention.ipynb)
#
# This notebook builds attention masks with [jaxeff](../README.md)'s FlexAttention-style API,
# draws which blocks of the attention matrix each one computes, checks the block-sparse kernel
# against dense attention, and trains a small language model whose attention only looks at a
# sliding window of recent tokens. It runs on a CPU in about a minute; on an H100/H200 the same
# code runs the Hopper kernel (`impl="auto"`), on a TPU jax's splash attention.
#
# A mask function has FlexAttention's signature `mask_fn(b, h, q_idx, kv_idx) -> bool`.
# `create_block_mask` evaluates it block by block and keeps, per query block, the lists of
# *full* key blocks (every element allowed: no masking needed) and *partial* ones (the kernel
# applies the element mask); every other block is skipped.

# %%
# In Colab, install jaxeff first (from a clone of its repository):
#   !git clone <jaxeff repository URL> jaxeff && pip install -q -e "jaxeff[data,plot]"
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import jaxeff
import jaxeff.sparse as sp
from jaxeff.train import train

STEPS = int(os.environ.get("JAXEFF_NOTEBOOK_STEPS", "200"))  # CI runs this notebook with fewer
print(jax.devices())

# %% [markdown]
# ## Masks and their block patterns
#
# Combinators build new masks from old: here a sliding window inside each of three packed
# documents, next to the plain causal, windowed and chunked masks.

# %%
S, BLOCK = 512, 32
segments = jnp.asarray(np.repeat([1, 2, 3], [200, 180, 132])[None, :])  # three documents in one row
masks = {
    "causal": sp.causal(),
    "local(64, 0)": sp.local(64, 0),
    "chunked_causal(128)": sp.chunked_causal(128),
    "document & local(64, 0)": sp.and_masks(sp.document(segments), sp.local(64, 0)),
}
block_masks = {name: sp.create_block_mask(fn, 1, None, S, S, block_q=BLOCK, block_kv=BLOCK)
               for name, fn in masks.items()}
fig, axes = plt.subplots(1, len(block_masks), figsize=(4 * len(block_masks), 4))
for ax, (name, bm) in zip(axes, block_masks.items()):
    ax.imshow(np.asarray(bm.block_states())[0, 0], cmap="Blues", vmin=0, vmax=2, interpolation="nearest")
    ax.set_title(f"{name}\n{float(bm.block_density()):.1%} of blocks computed")
    ax.set_xlabel("key block")
    ax.set_ylabel("query block")
plt.tight_layout()
plt.savefig("block_patterns.png")
for name, bm in block_masks.items():
    print(f"{name:26s} density {float(bm.block_density()):.3f}")
# The picture helper draws one (batch, head) with a legend: empty / partial / full.
block_masks["document & local(64, 0)"].plot("document_local.png")

# %% [markdown]
# ## The kernel against dense attention
#
# `block_sparse_attention` takes jaxeff's `[batch, seq, heads, head_dim]` layout, grouped-query
# attention (here 4 query heads over 2 key/value heads), and a `score_mod` such as soft-capping.
# `impl="pallas"` runs the portable Pallas kernel (in interpret mode on a CPU, so this is the real
# algorithm, block skipping included); the oracle is dense softmax attention under `to_dense()`.

# %%
B, H, K, D = 1, 4, 2, 32
kq, kk, kv = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(kq, (B, S, H, D), jnp.float32)
k = jax.random.normal(kk, (B, S, K, D), jnp.float32)
v = jax.random.normal(kv, (B, S, K, D), jnp.float32)
bm = block_masks["document & local(64, 0)"]
out = sp.block_sparse_attention(q, k, v, bm, impl="pallas", score_mod=sp.soft_cap(30.0))

dense = np.asarray(bm.to_dense())[0, 0]  # [S, S]
scores = np.einsum("qhd,khd->hqk", np.asarray(q[0]), np.repeat(np.asarray(k[0]), H // K, axis=1)) / np.sqrt(D)
scores = 30.0 * np.tanh(scores / 30.0)
scores = np.where(dense[None], scores, -np.inf)
probs = np.exp(scores - scores.max(-1, keepdims=True))
probs /= probs.sum(-1, keepdims=True)
want = np.einsum("hqk,khd->qhd", probs, np.repeat(np.asarray(v[0]), H // K, axis=1))
print(f"max |kernel - dense| = {np.abs(np.asarray(out[0]) - want).max():.2e}")
print("impl='auto' here runs:", sp.which_impl(q, k, v, bm))

# %% [markdown]
# ## A language model with sliding-window attention
#
# `model.attention_impl=block_sparse` with `model.mask=local:32` trains the `tiny` preset on
# Shakespeare with every query seeing only the 32 tokens before it. The BlockMask of each batch
# (window AND packed documents) is built once per step inside the jitted train step.

# %%
cfg = jaxeff.get_preset("tiny").override([
    "name=sparse_notebook", "run_dir=runs/sparse_notebook", f"train.steps={STEPS}",
    f"train.eval_every={STEPS}", f"train.ckpt_every={STEPS}", "train.warmup_steps=10", "train.sample_tokens=0",
    "train.seq_len=128", "model.attention_impl=block_sparse", "model.mask=local:32", "model.attention_block=32",
])
summary = train(cfg, verbose=False)
print(f"validation loss {summary['val_loss']:.3f} nats/token with a 32-token window "
      f"(unigram baseline {summary['unigram_nats']:.3f})")

# %% [markdown]
# ## Choosing the blocks from the attention itself: a selector on a video model
#
# The masks above are fixed rules. `jaxeff.sparse.select` chooses the blocks from the queries and
# keys of the layer at hand (Sparse VideoGen2, PAROAttention, AdaSpa, Efficient-vDiT, XAttention,
# MInference): `select(q, k, method=...)` returns a BlockMask, a token permutation for the
# methods that reorder tokens, and a state for the next call; `attend` permutes q/k/v, runs
# `block_sparse_attention` and permutes the output back. Here a tiny two-layer video transformer
# trains for a few steps on procedural videos of moving shapes (8 frames of 6 x 6 patches, 288
# tokens), and two selectors pick the blocks of its second layer: PARO (one axis order of the
# (frames, height, width) grid per head, chosen by a calibration pass, then a static mask in that
# order) and AdaSpa (the exact attention mass of every block, from the log-sum-exp, and the top
# blocks of each head). `experiments/sparse_select/run.py` evaluates every method on a larger
# version of this model and on SmolLM2.

# %%
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(jaxeff.__file__))), "experiments"))
from sparse_select import video_data, video_model  # noqa: E402

from jaxeff.sparse.select import attend, select  # noqa: E402

video = video_data.VideoSpec(frames=8, grid=6, patch=4)
vmodel, _ = video_model.train(video, video_model.ModelSpec(n_layers=2),
                              video_model.TrainSpec(steps=max(20, STEPS // 2), batch_size=4), log=lambda line: None)
vbatch = video_model.make_batch(video, 2, seed=1)
_, seen = video_model.forward(vmodel, vbatch, lambda i, q, k, v: video_model.gqa_attention(q, k, v), capture=True)
q1, k1, v1, o1 = seen[1]  # the second layer's rotated queries and keys, and its dense output

selectors = {"paro": dict(grid=video.token_grid, density=0.3, block=16), "adaspa": dict(density=0.3, block=16)}
fig, axes = plt.subplots(1, len(selectors), figsize=(8, 4))
for ax, (method, kwargs) in zip(axes, selectors.items()):
    bm, perm, _ = jax.jit(lambda q, k: select(q, k, method=method, **kwargs))(q1, k1)
    o = attend(q1, k1, v1, bm, perm, impl="reference")
    err = float(jnp.linalg.norm(o - o1) / jnp.linalg.norm(o1))
    ax.imshow(np.asarray(bm.block_states())[0, 0], cmap="Blues", vmin=0, vmax=2, interpolation="nearest")
    ax.set_title(f"{method}: {float(bm.block_density()):.0%} of blocks\n(head 0, in its own token order)")
    print(f"{method}: {float(bm.block_density()):.1%} of blocks, attention error vs dense {err:.3f}")
plt.tight_layout()
plt.savefig("selector_masks.png")
