"""Why does MoR's router sampling accuracy stay below the paper's ~0.99? (Bae et al., 2025,
arXiv 2507.10524, section 2.2.1 and appendix; jaxeff issue 18.)

The full experiment (``run.py --mode full``) reached 0.92 (N_r = 2) and 0.95 (N_r = 3) after
~500 steps. This script trains MoR expert-choice models at small scale on the CPU and varies one
thing at a time against a base run (middle_cycle, N_r = 3, sigmoid gate, auxiliary BCE loss at
1e-3, capacities 1, 2/3, 1/3):

* training length: the base run is long (``steps``), and its curve is read at 500, 1000, ...;
  a short run of 500 steps has its own (completed) learning-rate schedule;
* the auxiliary loss coefficient: 1e-2 and 1e-1;
* the gate function: tanh;
* the auxiliary router (a separate router on stop-gradient inputs) instead of the loss;
* the step-1 router: with capacity 1.0 the first step keeps every token, so jaxeff neither
  routes nor trains it (no BCE) and leaves it out of the average; the official code trains it
  with the BCE against all-ones targets and averages its (trivially high) accuracy with the
  others. ``step1_routed`` gives step 1 the capacity 1 - 1/T, so its router is trained and
  counted, and every summary also reports the official average, mean(1, acc_2, ..., acc_Nr);
* N_r = 2 (the full experiment's other expert-choice variant).

For every run: the training curve of ``mor/sampling_acc_r*`` (each logged step's own batch),
validation accuracy per step at the end (top-k forward on held-out text), and the fraction of
step-1 logits that are >= 0 (what an all-ones target would score). Writes ``results.json`` and
``accuracy_vs_steps.png`` into ``--out``.

    python experiments/mor/router_accuracy.py --mode quick   # < 1 minute (tests run this)
    python experiments/mor/router_accuracy.py --mode full    # the CPU investigation (~1 hour on a 2-core CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import _split  # noqa: E402  (the MoR experiment's batch split)

from jaxeff.config import Config, DataConfig, MeshConfig, ModelConfig, RecursionConfig, TrainConfig  # noqa: E402
from jaxeff.data import eval_batches, prepare_dataset  # noqa: E402
from jaxeff.train.loop import train  # noqa: E402

BASE = dict(strategy="middle_cycle", n_recursions=3, routing="expert")

SETTINGS = {
    "quick": dict(
        model=ModelConfig(vocab_size=512, d_model=32, n_layers=5, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=32),
        data=DataConfig(corpus="shakespeare", tokenizer="bpe", bpe_vocab_size=512),
        batch_size=8, seq_len=32, steps=10, short_steps=5, lr=3e-3, log_every=5, eval_batches=1,
        runs=("base",)),
    "full": dict(
        model=ModelConfig(vocab_size=1024, d_model=64, n_layers=8, n_heads=4, n_kv_heads=2, d_ff=192,
                          max_seq_len=128),
        data=DataConfig(corpus="shakespeare+kjv", tokenizer="bpe", bpe_vocab_size=1024),
        batch_size=8, seq_len=128, steps=3000, other_steps=2000, short_steps=500, lr=3e-3, log_every=25,
        eval_batches=16,
        runs=("base", "short", "coef_1e-2", "coef_1e-1", "tanh", "aux_router", "step1_routed", "nr2")),
}


def run_recursion(name: str, seq_len: int) -> dict:
    """The RecursionConfig fields of one run (everything else is the base run's)."""
    step1 = f"{1 - 1 / seq_len},{2 / 3},{1 / 3}"
    return {"base": {}, "short": {}, "coef_1e-2": {"aux_loss_coef": 1e-2}, "coef_1e-1": {"aux_loss_coef": 1e-1},
            "tanh": {"router_func": "tanh"}, "aux_router": {"aux_router": True},
            "step1_routed": {"capacities": step1}, "nr2": {"n_recursions": 2}}[name]


def run_config(mode: str, name: str, out: str) -> Config:
    s = SETTINGS[mode]
    steps = {"base": s["steps"], "short": s["short_steps"]}.get(name, s.get("other_steps", s["steps"]))
    rc = RecursionConfig(**{**BASE, **run_recursion(name, s["seq_len"])})
    tc = TrainConfig(steps=steps, batch_size=s["batch_size"], seq_len=s["seq_len"], lr=s["lr"],
                     warmup_steps=max(1, min(100, steps // 10)), eval_every=steps, eval_batches=s["eval_batches"],
                     ckpt_every=steps, keep_ckpts=1, log_every=s["log_every"], sample_tokens=0)
    return Config(name=f"mor_router_{mode}_{name}", model=s["model"], data=s["data"], train=tc, mesh=MeshConfig(),
                  recursion=rc, run_dir=os.path.join(out, "runs", name))


def official_average(accs: list[float], capacities: tuple[float, ...]) -> float:
    """The official code's number: the mean over *every* recursion step, a capacity-1.0 step
    counted at accuracy 1 (all its BCE targets are 1 and it learns them at once)."""
    routed = iter(accs)
    per_step = [1.0 if c >= 1.0 else next(routed) for c in capacities]
    return float(np.mean(per_step))


def read_curve(path: str, n_r: int) -> list[dict]:
    curve = []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            accs = {k: v for k, v in r.items() if k.startswith("mor/sampling_acc_r")}
            if accs:
                curve.append({"step": r["step"], "loss": r["loss"], **accs,
                              **{k: v for k, v in r.items() if k.startswith("mor/router_bce_r")}})
    return curve


def window_means(curve: list[dict], keys: list[str], every: int) -> list[dict]:
    """Mean of each key over the logged steps in (s - every, s], s = every, 2 every, ...: each
    logged point is one batch, so single points are noisy."""
    out = []
    last = curve[-1]["step"] if curve else 0
    for s in range(every, last + 1, every):
        pts = [p for p in curve if s - every < p["step"] <= s]
        if pts:
            out.append({"step": s, **{k: float(np.mean([p[k] for p in pts])) for k in keys if k in pts[0]}})
    return out


def evaluate(cfg: Config, graphdef, params, batches: list[dict]) -> dict:
    """Validation sampling accuracy per routed step (top-k forward), the BCE, and how many
    step-1 logits are >= 0 (the threshold rule's keep rate at step 1)."""
    def fwd(params, batch):
        model = nnx.merge(graphdef, params)
        inputs, _, seg, _ = _split(batch)
        _, aux = model(inputs, segment_ids=seg, mode="topk")
        h = model.embed(inputs)
        if model.first is not None:  # the step-1 router reads the first layer's output
            from jaxeff.nn import self_attend
            from jaxeff.models.transformer import model_mask, token_positions
            mask = model_mask(model.cfg, inputs.shape, seg)
            h, _, _ = model.first(h, token_positions(inputs, None), self_attend(mask, model.first.attn.impl))
        logit, decide = model.router.logits(0, h)
        valid = seg != 0
        keep1 = jnp.where(valid, decide >= 0, False).sum() / jnp.maximum(valid.sum(), 1)
        return {**{k: v for k, v in aux.items() if k.startswith("mor/")}, "step1_keep": keep1}

    f = jax.jit(fwd)
    sums: dict[str, float] = {}
    for b in batches:
        m = jax.device_get(f(params, {k: jnp.asarray(v) for k, v in b.items()}))
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v) / len(batches)
    return sums


def run_one(mode: str, name: str, out: str, verbose: bool) -> dict:
    cfg = run_config(mode, name, out)
    rc = cfg.recursion
    print(f"[router] {name}: {cfg.train.steps} steps, recursion {run_recursion(name, cfg.train.seq_len) or 'base'}",
          flush=True)
    t0 = time.perf_counter()
    summary = train(cfg, verbose=verbose)
    wall = time.perf_counter() - t0
    curve = read_curve(os.path.join(cfg.resolved_run_dir, "metrics.jsonl"), rc.n_recursions)
    acc_keys = sorted({k for p in curve for k in p if k.startswith("mor/sampling_acc_r")})
    ds = prepare_dataset(cfg.data, cfg.train.seq_len, tokenizer_dir=os.path.join(cfg.resolved_run_dir, "tokenizer"))
    batches = eval_batches(ds.val_tokens_NxS, ds.val_segment_ids_NxS, cfg.train.batch_size, cfg.train.eval_batches)
    val = evaluate(cfg, summary["graphdef"], summary["final_params"], batches)
    val_accs = [val[k] for k in acc_keys]
    every = max(cfg.train.log_every, cfg.train.steps // 12)
    windows = window_means(curve, acc_keys + ["loss"], every)
    for w in windows:
        w["mean_acc"] = float(np.mean([w[k] for k in acc_keys]))
        w["official_acc"] = official_average([w[k] for k in acc_keys], rc.resolved_capacities)
    return {"run": name, "recursion": {k: getattr(rc, k) for k in ("n_recursions", "router_func", "aux_router",
                                                                    "aux_loss_coef", "resolved_capacities")},
            "steps": cfg.train.steps, "params": int(summary["params"]), "val_nll": summary["val_loss"],
            "wall_s": wall, "curve": curve, "windows": windows,
            "val": val, "val_mean_acc": float(np.mean(val_accs)),
            "val_official_acc": official_average(val_accs, rc.resolved_capacities),
            "val_step1_keep": val["step1_keep"]}


def plot(results: dict[str, dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, r in results.items():
        xs = [w["step"] for w in r["windows"]]
        ax.plot(xs, [w["mean_acc"] for w in r["windows"]], marker="o", ms=3, label=name)
    ax.axhline(0.99, color="k", ls="--", lw=0.8, label="paper ~0.99")
    ax.set_xlabel("training step")
    ax.set_ylabel("router sampling accuracy (mean over routed steps)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=sorted(SETTINGS), default="quick")
    p.add_argument("--out", default=None, help="output folder (default experiments/mor/results_router_accuracy)")
    p.add_argument("--runs", default=None, help="comma-separated subset of the mode's runs")
    p.add_argument("--fresh", action="store_true", help="retrain runs that already have results")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    s = SETTINGS[a.mode]
    names = [v.strip() for v in (a.runs or ",".join(s["runs"])).split(",") if v.strip()]
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_router_accuracy")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json")
    saved = json.load(open(path)) if os.path.exists(path) and not a.fresh else {"runs": {}}
    results = saved["runs"]
    tok_dir = os.path.join(out, "runs", "_tokenizer")
    for name in names:
        if name in results and not a.fresh:
            print(f"[router] {name}: kept from {path}")
            continue
        run_dir = os.path.join(out, "runs", name)
        shutil.rmtree(run_dir, ignore_errors=True)
        if os.path.isdir(tok_dir):
            shutil.copytree(tok_dir, os.path.join(run_dir, "tokenizer"))
        results[name] = r = run_one(a.mode, name, out, a.verbose)
        if not os.path.isdir(tok_dir):
            shutil.copytree(os.path.join(run_dir, "tokenizer"), tok_dir)
        print(f"[router] {name}: val acc {r['val_mean_acc']:.4f} (official average {r['val_official_acc']:.4f}), "
              f"step-1 keep {r['val_step1_keep']:.3f}, val NLL {r['val_nll']:.4f}, {r['wall_s']:.0f} s", flush=True)
        report = {"mode": a.mode, "device": jax.devices()[0].device_kind, "hardware": "2-core CPU" if
                  jax.devices()[0].platform == "cpu" else jax.devices()[0].device_kind, "jax": jax.__version__,
                  "date": time.strftime("%Y-%m-%d"), "settings": {k: (v if not hasattr(v, "__dataclass_fields__")
                                                                      else repr(v)) for k, v in s.items()},
                  "runs": results}
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(path + ".tmp", path)
    plot(results, os.path.join(out, "accuracy_vs_steps.png"),
         f"MoR expert-choice router sampling accuracy ({a.mode} mode, CPU)")
    print(f"[router] wrote {path} and accuracy_vs_steps.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
