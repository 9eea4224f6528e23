# %% [markdown]
# # BlockFFN in JAX: a mixture of experts whose sparsity holds over chunks of tokens
#
# This notebook trains a small **BlockFFN** model (Song et al., 2025, arXiv 2507.08771) on
# Shakespeare with [jaxeff](../README.md), draws which experts its tokens use, and follows its
# token-level and chunk-level sparsity through training. It runs on a CPU in about a minute
# (Colab's free CPU runtime is enough).
#
# BlockFFN replaces the dense FFN by experts ``E_i(x) = silu(x W_up_i) W_down_i`` mixed with
# weights ``A = RMSNorm(ReLU(x W_r))``: no top-k, an expert is off where its router logit is
# negative. Two losses make the sparsity *local*: the activation-locality loss pulls each token's
# pattern towards its neighbour's, the chunk-sparsification loss pushes down the chance that an
# expert is used anywhere in a chunk of 64 tokens. A chunk then needs only the union of its
# tokens' experts, which is what the chunk-sparse kernel computes (decoding, speculative
# verification).

# %%
# In Colab, install jaxeff first (from a clone of its repository):
#   !git clone <jaxeff repository URL> jaxeff && pip install -q -e "jaxeff[data,plot]"
import json, os
import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt
from flax import nnx
import jaxeff
from jaxeff.moe.analysis import layer_activations, routing_report
from jaxeff.train import train

STEPS = int(os.environ.get("JAXEFF_NOTEBOOK_STEPS", "300"))  # CI runs this notebook with fewer
print(jax.devices())

# %% [markdown]
# ## A config: two layers, 16 experts each
#
# `moe.kind=blockffn` turns every FFN into a BlockFFN (`moe.dense_layers=0` would keep the first
# dense). The losses keep the paper's coefficients (lambda_al 2e-3, lambda_cs 5e-2); its adaptive
# lambda_cs waits 1000 steps before it moves, so this short run starts it after a quarter of the
# steps. 16 experts of width 48 hold the parameters of a SwiGLU of width 512.

# %%
cfg = jaxeff.get_preset("tiny").override([
    "name=blockffn_notebook", "run_dir=runs/blockffn_notebook", "model.vocab_size=512", "data.bpe_vocab_size=512",
    "model.d_model=96", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=512",
    f"train.steps={STEPS}", f"train.eval_every={STEPS}", f"train.ckpt_every={STEPS}", "train.log_every=5",
    "train.warmup_steps=10", "train.sample_tokens=0", "train.batch_size=16", "train.seq_len=64",
    "moe.kind=blockffn", "moe.n_experts=16", "moe.expert_dim=48",
    f"moe.cs_hold_steps={STEPS // 4}", f"moe.cs_window={max(1, STEPS // 20)}",
])
print(cfg.model.moe)

# %%
summary = train(cfg, verbose=False)
print(f"validation loss {summary['val_loss']:.3f} nats/token (unigram baseline {summary['unigram_nats']:.3f}), "
      f"{summary['params'] / 1e6:.2f}M parameters")

# %% [markdown]
# ## Which experts each token uses
#
# `layer_activations` runs the model and returns every MoE layer's activations ``A [B, T, E]``
# (0 = expert off). Bright columns that run across many tokens are what the locality losses ask
# for: neighbouring tokens sharing their experts.

# %%
model = nnx.merge(summary["graphdef"], summary["final_params"])
tok = summary["tokenizer"]
text = ("ROMEO. But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
        "Arise, fair sun, and kill the envious moon.")
ids = tok.encode(text)[:64]
acts = layer_activations(model, np.asarray([ids]))
fig, axes = plt.subplots(len(acts), 1, figsize=(12, 2.2 * len(acts)))
for ax, (layer, a) in zip(np.atleast_1d(axes), sorted(acts.items())):
    ax.imshow(np.asarray(a[0]).T > 0, cmap="Greys", aspect="auto", interpolation="nearest")
    ax.set_ylabel(f"layer {layer}\nexpert")
ax.set_xticks(range(len(ids)), [tok.decode([i]) for i in ids], rotation=90, fontsize=7)
plt.suptitle("expert activations over tokens (black = active)"); plt.tight_layout(); plt.show()
print("expert activations: active experts per token",
      {layer: round(float((np.asarray(a) > 0).sum(-1).mean()), 2) for layer, a in acts.items()})

# %% [markdown]
# ## Token-level and chunk-level sparsity during training
#
# The training log (`metrics.jsonl`) holds `moe/tls` (the share of inactive (token, expert)
# pairs) and `moe/cls8` (the share of inactive (chunk of 8 tokens, expert) pairs), averaged over
# the layers, and the adaptive coefficient `sched/moe_cs`.

# %%
rows = [json.loads(l) for l in open(os.path.join(cfg.resolved_run_dir, "metrics.jsonl")) if '"moe/tls"' in l]
steps = [r["step"] for r in rows]
fig, ax = plt.subplots(1, 2, figsize=(11, 3.2))
ax[0].plot(steps, [r["moe/tls"] for r in rows], label="TLS")
ax[0].plot(steps, [r["moe/cls8"] for r in rows], label="CLS_8")
ax[0].set_xlabel("step"); ax[0].set_ylim(0, 1); ax[0].legend(); ax[0].set_title("sparsity on training batches")
ax[1].plot(steps, [r["sched/moe_cs"] for r in rows]); ax[1].set_xlabel("step"); ax[1].set_title("lambda_cs")
plt.tight_layout(); plt.show()
print(f"TLS {rows[-1]['moe/tls']:.3f}, CLS_8 {rows[-1]['moe/cls8']:.3f} at step {steps[-1]}")

# %% [markdown]
# ## CLS_L over chunk lengths, and what the chunk-sparse kernel computes
#
# On held-out text: CLS_L for L = 1 .. 64 (CLS_1 is TLS), the reuse ratio of consecutive tokens
# and the segment-routing metrics of arXiv 2505.16056. A chunk of L tokens needs the union of its
# experts: ``1 - CLS_L`` of them, which is the share of expert weights the kernel reads.

# %%
from jaxeff.data import eval_batches, prepare_dataset
ds = prepare_dataset(cfg.data, cfg.train.seq_len, tokenizer_dir=os.path.join(cfg.resolved_run_dir, "tokenizer"))
batch = eval_batches(ds.val_tokens_NxS, ds.val_segment_ids_NxS, 16, 1)[0]
seg = batch["segment_ids"][:, :-1]
report = routing_report(layer_activations(model, batch["tokens"][:, :-1], seg), seg != 0, seg)
lengths = [1, 2, 4, 8, 16, 32, 64]
plt.figure(figsize=(5, 3.2)); plt.plot(lengths, [report[f"cls_{n}"] for n in lengths], marker="o")
plt.xscale("log", base=2); plt.xlabel("chunk length L"); plt.ylabel("CLS_L"); plt.ylim(0, 1); plt.grid(alpha=0.3)
plt.title("chunk-level sparsity (validation)"); plt.show()
print("CLS_L:", {n: round(report[f"cls_{n}"], 3) for n in lengths})
print(f"reuse ratio {report['reuse']:.3f}, SRP(8) {report['srp_8']:.3f}, SCH(8, 2x) {report['sch_8_rho2']:.3f}")

# %%
# The kernel on a chunk: the first 8 tokens of the text above, with their real activations A of
# layer 1 (the input x is random here: the experts read depend on A only).
from pallas_kernels.chunk_sparse_ffn.api import chunk_sparse_ffn
mlp = model.blocks[1].mlp
a = acts[1][:, :8]
x = jax.random.normal(jax.random.key(0), (1, 8, cfg.model.d_model))
y, read = chunk_sparse_ffn(x, a, mlp.w_up[...], mlp.w_down[...], impl="portable", return_reads=True)
dense = jaxeff.moe.experts.dense_experts(x[0], a[0], mlp.w_up[...], mlp.w_down[...])
print(f"chunk-sparse kernel: {int(read.sum())} of {cfg.model.moe.n_experts} experts read for 8 tokens "
      f"(1 - CLS_8 of this chunk), max |kernel - dense| {float(jnp.abs(y[0] - dense).max()):.2e}")

# %% [markdown]
# For the comparison with dense, top-k MoE and ReMoE models and the ablation of the two losses see
# `experiments/blockffn/run.py` and the README section "Mixture of experts with chunk-level
# sparsity".
