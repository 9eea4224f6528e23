"""Decode throughput of continuous depth-wise batching (Bae et al., 2025, arXiv 2507.10524: up to
2.06x over vanilla on an H100) against plain batching of the same MoR model and vanilla models.

The models have the MoR experiment's architecture (``run.py --mode full``: d_model 512, 8
layers, GQA 8/4, SwiGLU 1536, vocabulary 8,192; float32 on the CPU) with random weights; only
the depth distribution matters for speed, so the MoR model's routers are calibrated to keep the
fractions the capacities train for (1, 2/3, 1/3 of the tokens at steps 1-3; the trained models of
the full experiment keep 0.656 of the recursion blocks' entries against the capacities' 0.667):
every embedding row gets a common offset u, step r's router weights get beta_r * u, and beta_r is
bisected on the causal threshold forward of random tokens. Compared, on one queue of requests
(random prompts of random lengths, a fixed number of new tokens each, greedy):

* ``vanilla (equal depth)``: the 8-layer Transformer (the paper's baseline), ``jaxeff.generate``
  on batches of ``slots`` requests;
* ``vanilla (equal params)``: a 4-layer Transformer, as many parameters as MoR N_r = 3;
* ``MoR plain batching``: the MoR model, ``jaxeff.generate`` on batches of ``slots``;
* ``MoR depth-wise``: :class:`jaxeff.decode.DepthwiseDecoder` with ``slots`` slots, exit lanes
  = slots and = slots / 2 (the average depth is 2 recursions).

The queue holds ``waves`` x ``slots`` requests (so the depth-wise slots mostly run full; the
last requests' drain is part of the measurement, as is every prefill).

Each setting runs the queue once to compile, then ``repeats`` timed times (median reported).
Writes ``results.json`` and ``throughput.png`` into ``--out`` and prints a table.

    python experiments/mor/depthwise_bench.py --mode quick   # seconds (tests run this)
    python experiments/mor/depthwise_bench.py --mode full    # the CPU table (~10 minutes)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff import ModelConfig, RecursionConfig, RecursiveTransformer, Transformer, generate
from jaxeff.decode import DepthwiseDecoder

SETTINGS = {
    "quick": dict(model=dict(vocab_size=128, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=64),
                  waves=2, prompt_len=(5, 5), new_tokens=5, slots=(2,), repeats=1),
    "full": dict(model=dict(vocab_size=8192, d_model=512, n_heads=8, n_kv_heads=4, d_ff=1536, max_seq_len=512),
                 waves=4, prompt_len=(16, 64), new_tokens=64, slots=(8, 32), repeats=2),
}
MOR = dict(strategy="middle_cycle", n_recursions=3, routing="expert")


def calibrate_routers(model: RecursiveTransformer, tokens_BxT: np.ndarray, seed: int = 0) -> list[float]:
    """Sets the routers so that the threshold rule keeps each step's capacity of the tokens
    (module docstring); returns the fractions reached."""
    d = model.cfg.d_model
    rng = np.random.default_rng(seed)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    row = float(np.linalg.norm(np.asarray(model.embed.table[...]), axis=1).mean())
    model.embed.table[...] = model.embed.table[...] + jnp.asarray(2.0 * row * u, jnp.float32)
    graphdef, _ = nnx.split(model)
    fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t, mode="threshold")[1])
    w0 = np.asarray(model.router.w[...])
    caps = model.capacities
    beta = np.zeros(len(caps))
    reached = []
    for r, cap in enumerate(caps):
        if cap >= 1.0:
            reached.append(1.0)
            continue
        lo, hi = -200.0, 200.0
        for _ in range(40):
            beta[r] = 0.5 * (lo + hi)
            model.router.w[...] = jnp.asarray(w0 + beta[:, None] * u[None, :], jnp.float32)
            frac = float(fwd(nnx.split(model)[1], jnp.asarray(tokens_BxT))[f"mor/selected_frac_r{r + 1}"])
            lo, hi = (beta[r], hi) if frac < cap else (lo, beta[r])
            if abs(frac - cap) < 0.005:
                break
        reached.append(frac)
    return reached


def build(mode: str, seed: int = 0):
    s = SETTINGS[mode]
    base = ModelConfig(**s["model"], n_layers=8)
    mor = RecursiveTransformer(base, RecursionConfig(**MOR), rngs=nnx.Rngs(seed))
    models = {"vanilla (equal depth)": Transformer(base, rngs=nnx.Rngs(seed)),
              "vanilla (equal params)": Transformer(ModelConfig(**s["model"], n_layers=4), rngs=nnx.Rngs(seed)),
              "MoR": mor}
    probe = np.random.default_rng(seed + 1).integers(0, base.vocab_size, (8, 64 if mode == "full" else 16))
    fracs = calibrate_routers(mor, probe, seed)
    return models, fracs


def requests(mode: str, vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    lo, hi = SETTINGS[mode]["prompt_len"]
    rng = np.random.default_rng(seed + 2)
    return [rng.integers(0, vocab, int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]


def plain(model, reqs, n_new, slots):
    out = []
    for i in range(0, len(reqs), slots):
        out += generate(model, reqs[i:i + slots], n_new, temperature=0.0)
    return out


def timed(fn, repeats: int) -> tuple[list, list[float]]:
    out = fn()  # compiles every shape the queue needs
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, times


def count_params(model) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=sorted(SETTINGS), default="quick")
    p.add_argument("--out", default=None, help="output folder (default experiments/mor/results_depthwise_<mode>)")
    a = p.parse_args(argv)
    s = SETTINGS[a.mode]
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), f"results_depthwise_{a.mode}")
    os.makedirs(out, exist_ok=True)
    models, fracs = build(a.mode)
    mor = models["MoR"]
    n_new = s["new_tokens"]
    dev = jax.devices()[0]
    rows, outputs = [], {}
    print(f"[depthwise] {s['waves']} x slots requests, prompts {s['prompt_len']}, {n_new} new tokens each; router "
          f"fractions {[round(f, 3) for f in fracs]}", flush=True)
    for slots in s["slots"]:
        reqs = requests(a.mode, mor.cfg.vocab_size, s["waves"] * slots)
        longest, n_tokens = max(map(len, reqs)), n_new * len(reqs)
        runs = [(name, lambda m=m: plain(m, reqs, n_new, slots), None) for name, m in models.items()]
        runs = [(n if n != "MoR" else "MoR plain batching", f, x) for n, f, x in runs]
        for lanes in sorted({slots, max(1, math.ceil(slots / 2))}, reverse=True):
            dec = DepthwiseDecoder(mor, slots=slots, lanes=lanes, max_prompt_len=longest, max_new_tokens=n_new)
            runs.append((f"MoR depth-wise (lanes {lanes})", lambda dec=dec: dec.generate(reqs), dec))
        for name, fn, dec in runs:
            res, times = timed(fn, s["repeats"])
            outputs[(slots, name)] = res
            med = float(np.median(times))
            row = {"slots": slots, "setting": name, "requests": len(reqs), "tokens": n_tokens, "seconds": times,
                   "tokens_per_s": n_tokens / med,
                   "params": count_params(mor if name.startswith("MoR") else models[name])}
            if dec is not None:
                row.update({k: v for k, v in dec.stats.items()})
                row["avg_recursions"] = dec.stats["shared_passes"] / max(1, dec.stats["exits"])
                row["kv_cache_bytes"] = dec.cache_nbytes()
            rows.append(row)
            print(f"[depthwise] slots {slots:3d}  {name:28s} {row['tokens_per_s']:9.1f} tokens/s", flush=True)
        ref = outputs[(slots, "MoR plain batching")]
        for row in rows:
            if row["slots"] == slots and row["setting"].startswith("MoR depth-wise"):
                got = outputs[(slots, row["setting"])]
                row["identical_to_plain"] = sum(g == r for g, r in zip(got, ref)) / len(ref)
    for slots in s["slots"]:
        base = {r["setting"]: r["tokens_per_s"] for r in rows if r["slots"] == slots}
        for r in rows:
            if r["slots"] == slots:
                r["speedup_vs_vanilla_equal_depth"] = r["tokens_per_s"] / base["vanilla (equal depth)"]
                r["speedup_vs_vanilla_equal_params"] = r["tokens_per_s"] / base["vanilla (equal params)"]
                r["speedup_vs_mor_plain"] = r["tokens_per_s"] / base["MoR plain batching"]
    hardware = "2-core CPU" if dev.platform == "cpu" else dev.device_kind
    report = {"mode": a.mode, "hardware": hardware, "device": dev.device_kind, "jax": jax.__version__,
              "date": time.strftime("%Y-%m-%d"), "router_fractions": fracs, "requests_per_slot": s["waves"],
              "prompt_len": s["prompt_len"], "new_tokens": n_new, "rows": rows}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n| slots | setting | tokens/s | vs vanilla (equal depth) | vs vanilla (equal params) | vs MoR plain |"
          f"\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['slots']} | {r['setting']} | {r['tokens_per_s']:.1f} | "
              f"{r['speedup_vs_vanilla_equal_depth']:.2f}x | "
              f"{r['speedup_vs_vanilla_equal_params']:.2f}x | {r['speedup_vs_mor_plain']:.2f}x |")
    plot(rows, os.path.join(out, "throughput.png"), f"decode throughput, {hardware} ({a.mode} mode)")
    return 0


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in rows))
    slots = sorted({r["slots"] for r in rows})
    fig, ax = plt.subplots(figsize=(7.5, 4))
    width = 0.8 / len(settings)
    for i, name in enumerate(settings):
        ys = [next((r["tokens_per_s"] for r in rows if r["slots"] == s and r["setting"] == name), 0) for s in slots]
        ax.bar(np.arange(len(slots)) + i * width, ys, width, label=name)
    ax.set_xticks(np.arange(len(slots)) + 0.4 - width / 2, [f"{s} slots" for s in slots])
    ax.set_ylabel("generated tokens / s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
