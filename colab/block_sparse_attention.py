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
