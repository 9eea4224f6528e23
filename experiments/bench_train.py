"""Training throughput and MFU of a preset under several variants, on whatever devices are visible.

Synthetic uniform-random tokens (packed as documents of --doc-len tokens) isolate the model's
speed from the data pipeline. Each variant: compile, --warmup steps, then --steps timed steps;
tokens/s = tokens / wall time of the timed steps (one block at the end), and the per-step median
from a second, individually blocked pass. Writes a JSON list of results.

    python experiments/bench_train.py --preset small --variant "train.batch_size=16" \
        --variant "train.batch_size=16,model.attention_impl=xla" --out results.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
import traceback

import jax
import numpy as np

from jaxeff.config import get_preset
from jaxeff.parallel import batch_sharding, make_mesh
from jaxeff.train.flops import device_peak_flops, mfu
from jaxeff.models import count_params
from jaxeff.train.flops import model_flops_per_token
from jaxeff.train.loop import init_params
from jaxeff.train.optimizer import make_optimizer
from jaxeff.train.step import init_state, make_train_step

attention_ops = importlib.import_module("jaxeff.ops.attention_cudnn")
DEFAULT_TIERS = attention_ops.PACKED_SEGMENT_TIERS


def synthetic_batch(batch: int, seq_len: int, vocab: int, doc_len: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq_len + 1), dtype=np.int32)
    seg = (np.arange(seq_len + 1) // doc_len + 1).astype(np.int32)
    return {"tokens": tokens, "segment_ids": np.broadcast_to(seg, tokens.shape).copy()}


def build(cfg, devices=None, doc_len: int = 1_000_000, n_batches: int = 4):
    """Mesh, jitted train step (as ``jaxeff train`` builds it), initial state and device batches
    of synthetic data for ``cfg``. Returns (mesh, step_fn, state, batches); the caller enters
    ``jax.set_mesh(mesh)`` around the calls."""
    tc = cfg.train
    mesh = make_mesh(cfg.mesh, devices=devices)
    with jax.set_mesh(mesh):
        graphdef, params, _ = init_params(cfg, mesh)
        tx = make_optimizer(tc, params)
        state = jax.jit(lambda p: init_state(p, tx))(params)
        del params
        state_sh = jax.tree.map(lambda x: x.sharding, state)
        bsh = batch_sharding(mesh)
        step_fn = jax.jit(make_train_step(graphdef, tx, grad_accum=tc.grad_accum, mask_documents=tc.mask_documents),
                          in_shardings=(state_sh, bsh), out_shardings=(state_sh, None), donate_argnums=(0,))
        batches = [{k: jax.device_put(v, bsh) for k, v in
                    synthetic_batch(tc.batch_size, tc.seq_len, cfg.model.vocab_size, doc_len, s).items()}
                   for s in range(n_batches)]
    return mesh, step_fn, state, batches


def time_steps(step_fn, state, batches: list, steps: int, individual: int):
    """Runs ``steps`` steps cycling over ``batches`` and blocks once at the end (the wall time
    gives tokens/s), then ``individual`` more, each blocked (their times give a median step).
    Returns (state, last metrics, wall seconds, per-step seconds)."""
    t0 = time.perf_counter()
    for i in range(steps):
        state, m = step_fn(state, batches[i % len(batches)])
    jax.block_until_ready(m)
    wall = time.perf_counter() - t0
    per_step = []
    for i in range(individual):
        t1 = time.perf_counter()
        state, m = step_fn(state, batches[i % len(batches)])
        jax.block_until_ready(m)
        per_step.append(time.perf_counter() - t1)
    return state, m, wall, per_step


def run_variant(preset: str, overrides: list[str], steps: int, warmup: int, doc_len: int) -> dict:
    cfg = get_preset(preset).override(overrides)
    tc = cfg.train
    mesh, step_fn, state, batches = build(cfg, doc_len=doc_len)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        state, m = step_fn(state, batches[0])
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        for i in range(warmup):
            state, m = step_fn(state, batches[i % 4])
        jax.block_until_ready(m)
        state, m, wall, per_step = time_steps(step_fn, state, batches, steps, min(steps, 10))
        loss = float(m["loss"])
    tokens = tc.batch_size * tc.seq_len
    tok_s = tokens * steps / wall
    flops_tok = model_flops_per_token(cfg)
    peak = device_peak_flops()
    mem = jax.devices()[0].memory_stats() or {}
    return {"preset": preset, "overrides": overrides, "params": count_params(cfg),
            "flops_per_token": flops_tok, "devices": mesh.size, "device_kind": jax.devices()[0].device_kind,
            "mesh": dict(zip(mesh.axis_names, mesh.devices.shape)), "batch": tc.batch_size, "seq_len": tc.seq_len,
            "compile_s": compile_s, "step_s_mean": wall / steps, "step_s_median": statistics.median(per_step),
            "tokens_per_s": tok_s, "tokens_per_s_per_device": tok_s / mesh.size,
            "mfu": mfu(flops_tok, tok_s, mesh.size, peak), "loss": loss,
            "peak_bytes": mem.get("peak_bytes_in_use")}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--variant", action="append", default=[], help="comma-separated key=value overrides")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--doc-len", type=int, default=1_000_000, help="tokens per synthetic document")
    p.add_argument("--out", default="bench_train.json")
    args = p.parse_args()
    results = []
    for v in args.variant or [""]:
        overrides = [x for x in v.split(",") if x]
        # Not a config field: the documents-per-row tiers of cuDNN's packed attention, e.g. attn_tiers=4-16.
        attention_ops.PACKED_SEGMENT_TIERS = DEFAULT_TIERS
        for o in [o for o in overrides if o.startswith("attn_tiers=")]:
            attention_ops.PACKED_SEGMENT_TIERS = tuple(int(x) for x in o.split("=")[1].split("-"))
            overrides.remove(o)
        # swiglu_fused=1 (the gate and up projections as one matmul) is model.swiglu_fused now.
        overrides = [f"model.{o}" if o.startswith("swiglu_fused=") else o for o in overrides]
        try:
            r = run_variant(args.preset, overrides, args.steps, args.warmup, args.doc_len)
        except Exception as e:  # keep going: one failing variant must not lose the others
            traceback.print_exc()
            r = {"preset": args.preset, "overrides": overrides, "error": f"{type(e).__name__}: {str(e)[:500]}"}
        r["variant"] = v  # with the pseudo-overrides (attn_tiers, swiglu_fused)
        results.append(r)
        print(json.dumps(r), flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(f"\n{'variant':60s} {'dev':>3s} {'tok/s':>10s} {'tok/s/dev':>10s} {'MFU':>6s} {'step ms':>8s} {'GB':>5s}")
    for r in results:
        if "error" in r:
            print(f"{r['variant'][:60]:60s} ERROR {r['error'][:80]}")
            continue
        u = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        gb = f"{r['peak_bytes'] / 2**30:.1f}" if r.get("peak_bytes") else "-"
        print(f"{r['variant'][:60]:60s} {r['devices']:3d} {r['tokens_per_s']:10,.0f} "
              f"{r['tokens_per_s_per_device']:10,.0f} {u:>6s} {1e3 * r['step_s_median']:8.1f} {gb:>5s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
