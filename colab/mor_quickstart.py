# %% [markdown]
# # Mixture-of-Recursions in JAX, trained and decoded
#
# This notebook trains a small **Mixture-of-Recursions** model (Bae et al., 2025, arXiv 2507.10524)
# on Shakespeare with [jaxeff](../README.md), looks at which tokens its routers send deeper, and
# decodes from it with the two KV-cache strategies of the paper. It runs on a CPU in a few minutes
# (Colab's free CPU runtime is enough); on a GPU the same code uses cuDNN attention.
#
# MoR reuses one stack of shared layers up to N_r times. A router per recursion step picks the tokens
# that go through the stack again; the others keep their hidden state. In training the router keeps
# the top-k tokens of the sequence; at inference, which is causal, a token goes on while its gate
# passes 0.5, and an auxiliary loss teaches the router to make the same choice.

# %%
# In Colab, install jaxeff first (from a clone of its repository):
#   !git clone <jaxeff repository URL> jaxeff && pip install -q -e "jaxeff[data,plot]"
import json, os
import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt
from flax import nnx
import jaxeff
from jaxeff.train import train

STEPS = int(os.environ.get("JAXEFF_NOTEBOOK_STEPS", "200"))  # CI runs this notebook with fewer
print(jax.devices())

# %% [markdown]
# ## A config: 5 layers, the middle 3 shared, up to 3 recursions
#
# `middle_cycle` keeps the first and last layers unique and cycles the middle ones; with 5 layers
# and N_r = 3 the middle is one shared block applied up to three times. Expert-choice routing keeps
# capacities (1, 2/3, 1/3) of the tokens at the three steps.

# %%
cfg = jaxeff.get_preset("tiny").override([
    "name=mor_notebook", "run_dir=runs/mor_notebook",
    "model.n_layers=5", f"train.steps={STEPS}", f"train.eval_every={STEPS}", f"train.ckpt_every={STEPS}",
    "train.warmup_steps=20", "train.sample_tokens=0", "train.batch_size=16", "train.seq_len=128",
    "recursion.strategy=middle_cycle", "recursion.n_recursions=3", "recursion.routing=expert",
])
print(cfg.recursion)
print("layers use:", jaxeff.models.layer_sources(cfg.recursion.strategy, cfg.model.n_layers, cfg.recursion.n_recursions))

# %%
summary = train(cfg, verbose=False)
print(f"validation loss {summary['val_loss']:.3f} nats/token (unigram baseline {summary['unigram_nats']:.3f}), "
      f"{summary['params'] / 1e6:.2f}M parameters")

# %% [markdown]
# ## What the routers learned
#
# The run's `metrics.jsonl` holds the router's auxiliary BCE loss and its *sampling accuracy*: how
# often the causal threshold decision agrees with the top-k choice made in training.

# %%
rows = [json.loads(l) for l in open(os.path.join(cfg.resolved_run_dir, "metrics.jsonl")) if '"loss"' in l]
fig, ax = plt.subplots(1, 2, figsize=(10, 3.2))
ax[0].plot([r["step"] for r in rows], [r["loss"] for r in rows]); ax[0].set_title("training loss")
for key in ("mor/sampling_acc_r2", "mor/sampling_acc_r3"):
    ax[1].plot([r["step"] for r in rows], [r[key] for r in rows], label=key.split("/")[1])
ax[1].set_title("router sampling accuracy"); ax[1].legend(); ax[0].set_xlabel("step"); ax[1].set_xlabel("step")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## Which tokens think harder?
#
# `mode="threshold"` runs the causal rule over a whole sequence and reports in `aux["depth"]` how
# many recursion steps each token made.

# %%
model = nnx.merge(summary["graphdef"], summary["final_params"])
tok = summary["tokenizer"]
text = "ROMEO. But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."
ids = tok.encode(text)
logits, aux = model(jnp.asarray([ids]), mode="threshold")
depth = np.asarray(aux["depth"][0])
pieces = [tok.decode([i]) for i in ids]
fig, ax = plt.subplots(figsize=(12, 1.6))
ax.imshow(depth[None, :], cmap="viridis", vmin=0, vmax=cfg.recursion.n_recursions, aspect="auto")
ax.set_xticks(range(len(pieces)), pieces, rotation=90, fontsize=8); ax.set_yticks([])
ax.set_title("recursion steps per token (brighter = deeper)"); plt.show()
print("tokens per depth:", {d: int((depth == d).sum()) for d in range(cfg.recursion.n_recursions + 1)})

# %% [markdown]
# ## Decoding with recursion-wise caching and with KV sharing
#
# `jaxeff.generate` runs the whole decode loop in one `jax.jit`. With recursion-wise caching each
# recursion step keeps the keys of only the tokens that reached it; with KV sharing every step reads
# the first step's keys. Prefill + decode equals the causal forward pass (jaxeff's tests check it).

# %%
import dataclasses
prompt = tok.encode("JULIET. O Romeo, Romeo,")
for strategy in ("recursion", "share"):
    m = nnx.merge(summary["graphdef"], summary["final_params"])
    m.rcfg = dataclasses.replace(m.rcfg, kv_strategy=strategy)  # same weights, other cache layout
    out = jaxeff.generate(m, prompt, max_new_tokens=40, temperature=0.8, top_k=40, seed=0)
    cache = m.init_cache(1, len(out))
    _, cache, _ = m.extend(jnp.asarray([out]), cache)
    held = cache.held_entries()
    frac = held["shared"] / ((cfg.model.n_layers - 2) * held["tokens"])
    print(f"[{strategy}] {tok.decode(out)!r}\n    KV entries of the recursion blocks: {frac:.2f} of a vanilla cache")

# %% [markdown]
# The model was trained with recursion-wise caching, so the shared variant decodes a slightly
# different model: train with `recursion.kv_strategy=share` to use it for real. For the full
# comparison at equal training FLOPs (vanilla, recursive and MoR models on one GPU) see
# `experiments/mor/run.py` and the README.
