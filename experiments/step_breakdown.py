"""Where the time of one training step goes: the step split into nested parts, each timed alone.

For a preset (default ``small``) on synthetic data, times with warm-up and medians:

* ``train_step``       the jitted step used by ``jaxeff train`` (forward, backward, AdamW update)
* ``value_and_grad``   forward + backward of the loss, no optimizer
* ``forward_loss``     forward pass and cross-entropy
* ``forward_hidden``   forward pass up to the final hidden states (no LM head, no loss)
* ``head_loss``        final norm + LM head + cross-entropy alone, forward and backward
* ``attention``        one layer's attention call alone, forward and backward, times n_layers
* ``optimizer``        the AdamW update alone on gradient-shaped inputs

Differences between nested parts show the cost of each piece (e.g. value_and_grad - forward_loss
is the backward pass). Each part's model FLOPs are not split; the point is time. Writes JSON.

    python experiments/step_breakdown.py --preset small --out breakdown.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.config import MeshConfig, get_preset
from jaxeff.nn import self_attend
from jaxeff.ops import AttentionMask, attention, cross_entropy
from jaxeff.parallel import make_mesh
from jaxeff.train.flops import model_flops_per_token
from jaxeff.train.loop import init_params
from jaxeff.train.optimizer import make_optimizer
from jaxeff.train.step import init_state, make_train_step, model_loss


def timed(fn, *args, reps: int, warmup: int = 2) -> float:
    """Median seconds of ``fn(*args)`` (blocked), after warm-up calls (the first compiles)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default="step_breakdown.json")
    a = p.parse_args(argv)
    cfg = get_preset(a.preset).override(a.set)
    mc, tc = cfg.model, cfg.train
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])  # one device: the parts, not scaling
    rng = np.random.default_rng(0)
    b, t = tc.batch_size, tc.seq_len
    batch = {"tokens": jnp.asarray(rng.integers(0, mc.vocab_size, (b, t + 1)), jnp.int32),
             "segment_ids": jnp.ones((b, t + 1), jnp.int32)}
    res: dict = {"preset": a.preset, "overrides": a.set, "device": jax.devices()[0].device_kind,
                 "batch": b, "seq_len": t, "jax": jax.__version__}
    with jax.set_mesh(mesh):
        graphdef, params, _ = init_params(cfg, mesh)
        tx = make_optimizer(tc, params)
        state = jax.jit(lambda p: init_state(p, tx))(params)
        step = jax.jit(make_train_step(graphdef, tx, mask_documents=tc.mask_documents), donate_argnums=(0,))

        # The step donates its state: thread it through the timing loop.
        holder = {"s": state}

        def one_step(bt):
            holder["s"], m = step(holder["s"], bt)
            return m
        res["train_step"] = timed(one_step, batch, reps=a.reps)
        params = holder["s"]["params"]

        loss_fn = lambda p, bt: model_loss(graphdef, p, bt, mask_documents=tc.mask_documents,
                                           denominator=jnp.asarray(float(b * t)))[0]
        res["value_and_grad"] = timed(jax.jit(jax.value_and_grad(loss_fn)), params, batch, reps=a.reps)
        res["forward_loss"] = timed(jax.jit(loss_fn), params, batch, reps=a.reps)

        def hidden(p, bt):
            model = nnx.merge(graphdef, p)
            x = model.embed(bt["tokens"][:, :-1])
            pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            mask = AttentionMask.training(bt["segment_ids"][:, :-1])
            for block in model.blocks:
                x = block(x, pos, self_attend(mask, block.attn.impl))[0]
            return x
        res["forward_hidden"] = timed(jax.jit(hidden), params, batch, reps=a.reps)

        x = jax.jit(hidden)(params, batch)

        def head(p, x):
            model = nnx.merge(graphdef, p)
            return cross_entropy(model.logits(x), batch["tokens"][:, 1:])[0]
        res["head_loss"] = timed(jax.jit(jax.value_and_grad(head, argnums=(0, 1))), params, x, reps=a.reps)

        hd = mc.resolved_head_dim
        dt = jnp.dtype(mc.dtype)
        q = jnp.asarray(rng.normal(size=(b, t, mc.n_heads, hd)), dt)
        kv = jnp.asarray(rng.normal(size=(b, t, mc.n_kv_heads, hd)), dt)
        seg = batch["segment_ids"][:, :-1]
        att = lambda q, k, v: attention(q, k, v, impl=mc.attention_impl, mask=AttentionMask.training(seg)).astype(
            jnp.float32).sum()
        res["attention"] = mc.n_layers * timed(jax.jit(jax.value_and_grad(att, argnums=(0, 1, 2))), q, kv, kv,
                                               reps=a.reps)
        grads = jax.tree.map(jnp.ones_like, params)
        opt_state = tx.init(params)
        res["optimizer"] = timed(jax.jit(lambda g, s, p: tx.update(g, s, p)), grads, opt_state, params,
                                 reps=a.reps)
    res["backward"] = res["value_and_grad"] - res["forward_loss"]
    tokens = b * t
    res["tokens_per_s"] = tokens / res["train_step"]
    res["model_tflops_per_s"] = model_flops_per_token(cfg) * tokens / res["train_step"] / 1e12
    print(json.dumps(res, indent=1))
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
