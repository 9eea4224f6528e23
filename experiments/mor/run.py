"""Mixture-of-Recursions at equal training FLOPs (Bae et al., 2025, arXiv 2507.10524, Table 3).

Trains, on the same corpus and the same FLOP budget: a vanilla model, recursive transformers
(middle_cycle, N_r = 2, 3), MoR expert-choice (N_r = 2, 3) and MoR token-choice (N_r = 3). A
cheaper model sees more tokens in the budget: steps = budget / (FLOPs per token x tokens per
step), FLOPs per token from :func:`jaxeff.train.flops.model_flops_per_token`.

For every variant it records parameters, FLOPs, tokens, validation NLL (the paper's top-k
evaluation and the causal threshold evaluation that decoding uses), router sampling accuracy
(threshold decisions against the top-k choice), dead-token ratio, step time, and the KV-cache
footprint of recursion-wise caching and of KV sharing; and the bytes each decoding cache strategy
allocates (``kv_bytes``: vanilla, recursion-wise at full size and by capacity with
``recursion.kv_slack`` 1.0 / 1.25, shared), from the cache arrays themselves. Writes
``results.json`` and ``nll_vs_flops.png`` into ``--out``.

    python experiments/mor/run.py --mode quick   # CPU, a few minutes (CI runs this)
    python experiments/mor/run.py --mode full    # one GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.config import Config, DataConfig, MeshConfig, ModelConfig, RecursionConfig, TrainConfig
from jaxeff.data import eval_batches, prepare_dataset
from jaxeff.ops import cross_entropy, next_token_mask
from jaxeff.train.flops import model_flops_per_token
from jaxeff.train.loop import train

VARIANTS: dict[str, dict] = {
    "vanilla": {},
    "recursive_nr2": {"strategy": "middle_cycle", "n_recursions": 2},
    "recursive_nr3": {"strategy": "middle_cycle", "n_recursions": 3},
    "mor_expert_nr2": {"strategy": "middle_cycle", "n_recursions": 2, "routing": "expert"},
    "mor_expert_nr3": {"strategy": "middle_cycle", "n_recursions": 3, "routing": "expert"},
    "mor_token_nr3": {"strategy": "middle_cycle", "n_recursions": 3, "routing": "token"},
}

# L = 8 keeps the middle depth 6 divisible by both N_r = 2 and 3.
SETTINGS = {
    "quick": dict(
        model=ModelConfig(vocab_size=512, d_model=64, n_layers=8, n_heads=4, n_kv_heads=2, d_ff=192, max_seq_len=64),
        data=DataConfig(corpus="shakespeare", tokenizer="bpe", bpe_vocab_size=512),
        batch_size=16, seq_len=64, vanilla_steps=60, lr=3e-3, evals=3, eval_batches=4),
    "full": dict(
        model=ModelConfig(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, d_ff=1536,
                          max_seq_len=512, dtype="bfloat16", param_dtype="float32"),
        data=DataConfig(corpus="shakespeare+kjv", tokenizer="bpe", bpe_vocab_size=8192),
        batch_size=32, seq_len=512, vanilla_steps=400, lr=2e-3, evals=8, eval_batches=16),
}


def variant_config(mode: str, name: str, out: str, overrides: list[str]) -> tuple[Config, float]:
    s = SETTINGS[mode]
    rc = RecursionConfig(**VARIANTS[name])
    tokens_per_step = s["batch_size"] * s["seq_len"]
    probe = Config(model=s["model"], recursion=rc, train=TrainConfig(seq_len=s["seq_len"], steps=2, warmup_steps=0))
    budget = model_flops_per_token(Config(model=s["model"], train=probe.train)) * tokens_per_step * s["vanilla_steps"]
    fpt = model_flops_per_token(probe)
    steps = max(2, int(round(budget / (fpt * tokens_per_step))))
    every = max(1, steps // s["evals"])
    tc = TrainConfig(steps=steps, batch_size=s["batch_size"], seq_len=s["seq_len"], lr=s["lr"],
                     warmup_steps=max(1, steps // 10), eval_every=every, eval_batches=s["eval_batches"],
                     ckpt_every=steps, keep_ckpts=1, log_every=max(1, min(every, 25)), sample_tokens=0)
    cfg = Config(name=f"mor_{mode}_{name}", model=s["model"], data=s["data"], train=tc, mesh=MeshConfig(),
                 recursion=rc, run_dir=os.path.join(out, "runs", name))
    return cfg.override(overrides), budget


def _split(batch: dict):
    t, s = batch["tokens"], batch["segment_ids"]
    return t[:, :-1], t[:, 1:], s[:, :-1], next_token_mask(s)


def evaluate_routing(cfg: Config, graphdef, params, batches: list[dict]) -> dict:
    """Validation NLL in top-k (training-time, sees the whole sequence) and threshold (causal)
    modes, router sampling accuracy and dead-token ratio of a recursive/MoR model."""
    model_cls_is_recursive = cfg.recursion.enabled

    def nll(params, batch, mode):
        model = nnx.merge(graphdef, params)
        inputs, targets, seg, mask = _split(batch)
        kw = {"mode": mode} if model_cls_is_recursive else {}
        logits, aux = model(inputs, segment_ids=seg, **kw)
        mean, count = cross_entropy(logits, targets, mask)
        return mean * count, count, {k: v for k, v in aux.items() if k.startswith("mor/")}

    out: dict = {}
    modes = ["topk", "threshold"] if cfg.recursion.routing == "expert" else ["topk"]
    for mode in modes:
        f = jax.jit(lambda p, b, mode=mode: nll(p, b, mode))
        tot, cnt, aux_sum = 0.0, 0.0, {}
        for b in batches:
            s, c, aux = jax.device_get(f(params, {k: jnp.asarray(v) for k, v in b.items()}))
            tot, cnt = tot + float(s), cnt + float(c)
            for k, v in aux.items():
                aux_sum[k] = aux_sum.get(k, 0.0) + float(v) / len(batches)
        out[f"val_nll_{mode}"] = tot / max(cnt, 1.0)
        if mode == "topk":
            out.update(aux_sum)
    acc = [v for k, v in out.items() if k.startswith("mor/sampling_acc_r")]
    if acc:
        out["router_sampling_accuracy"] = float(np.mean(acc))
    if "mor/dead_token_ratio" in out:
        out["dead_token_ratio"] = out["mor/dead_token_ratio"]
    return out


def kv_footprint(cfg: Config, graphdef, params, tokens_BxT: np.ndarray) -> dict:
    """KV entries held by recursion-wise caching and by KV sharing after prefilling real text,
    against a vanilla cache of the same depth (recursion blocks only, and whole model)."""
    out = {}
    b, t = tokens_BxT.shape
    for strategy in ("recursion", "share"):
        rc = dataclasses.replace(cfg.recursion, kv_strategy=strategy)
        model = nnx.merge(graphdef, params)
        model.rcfg = rc
        cache = model.init_cache(b, t)
        _, cache, _ = jax.jit(lambda toks, c: model.extend(toks, c))(jnp.asarray(tokens_BxT), cache)
        held = cache.held_entries()
        recursion_blocks = (cfg.model.n_layers - 2) * held["tokens"]
        out[strategy] = {"shared_entries": held["shared"], "unique_entries": held["unique"],
                         "fraction_of_recursion_blocks": held["shared"] / recursion_blocks,
                         "fraction_of_vanilla": (held["shared"] + held["unique"]) / (cfg.model.n_layers * held["tokens"])}
    return out


def allocated_kv_bytes(model_cfg: ModelConfig, capacity: int, n_recursions=(2, 3), batch: int = 1) -> dict:
    """Bytes of the decoding caches each strategy allocates for ``batch`` sequences of ``capacity``
    tokens (``KVCache.nbytes`` for vanilla; ``RecursiveCache.nbytes()`` / ``shared_nbytes()`` for
    middle_cycle MoR expert-choice with the default capacities): every slot, written or not."""
    from jaxeff import RecursiveTransformer, Transformer

    abstract = lambda make: nnx.eval_shape(lambda: make(nnx.Rngs(0)))  # shapes only, no weights
    vanilla = abstract(lambda rngs: Transformer(model_cfg, rngs=rngs)).init_cache(batch, capacity)
    per_layer = (vanilla.nbytes() - vanilla.lengths.size * 4) / model_cfg.n_layers
    out = {"capacity": capacity, "batch": batch, "dtype": model_cfg.dtype,
           "vanilla": {"bytes": vanilla.nbytes(), "fraction_of_vanilla": 1.0}}
    strategies = {"recursion-wise, full": dict(kv_strategy="recursion"),
                  "recursion-wise, kv_slack=1.0": dict(kv_strategy="recursion", kv_slack=1.0),
                  "recursion-wise, kv_slack=1.25": dict(kv_strategy="recursion", kv_slack=1.25),
                  "shared": dict(kv_strategy="share")}
    for nr in n_recursions:
        for name, kw in strategies.items():
            rc = RecursionConfig(strategy="middle_cycle", n_recursions=nr, routing="expert", **kw)
            model = abstract(lambda rngs, rc=rc: RecursiveTransformer(model_cfg, rc, rngs=rngs))
            cache = model.init_cache(batch, capacity)
            blocks = per_layer * (model_cfg.n_layers - 2)  # the recursion blocks' share of a vanilla cache
            out[f"N_r={nr}, {name}"] = {"bytes": cache.nbytes(), "shared_bytes": cache.shared_nbytes(),
                                        "fraction_of_vanilla": cache.nbytes() / vanilla.nbytes(),
                                        "shared_fraction_of_recursion_blocks": cache.shared_nbytes() / blocks,
                                        "stored_capacities": list(model.stored_capacities(capacity))}
    return out


def run_variant(mode: str, name: str, out: str, overrides: list[str], verbose: bool) -> dict:
    cfg, budget = variant_config(mode, name, out, overrides)
    print(f"[mor] {name}: {cfg.train.steps} steps, {model_flops_per_token(cfg) / 1e6:.2f} MFLOP/token", flush=True)
    t0 = time.perf_counter()
    summary = train(cfg, verbose=verbose)
    wall = time.perf_counter() - t0
    tps = cfg.train.batch_size * cfg.train.seq_len
    curve = []
    with open(os.path.join(cfg.resolved_run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "val_loss" in r:
                curve.append({"step": r["step"], "flops": r["step"] * tps * model_flops_per_token(cfg),
                              "val_nll": r["val_loss"]})
    res = {"variant": name, "recursion": dataclasses.asdict(cfg.recursion), "params": int(summary["params"]),
           "flops_per_token": model_flops_per_token(cfg), "flop_budget": budget,
           "train_flops": cfg.train.steps * tps * model_flops_per_token(cfg), "steps": cfg.train.steps,
           "tokens": cfg.train.steps * tps, "val_nll": summary["val_loss"], "curve": curve,
           "tokens_per_s": summary["tokens_per_s"], "step_time_s": tps / summary["tokens_per_s"],
           "wall_s": wall, "device": summary["device"]}
    if cfg.recursion.enabled:
        ds = prepare_dataset(cfg.data, cfg.train.seq_len,
                             tokenizer_dir=os.path.join(cfg.resolved_run_dir, "tokenizer"))
        batches = eval_batches(ds.val_tokens_NxS, ds.val_segment_ids_NxS, cfg.train.batch_size, cfg.train.eval_batches)
        res.update(evaluate_routing(cfg, summary["graphdef"], summary["final_params"], batches))
        if cfg.recursion.routing != "token":
            res["kv_cache"] = kv_footprint(cfg, summary["graphdef"], summary["final_params"],
                                           ds.val_tokens_NxS[:4, :cfg.train.seq_len])
    return res


def check_orderings(results: dict[str, dict]) -> list[dict]:
    """The paper's claims, evaluated on these numbers (no tuning towards them)."""
    nll = {k: v["val_nll"] for k, v in results.items()}
    claims = []
    for nr in (2, 3):
        a, b = f"mor_expert_nr{nr}", f"recursive_nr{nr}"
        if a in nll and b in nll:
            claims.append({"claim": f"NLL(MoR expert-choice, N_r={nr}) < NLL(recursive, N_r={nr})",
                           "values": [nll[a], nll[b]], "holds": nll[a] < nll[b]})
    if "mor_expert_nr3" in nll and "mor_token_nr3" in nll:
        claims.append({"claim": "NLL(expert-choice, N_r=3) < NLL(token-choice, N_r=3)",
                       "values": [nll["mor_expert_nr3"], nll["mor_token_nr3"]],
                       "holds": nll["mor_expert_nr3"] < nll["mor_token_nr3"]})
    for k, v in results.items():
        if "router_sampling_accuracy" in v and v["recursion"]["routing"] == "expert":
            claims.append({"claim": f"router sampling accuracy >= 0.99 ({k})",
                           "values": [v["router_sampling_accuracy"]], "holds": v["router_sampling_accuracy"] >= 0.99})
    return claims


def plot(results: dict[str, dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        xs = [p["flops"] for p in r["curve"]]
        ys = [p["val_nll"] for p in r["curve"]]
        ax.plot(xs, ys, marker="o", ms=3, label=f"{name} ({r['params'] / 1e6:.1f}M)")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation NLL (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=sorted(SETTINGS), default="quick")
    p.add_argument("--out", default=None, help="output folder (default experiments/mor/results_<mode>)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--set", action="append", default=[], help="config override for every variant, key=value")
    p.add_argument("--fresh", action="store_true", help="retrain variants that already have results")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), f"results_{a.mode}")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json")
    saved = json.load(open(path)) if os.path.exists(path) and not a.fresh else {"variants": {}}
    results = saved["variants"]
    tok_dir = os.path.join(out, "runs", "_tokenizer")
    trained = False
    for name in names:
        if name in results and not a.fresh:
            print(f"[mor] {name}: kept from {path}")
            continue
        trained = True
        run_dir = os.path.join(out, "runs", name)
        shutil.rmtree(run_dir, ignore_errors=True)
        if os.path.isdir(tok_dir):  # one tokenizer for all variants: same data, and no re-training
            shutil.copytree(tok_dir, os.path.join(run_dir, "tokenizer"))
        results[name] = run_variant(a.mode, name, out, a.set, a.verbose)
        if not os.path.isdir(tok_dir):
            shutil.copytree(os.path.join(run_dir, "tokenizer"), tok_dir)
        r = results[name]
        print(f"[mor] {name}: val NLL {r['val_nll']:.4f}, {r['params'] / 1e6:.2f}M params, {r['tokens']:,} tokens, "
              f"{r['train_flops']:.3g} FLOPs" + (f", sampling acc {r['router_sampling_accuracy']:.4f}"
                                                 if "router_sampling_accuracy" in r else ""), flush=True)
        report = {"mode": a.mode, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
                  "date": time.strftime("%Y-%m-%d"), "variants": results, "claims": check_orderings(results)}
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(path + ".tmp", path)
    report = json.load(open(path)) if os.path.exists(path) else {"mode": a.mode, "variants": {}, "claims": []}
    report["kv_bytes"] = allocated_kv_bytes(SETTINGS[a.mode]["model"], SETTINGS[a.mode]["seq_len"])
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)
    for name, b in report["kv_bytes"].items():
        if isinstance(b, dict):
            print(f"[kv bytes] {name}: {b['bytes']:,} ({b['fraction_of_vanilla']:.3f} of vanilla)")
    for c in report["claims"]:
        print(f"[claim] {'HOLDS' if c['holds'] else 'DOES NOT HOLD'}: {c['claim']}: "
              + ", ".join(f"{v:.4f}" for v in c["values"]))
    png = os.path.join(out, "nll_vs_flops.png")
    if trained or not os.path.exists(png):
        plot(results, png, f"MoR vs recursive vs vanilla at equal FLOPs ({a.mode} mode, {report.get('device')})")
    print(f"[mor] wrote {path} and nll_vs_flops.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
