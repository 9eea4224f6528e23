"""BlockFFN against dense, top-k MoE and ReMoE, and the ablation of its two losses (Song et al.,
2025, arXiv 2507.08771, Tables 2 and 5).

Every variant trains on the same corpus and batches. The MoE variants share the total FFN
parameters of the dense model and one active budget (``top_k`` of ``n_experts`` experts: the
top-k model's k, ReMoE's target sparsity 1 - k / E; BlockFFN's sparsity is what it learns).
BlockFFN is trained with both losses (AL+CS) and without each: none, AL only, CS only.

After training each model is read on validation batches: token-level sparsity (TLS),
chunk-level sparsity CLS_L for L = 1..64, the reuse ratio of consecutive tokens, SRP(8) and
SCH(8, 2x active experts) (arXiv 2505.16056), and the validation loss. The paper's directions
are checked on these numbers as claims (none tuned towards them). Writes ``results.json`` and
``blockffn.png`` (CLS_L curves, TLS / CLS_8 during training) into ``--out``.

    python experiments/blockffn/run.py --mode quick   # CPU, a few minutes (CI runs this)
    python experiments/blockffn/run.py --mode full    # one GPU (the paper's 0.1B shapes)
    python experiments/blockffn/run.py --mode full --steps 800 --jobs 2   # as run on one H200

``--steps`` shortens the run (the warm-up, the log and evaluation intervals and BlockFFN's CS
schedule scale with it). ``--jobs N`` trains the variants in N processes at once on the one
device: the compiles and the host's work overlap. On an H200 (141 GB) four 0.1B jobs reached
~140 GB and one ran out of memory; two BlockFFN jobs held ~100 GB. The tokens/s each
variant then reports is a share of the device, not its throughput (``bench_train.py`` measures
that). Each finished variant is merged into ``results.json`` under a file lock, so a run cut
off keeps what finished and a later call trains only what is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
from flax import nnx

from jaxeff.config import Config, DataConfig, MeshConfig, ModelConfig, MoEConfig, TrainConfig
from jaxeff.data import eval_batches, prepare_dataset
from jaxeff.moe.analysis import layer_activations, routing_report
from jaxeff.train.flops import model_flops_per_token
from jaxeff.train.loop import train

VARIANTS: dict[str, dict] = {
    "dense": {},
    "topk": {"kind": "topk"},
    "remoe": {"kind": "remoe"},
    "blockffn_none": {"kind": "blockffn", "al_coef": 0.0, "cs_coef": 0.0},
    "blockffn_al": {"kind": "blockffn", "cs_coef": 0.0},
    "blockffn_cs": {"kind": "blockffn", "al_coef": 0.0},
    "blockffn": {"kind": "blockffn"},  # AL + CS, the paper's model
}

# Dense SwiGLU: 3 D d_ff weights per layer; 16 non-gated experts of width F: 2 D F E (+ the router).
SETTINGS = {
    "quick": dict(
        model=ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192, max_seq_len=64),
        # top-k on the dense expert path: the same values as lax.ragged_dot (tests/moe/test_experts.py),
        # faster than XLA:CPU's ragged_dot at this size
        moe=dict(n_experts=16, expert_dim=18, top_k=3, cs_chunk_len=64, cs_hold_steps=60, cs_window=20,
                 expert_impl="dense"),
        data=DataConfig(corpus="shakespeare", tokenizer="bpe", bpe_vocab_size=512),
        steps=240, batch_size=16, seq_len=64, lr=3e-3, eval_every=120, eval_batches=4, analysis_batches=2),
    # The paper's small setting (d_h 768, d_e 64, N_e 48, 16 layers), dense width matched in total
    # parameters (3 x 2048 = 2 x 48 x 64), top-k 10 of 48 (TLS ~79%, as its Table 2 top-k).
    # The corpus is 2174 training rows of 1024 tokens (2.2M tokens) and 55 validation rows, so
    # two evaluation batches of 32 cover every validation row (rows 0-8 twice).
    # Top-k computes every expert and keeps its k (expert_impl 'dense', the same values as a
    # grouped matmul): 48 experts of width 64 are one 768 x 3072 matmul, far faster in training
    # than lax.ragged_dot on a GPU, and tokamax's kernels compiled for over 200 s on an H200.
    "full": dict(
        model=ModelConfig(vocab_size=32768, d_model=768, n_layers=16, n_heads=12, n_kv_heads=12, d_ff=2048,
                          max_seq_len=1024, dtype="bfloat16", param_dtype="float32"),
        moe=dict(n_experts=48, expert_dim=64, top_k=10, cs_chunk_len=64, expert_impl="dense"),
        data=DataConfig(corpus="shakespeare+kjv", tokenizer="bpe", bpe_vocab_size=32768),
        steps=8000, batch_size=32, seq_len=1024, lr=1e-3, eval_every=1000, eval_batches=2, analysis_batches=2),
}

SRP_LEN, RHO = 8, 2.0


def variant_config(mode: str, name: str, out: str, overrides: list[str], steps: int | None = None) -> Config:
    """The config of variant ``name``; ``steps`` (default: the mode's) rescales the warm-up, the
    log and evaluation intervals and the CS scheduler's hold and window in proportion."""
    s = SETTINGS[mode]
    steps = s["steps"] if steps is None else steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    scale = steps / s["steps"]
    moe_kw = {**s["moe"], **VARIANTS[name]}
    for key in ("cs_hold_steps", "cs_window"):
        moe_kw[key] = max(1, round(moe_kw.get(key, getattr(MoEConfig, key)) * scale))
    moe = MoEConfig(**moe_kw) if VARIANTS[name] else MoEConfig()
    tc = TrainConfig(steps=steps, batch_size=s["batch_size"], seq_len=s["seq_len"], lr=s["lr"],
                     warmup_steps=max(1, steps // 20), eval_every=max(1, round(s["eval_every"] * scale)),
                     eval_batches=s["eval_batches"], ckpt_every=steps, keep_ckpts=1, log_every=max(1, steps // 40),
                     sample_tokens=0)
    cfg = Config(name=f"blockffn_{mode}_{name}", model=dataclasses.replace(s["model"], moe=moe), data=s["data"],
                 train=tc, mesh=MeshConfig(), run_dir=os.path.join(out, "runs", name))
    return cfg.override(overrides)


def _curves(run_dir: str) -> dict:
    train_c, val_c = [], []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                train_c.append({k: r[k] for k in ("step", "loss", "moe/tls", "moe/cls8", "sched/moe_cs",
                                                  "sched/remoe_l1") if k in r})
            if "val_loss" in r:
                val_c.append({"step": r["step"], "val_loss": r["val_loss"]})
    return {"train": train_c, "val": val_c}


_VAL: dict = {}  # (data settings, seq_len, batches) -> validation tokens and segment ids, shared by the variants


def analyse(cfg: Config, summary: dict, n_batches: int) -> dict:
    """The routing metrics of the trained model on validation batches (means over its MoE layers)."""
    if not cfg.model.moe.enabled:
        return {}
    key = (cfg.data, cfg.train.seq_len, cfg.train.batch_size, n_batches)
    if key not in _VAL:
        ds = prepare_dataset(cfg.data, cfg.train.seq_len,
                             tokenizer_dir=os.path.join(cfg.resolved_run_dir, "tokenizer"))
        batches = eval_batches(ds.val_tokens_NxS, ds.val_segment_ids_NxS, cfg.train.batch_size, n_batches)
        _VAL[key] = (np.concatenate([b["tokens"][:, :-1] for b in batches]),
                     np.concatenate([b["segment_ids"][:, :-1] for b in batches]))
    tokens, seg = _VAL[key]
    model = nnx.merge(summary["graphdef"], jax.device_get(summary["final_params"]))
    acts = layer_activations(model, tokens, seg)
    return routing_report(acts, seg != 0, seg, seg_len=SRP_LEN, rho=RHO)


def run_variant(mode: str, name: str, out: str, overrides: list[str], verbose: bool, steps: int | None = None,
                jobs: int = 1) -> dict:
    cfg = variant_config(mode, name, out, overrides, steps)
    print(f"[blockffn] {name}: {cfg.train.steps} steps, {model_flops_per_token(cfg) / 1e6:.2f} MFLOP/token", flush=True)
    t0 = time.perf_counter()
    summary = train(cfg, verbose=verbose)
    wall = time.perf_counter() - t0
    res = {"variant": name, "moe": dataclasses.asdict(cfg.model.moe), "params": int(summary["params"]),
           "flops_per_token": model_flops_per_token(cfg), "steps": cfg.train.steps,
           "tokens": cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len, "val_loss": summary["val_loss"],
           "val_ppl": summary["val_ppl"], "tokens_per_s": summary["tokens_per_s"], "wall_s": wall,
           "device": summary["device"], "concurrent_jobs": jobs, "curves": _curves(cfg.resolved_run_dir)}
    res.update(analyse(cfg, summary, SETTINGS[mode]["analysis_batches"]))
    return res


def best_val(r: dict) -> dict:
    """The lowest point ``{"step", "val_loss"}`` of a variant's validation curve (its final loss
    when the curve is missing)."""
    val = r.get("curves", {}).get("val") or [{"step": r.get("steps", 0), "val_loss": r["val_loss"]}]
    return min(val, key=lambda c: c["val_loss"])


def check_directions(results: dict[str, dict]) -> list[dict]:
    """The paper's directions (its Tables 2 and 5, 0.1B scale), evaluated on these numbers."""
    g = lambda v, k: results[v].get(k) if v in results else None  # noqa: E731
    claims = []

    def claim(text, values, holds):
        if all(v is not None for v in values):
            claims.append({"claim": text, "values": values, "holds": bool(holds(*values))})

    claim("BlockFFN (AL+CS) reaches TLS >= 0.7 (paper: 0.805)", [g("blockffn", "tls")], lambda t: t >= 0.7)
    claim("BlockFFN (AL+CS) reaches CLS_8 >= 0.6 (paper: 0.714)", [g("blockffn", "cls_8")], lambda c: c >= 0.6)
    claim("CLS_8: BlockFFN (AL+CS) > top-k (paper: 0.714 vs 0.492)", [g("blockffn", "cls_8"), g("topk", "cls_8")],
          lambda a, b: a > b)
    claim("CLS_8: BlockFFN (AL+CS) > ReMoE (paper: 0.714 vs 0.424)", [g("blockffn", "cls_8"), g("remoe", "cls_8")],
          lambda a, b: a > b)
    claim("TLS: top-k within 0.05 of BlockFFN (AL+CS) (paper: 0.792 vs 0.805)",
          [g("topk", "tls"), g("blockffn", "tls")], lambda a, b: abs(a - b) <= 0.05)
    claim("CLS_8: AL only > no loss (paper: 0.526 vs 0.149)", [g("blockffn_al", "cls_8"), g("blockffn_none", "cls_8")],
          lambda a, b: a > b)
    claim("CLS_8: AL+CS > CS only at similar TLS (paper: 0.714 vs 0.676)",
          [g("blockffn", "cls_8"), g("blockffn_cs", "cls_8")], lambda a, b: a > b)
    claim("TLS: CS only > AL only (paper: 0.817 vs 0.636)", [g("blockffn_cs", "tls"), g("blockffn_al", "tls")],
          lambda a, b: a > b)
    claim("val loss: BlockFFN (AL+CS) <= dense + 0.05 nats (paper: PPL 14.88 vs 14.90)",
          [g("blockffn", "val_loss"), g("dense", "val_loss")], lambda a, b: a - b <= 0.05)
    best = lambda v: best_val(results[v])["val_loss"] if v in results else None  # noqa: E731
    claim("best val loss (the curve's minimum): BlockFFN (AL+CS) <= dense + 0.05 nats",
          [best("blockffn"), best("dense")], lambda a, b: a - b <= 0.05)
    claim("SRP(8): BlockFFN (AL+CS) > top-k", [g("blockffn", f"srp_{SRP_LEN}"), g("topk", f"srp_{SRP_LEN}")],
          lambda a, b: a > b)
    return claims


def plot(results: dict[str, dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    color = {name: f"C{i}" for i, name in enumerate(results)}  # one colour per variant in every panel
    moe = {k: v for k, v in results.items() if "tls" in v}
    lengths = sorted(int(k.split("_")[1]) for k in next(iter(moe.values()), {}) if k.startswith("cls_"))
    for name, r in moe.items():
        axes[0].plot(lengths, [r[f"cls_{n}"] for n in lengths], marker="o", ms=3, label=name, color=color[name])
        steps = [p["step"] for p in r["curves"]["train"] if "moe/tls" in p]
        axes[1].plot(steps, [p["moe/tls"] for p in r["curves"]["train"] if "moe/tls" in p], label=name, color=color[name])
        axes[2].plot(steps, [p["moe/cls8"] for p in r["curves"]["train"] if "moe/cls8" in p], label=name,
                     color=color[name])
    for name, r in results.items():
        val = r.get("curves", {}).get("val", [])
        axes[3].plot([p["step"] for p in val], [p["val_loss"] for p in val], marker="o", ms=3, label=name,
                     color=color[name])
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("chunk length L")
    axes[0].set_ylabel("CLS_L (validation)")
    for ax, what in ((axes[1], "TLS"), (axes[2], "CLS_8")):
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{what} (training batches)")
    axes[3].set_xlabel("training step")
    axes[3].set_ylabel("validation loss (nats/token)")
    for ax in axes:
        ax.grid(alpha=0.3)
    for ax in axes[:3]:
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7)
    axes[3].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict[str, dict]) -> str:
    rows = ["| model | params | val loss | best val loss (step) | TLS | CLS_8 | reuse | SRP(8) | SCH(8, 2x) |",
            "|---|---|---|---|---|---|---|---|---|"]
    f = lambda r, k: f"{r[k]:.3f}" if k in r else "-"  # noqa: E731
    for name, r in results.items():
        best = best_val(r)
        rows.append(f"| {name} | {r['params'] / 1e6:.2f}M | {r['val_loss']:.4f} | {best['val_loss']:.4f} ({best['step']}) | "
                    f"{f(r, 'tls')} | {f(r, 'cls_8')} | "
                    f"{f(r, 'reuse')} | {f(r, f'srp_{SRP_LEN}')} | {f(r, f'sch_{SRP_LEN}_rho{RHO:g}')} |")
    return "\n".join(rows)


def _update(path: str, change=lambda report: report) -> dict:
    """Applies ``change`` to the report at ``path`` under an exclusive file lock (concurrent jobs
    each merge their own variants), re-evaluates the claims and writes it atomically; returns it."""
    lock_path = os.path.join(os.path.dirname(path), "runs", "results.lock")  # runs/ is not tracked
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            report = json.load(open(path)) if os.path.exists(path) else {"variants": {}}
            report = change(report)
            report["claims"] = check_directions(report["variants"])
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(report, f, indent=1)
            os.replace(tmp, path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return report


def _train_here(a, names: list[str], out: str, path: str, jobs: int) -> None:
    """Trains ``names`` one after another in this process, merging each result as it finishes."""
    tok_dir = os.path.join(out, "runs", "_tokenizer")
    for name in names:
        run_dir = os.path.join(out, "runs", name)
        shutil.rmtree(run_dir, ignore_errors=True)
        if os.path.isdir(tok_dir):  # one tokenizer for all variants: the same tokens, trained once
            shutil.copytree(tok_dir, os.path.join(run_dir, "tokenizer"))
        r = run_variant(a.mode, name, out, a.set, a.verbose, a.steps, jobs)
        if not os.path.isdir(tok_dir):
            shutil.copytree(os.path.join(run_dir, "tokenizer"), tok_dir)
        sparsity = (f", TLS {r['tls']:.3f}, CLS_8 {r['cls_8']:.3f}, SRP(8) {r[f'srp_{SRP_LEN}']:.3f}"
                    if "tls" in r else "")
        print(f"[blockffn] {name}: val loss {r['val_loss']:.4f}{sparsity} ({r['wall_s']:.0f} s)", flush=True)
        meta = {"mode": a.mode, "device": jax.devices()[0].device_kind, "n_devices": jax.device_count(),
                "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}
        _update(path, lambda rep, name=name, r=r: {**rep, **meta, "variants": {**rep["variants"], name: r}})


def _last_line(log: str) -> str:
    try:
        with open(log, "rb") as f:
            lines = [x for x in f.read()[-4096:].replace(b"\r", b"\n").split(b"\n") if x.strip()]
        return lines[-1].decode(errors="replace")[:160] if lines else ""
    except OSError:
        return ""


def _train_jobs(a, names: list[str], out: str) -> int:
    """Trains ``names`` in ``a.jobs`` concurrent child processes (round-robin groups) on the one
    device; returns the number of jobs that failed. The tokenizer is built first, here, so the
    children share it; each child may grow its device memory up to 1.5 / jobs of the device."""
    tok_dir = os.path.join(out, "runs", "_tokenizer")
    if not os.path.isdir(tok_dir):
        cfg = variant_config(a.mode, names[0], out, a.set, a.steps)
        prepare_dataset(cfg.data, cfg.train.seq_len, tokenizer_dir=tok_dir)
    groups = [g for g in (names[i::a.jobs] for i in range(a.jobs)) if g]
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{min(0.9, 1.5 / len(groups)):.2f}")
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    procs = []
    for i, group in enumerate(groups):
        cmd = [sys.executable, os.path.abspath(__file__), "--mode", a.mode, "--out", out, "--variants", ",".join(group),
               "--child-of", str(len(groups))] + (["--steps", str(a.steps)] if a.steps else [])
        cmd += [x for kv in a.set for x in ("--set", kv)] + (["--verbose"] if a.verbose else [])
        log = os.path.join(out, "logs", f"job{i}_{'+'.join(group)}.log")
        procs.append((group, log, subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)))
        print(f"[blockffn] job {i}: {', '.join(group)} (log {log})", flush=True)
    t0 = time.perf_counter()
    while any(p.poll() is None for *_, p in procs):
        time.sleep(1.0)
        if time.perf_counter() - t0 >= 60:
            t0 = time.perf_counter()
            for group, log, p in procs:
                state = "running" if p.poll() is None else f"exit {p.returncode}"
                print(f"[blockffn] {'+'.join(group)} ({state}): {_last_line(log)}", flush=True)
    failed = 0
    for group, log, p in procs:
        if p.returncode != 0:
            failed += 1
            print(f"[blockffn] job {'+'.join(group)} failed (exit {p.returncode}); the end of {log}:\n"
                  + open(log, errors="replace").read()[-3000:], flush=True)
    return failed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=sorted(SETTINGS), default="quick")
    p.add_argument("--out", default=None, help="output folder (default experiments/blockffn/results_<mode>)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--set", action="append", default=[], help="config override for every variant, key=value")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: the mode's); warm-up, intervals and the CS schedule scale with it")
    p.add_argument("--jobs", type=int, default=1, help="variants trained at once, in separate processes on one device")
    p.add_argument("--child-of", type=int, default=0, help=argparse.SUPPRESS)  # a job of a --jobs run: no report
    p.add_argument("--fresh", action="store_true", help="start a new results.json (drops every kept variant)")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    if a.steps is not None and a.steps <= 0:
        p.error(f"--steps must be a positive integer, got {a.steps}")
    if a.jobs < 1:
        p.error(f"--jobs must be >= 1, got {a.jobs}")
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), f"results_{a.mode}")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json")
    if a.fresh and os.path.exists(path):
        os.remove(path)
    kept = _update(path)["variants"]
    for name in names:
        if name in kept:
            print(f"[blockffn] {name}: kept from {path}")
    todo = [n for n in names if n not in kept]
    failed = 0
    if a.jobs > 1 and len(todo) > 1:
        failed = _train_jobs(a, todo, out)
    else:
        _train_here(a, todo, out, path, a.child_of or 1)
    if a.child_of:
        return 0
    report = _update(path)  # the claims as the current rules read the kept results
    results = report["variants"]
    print(table(results))
    for c in report["claims"]:
        print(f"[claim] {'HOLDS' if c['holds'] else 'DOES NOT HOLD'}: {c['claim']}: "
              + ", ".join(f"{v:.4f}" for v in c["values"]))
    if results:
        plot(results, os.path.join(out, "blockffn.png"),
             f"BlockFFN vs top-k vs ReMoE, losses ablated ({a.mode} mode, {report.get('device', '?')})")
        print(f"[blockffn] wrote {path} and blockffn.png")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
