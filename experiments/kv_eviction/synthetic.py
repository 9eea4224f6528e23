"""A small decoder trained here on multi-query associative recall (MQAR), then every KV policy's
recall accuracy against the budget: the context (key-value pairs) is prefilled and compressed
before any query is seen, then the queries are answered from the compressed cache."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxeff import ModelConfig, Transformer
from jaxeff.kv import Budget, KVCompression, compress_once, policy
from jaxeff.ops import cross_entropy

from tasks import MQAR_VOCAB, mqar_batch


def model_config() -> ModelConfig:
    # init 0.1 (not 0.02) and 32 keys: in probes on this CPU the content-matching (induction) circuit
    # MQAR needs then forms within the few thousand steps a CPU affords
    return ModelConfig(vocab_size=MQAR_VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256,
                       max_seq_len=128, rope_base=10_000.0, init_std=0.1)


def train(steps: int, n_pairs: int, n_queries: int, *, batch: int = 64, lr: float = 3e-3, seed: int = 0, log=print):
    """AdamW with warm-up and cosine decay on freshly drawn MQAR batches. Returns (model, curve)."""
    model = Transformer(model_config(), rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 20, 1), max(steps, 2), lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, tokens, mask):
        def loss_fn(p):
            logits, _ = nnx.merge(graphdef, p)(tokens[:, :-1])
            return cross_entropy(logits, tokens[:, 1:], mask)[0]
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    rng = np.random.default_rng(seed)
    curve, t0 = [], time.perf_counter()
    for i in range(steps):
        tokens, mask = mqar_batch(rng, batch, n_pairs, n_queries)
        params, opt, loss = step(params, opt, jnp.asarray(tokens), jnp.asarray(mask))
        if i % max(steps // 10, 1) == 0 or i == steps - 1:
            curve.append((i, float(loss)))
            log(f"  mqar step {i}: loss {float(loss):.3f} ({time.perf_counter() - t0:.0f}s)")
    return nnx.merge(graphdef, params), curve


def _evaluator(graphdef, transform, n_ctx: int, n_tail: int, stepwise: bool):
    def run(state, tokens, value):
        m = nnx.merge(graphdef, state)
        b = tokens.shape[0]
        ctx, tail = tokens[:, :n_ctx], tokens[:, n_ctx:]
        cap = n_ctx + n_tail
        if transform is None:
            _, cache, _ = m.extend(ctx, m.init_cache(b, cap))
        else:
            _, cache, _ = compress_once(m, ctx, jnp.full((b,), n_ctx, jnp.int32), transform, cap, budget_value=value)
        kept = jnp.stack([layer.counts.mean() for layer in cache.layers]).mean()
        if not stepwise:
            logits, _, _ = m.extend(tail, cache)
        else:
            def step(cache, tok):
                lg, cache, _ = m.extend(tok[:, None], cache)
                return cache, lg[:, 0]
            _, lgs = jax.lax.scan(step, cache, tail.T)
            logits = jnp.swapaxes(lgs, 0, 1)
        pred = jnp.argmax(logits[:, 0::2], -1)  # after each query key
        return (pred == tail[:, 1::2]).mean(), kept
    return jax.jit(run)


def evaluate(model, specs: dict, budgets, *, n_pairs: int, n_queries: int, n_eval: int = 256, seed: int = 123,
             log=print) -> dict:
    """Recall accuracy for each policy spec (name -> (policy name, options)) and budget (ratio of
    the context). Returns {"full": acc, "policies": {name: {"budget": [...], "accuracy": [...],
    "kept": [...]}}}."""
    tokens, _ = mqar_batch(np.random.default_rng(seed), n_eval, n_pairs, n_queries)
    n_ctx, n_tail = 2 * n_pairs + 1, 2 * n_queries
    graphdef, state = nnx.split(model)
    toks = jnp.asarray(tokens)
    full_acc, _ = _evaluator(graphdef, None, n_ctx, n_tail, False)(state, toks, None)
    out = {"full": float(full_acc), "context_tokens": n_ctx, "policies": {}}
    for name, (pol_name, opts) in specs.items():
        pol = policy(pol_name, **opts)
        if not pol.uses_budget:
            t = KVCompression(pol, None)
            acc, kept = _evaluator(graphdef, t, n_ctx, n_tail, False)(state, toks, None)
            out["policies"][name] = {"budget": [1.0], "accuracy": [float(acc)], "kept": [float(kept)]}
            log(f"  {name}: accuracy {float(acc):.3f}")
            continue
        t = KVCompression(pol, Budget(0.5))
        fn = _evaluator(graphdef, t, n_ctx, n_tail, pol.kind == "select")
        accs, kepts = [], []
        for b in budgets:
            acc, kept = fn(state, toks, jnp.asarray(b, jnp.float32))
            accs.append(float(acc))
            kepts.append(float(kept))
        out["policies"][name] = {"budget": list(budgets), "accuracy": accs, "kept": kepts}
        log(f"  {name}: " + ", ".join(f"{b:.3g}: {a:.3f}" for b, a in zip(budgets, accs)))
    return out
