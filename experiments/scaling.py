"""Multi-GPU scaling of a preset over mesh layouts, on real data, in one process.

Each layout names a device count and mesh axes, e.g. ``4:fsdp=4`` or ``4:data=2,tensor=2``; it
runs on the first N visible devices. Two modes:

* ``--per-device-batch B`` (weak scaling, the usual report): a layout on N devices trains with
  global batch N x B; its tokens/s per GPU is compared with the 1-GPU run of batch B.
* ``--global-batch G`` (strong scaling): every layout trains with global batch G.

A layout ending in ``@G`` (``2:data=2@32``) trains with global batch G whatever the mode. Every
run is compared with the 1-device run of its own per-device batch (per-device efficiency) and
with the 1-device run of its own global batch (speed-up), where those runs are in the list.

Loss curves: every layout first trains ``--loss-steps`` steps on the same real-data batches (the
preset's corpus, packed documents, the train loop's data order) from the same initial
parameters. For each global batch G used, a reference run on one device with the same batch
(``train.grad_accum`` = G / per-device batch where G does not fit) gives the curve the layouts
should reproduce; the JSON records every curve and the largest difference from the reference.
Throughput: after the loss steps, ``--timed-steps`` steps are timed (one block at the end), and
the median of individually blocked steps is kept too.

    python experiments/scaling.py --preset 1b --per-device-batch 8 \\
        --layout 1:data=1 --layout 4:fsdp=4 --layout 4:data=2,fsdp=2 --out scaling_1b.json

Results are written after every layout, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import statistics
import sys
import time
import traceback

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import build, time_steps  # noqa: E402

from jaxeff.config import get_preset  # noqa: E402
from jaxeff.data.pipeline import prepare_dataset  # noqa: E402
from jaxeff.parallel import batch_sharding  # noqa: E402
from jaxeff.train.flops import device_peak_flops, mfu  # noqa: E402
from jaxeff.models import count_params  # noqa: E402
from jaxeff.train.flops import model_flops_per_token  # noqa: E402
from jaxeff.train.loop import to_global  # noqa: E402

MESH_KEYS = ("data", "fsdp", "expert", "tensor")


def parse_layout(spec: str) -> tuple[int, dict[str, int], int | None]:
    """``'4:data=2,tensor=2'`` -> (4, {'data': 2, 'fsdp': 1, 'expert': 1, 'tensor': 2}, None); the axes must
    multiply to N. A suffix ``@G`` fixes that layout's global batch to G (else the mode decides)."""
    try:
        spec, _, batch_str = spec.partition("@")
        batch = int(batch_str) if batch_str else None
        n_str, axes_str = spec.split(":", 1)
        n = int(n_str)
        axes = dict.fromkeys(MESH_KEYS, 1)
        for item in filter(None, axes_str.split(",")):
            k, v = item.split("=")
            if k.strip() not in MESH_KEYS:
                raise ValueError(f"unknown mesh axis {k!r}")
            axes[k.strip()] = int(v)
    except ValueError as e:
        raise ValueError(f"--layout {spec!r}: expected N:axis=size,... with axes {MESH_KEYS} ({e})") from None
    if n < 1 or math.prod(axes.values()) != n:
        raise ValueError(f"--layout {spec!r}: the axis sizes {axes} must multiply to N={n}")
    if batch is not None and batch < 1:
        raise ValueError(f"--layout {spec!r}: the global batch after '@' must be positive")
    return n, axes, batch


def train_run(cfg, devices, batches: list[dict], timed_steps: int, log=None) -> dict:
    """Trains on ``batches`` (recording each step's loss), then times ``timed_steps`` more steps;
    ``log(message)``, if given, hears when the first step has compiled."""
    tc = cfg.train
    mesh, step_fn, state, _ = build(cfg, devices=devices, n_batches=0)
    with jax.set_mesh(mesh):
        bsh = batch_sharding(mesh)
        t0 = time.perf_counter()
        dev_batches = [to_global(b, bsh) for b in batches]
        state, m = step_fn(state, dev_batches[0])
        losses = [m["loss"]]
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        if log:
            log(f"first step compiled and ran in {compile_s:.0f}s")
        for b in dev_batches[1:]:
            state, m = step_fn(state, b)
            losses.append(m["loss"])
        out = {"compile_s": compile_s, "losses": [float(x) for x in jax.device_get(losses)]}
        if timed_steps:
            state, m, wall, per_step = time_steps(step_fn, state, dev_batches, timed_steps, min(timed_steps, 5))
            tokens = tc.batch_size * tc.seq_len
            out.update(step_s_mean=wall / timed_steps, step_s_median=statistics.median(per_step),
                       tokens_per_s=tokens * timed_steps / wall)
        stats = [d.memory_stats() or {} for d in devices]
        out["peak_gb"] = max((s.get("peak_bytes_in_use", 0) for s in stats), default=0) / 2**30
        del state, step_fn, dev_batches
    gc.collect()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--set", action="append", default=[], help="config override key=value (all runs)")
    p.add_argument("--layout", action="append", default=[], help="N:axis=size,... (repeatable)")
    mode = p.add_mutually_exclusive_group(required=True)  # layouts ending in @G override either
    mode.add_argument("--per-device-batch", type=int, help="weak scaling: global batch = N x this")
    mode.add_argument("--global-batch", type=int, help="strong scaling: every layout uses this global batch")
    p.add_argument("--ref-max-batch", type=int, default=0,
                   help="largest batch one device takes at once in a reference run (default: the per-device "
                        "batch, or the global batch in strong scaling); larger ones use grad_accum")
    p.add_argument("--loss-steps", type=int, default=30)
    p.add_argument("--timed-steps", type=int, default=10)
    p.add_argument("--no-reference", action="store_true", help="skip the one-device loss reference runs")
    p.add_argument("--tokenizer-dir", default="", help="default: a /tmp folder named after the data config")
    p.add_argument("--time-limit", type=float, default=0, help="seconds; skip layouts once this has passed")
    p.add_argument("--out", default="scaling.json")
    a = p.parse_args(argv)
    layouts = [parse_layout(s) for s in (a.layout or ["1:data=1"])]
    n_avail = len(jax.devices())
    for (n, _, _), spec in zip(layouts, a.layout):
        if n > n_avail:
            raise SystemExit(f"--layout {spec!r} needs {n} devices; {n_avail} visible")
    start = time.perf_counter()
    base = get_preset(a.preset).override(a.set)
    tc = base.train
    dc = base.data
    digest = hashlib.sha1(dc.corpus.encode()).hexdigest()[:10]
    tok_dir = a.tokenizer_dir or f"/tmp/jaxeff_scaling_tok_{dc.tokenizer}{dc.bpe_vocab_size}_{digest}"
    data = prepare_dataset(dc, tc.seq_len, tokenizer_dir=tok_dir)
    print(f"[scaling] data ready in {time.perf_counter() - start:.0f}s ({tok_dir})", flush=True)
    start = time.perf_counter()  # --time-limit counts the training runs only
    base = base.override([f"model.vocab_size={data.vocab_size}"])
    flops_tok = model_flops_per_token(base)
    peak = device_peak_flops()

    def global_batch(n: int) -> int:
        return a.global_batch if a.global_batch else n * a.per_device_batch

    def batches_for(g: int) -> list[dict]:
        return [data.train_batch(s, g, tc.seed) for s in range(a.loss_steps)]

    res = {"preset": a.preset, "overrides": a.set, "device_kind": jax.devices()[0].device_kind,
           "n_visible": n_avail, "jax": jax.__version__, "params": count_params(base),
           "flops_per_token": flops_tok, "seq_len": tc.seq_len,
           "mode": "global" if a.global_batch else "per_device", "per_device_batch": a.per_device_batch,
           "global_batch": a.global_batch, "runs": [], "references": {}}

    def save():
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)

    def log(msg: str) -> None:  # elapsed seconds first, so a stalled call shows where it stopped
        print(f"[scaling] {time.perf_counter() - start:5.0f}s {msg}", flush=True)

    def over_time() -> bool:
        return bool(a.time_limit) and time.perf_counter() - start > a.time_limit

    ref_max = a.ref_max_batch or a.per_device_batch or a.global_batch

    def reference(g: int) -> None:
        """The one-device loss curve for global batch g (a timed 1-device run of that batch when
        there is one, else an untimed run with gradient accumulation), once per batch."""
        if a.no_reference or str(g) in res["references"]:
            return
        done = [r for r in res["runs"] if r.get("n_devices") == 1 and r.get("global_batch") == g and "losses" in r]
        if done:
            res["references"][str(g)] = {"from": done[0]["layout"], "losses": done[0]["losses"]}
            return
        if over_time():
            print(f"[scaling] time limit reached: no reference for batch {g}", flush=True)
            return
        accum = -(-g // ref_max)
        cfg = base.override(["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", f"train.batch_size={g}",
                             f"train.grad_accum={accum}"])
        log(f"reference for batch {g} (1 device, grad_accum={accum})")
        try:
            r = train_run(cfg, jax.devices()[:1], batches_for(g), 0, log)
            res["references"][str(g)] = {"from": f"1 device, grad_accum={accum}", "losses": r["losses"]}
        except Exception as e:
            traceback.print_exc()
            res["references"][str(g)] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}

    def compare(r: dict) -> None:
        ref = res["references"].get(str(r.get("global_batch")), {})
        if "losses" in r and "losses" in ref:
            r["max_loss_diff"] = float(np.max(np.abs(np.array(r["losses"]) - np.array(ref["losses"]))))

    # Layouts in the given order; a multi-device layout is followed by its loss reference (so a
    # run cut short still has curves to compare), a 1-device layout is its own reference.
    for (n, axes, fixed_batch), spec in zip(layouts, a.layout or ["1:data=1"]):
        if over_time():
            print(f"[scaling] time limit reached: skipping {spec}", flush=True)
            res["runs"].append({"layout": spec, "skipped": "time limit"})
            continue
        g = fixed_batch or global_batch(n)
        cfg = base.override([f"mesh.{k}={v}" for k, v in axes.items()] + [f"train.batch_size={g}"])
        log(f"start {spec} (batch {g})")
        try:
            r = train_run(cfg, jax.devices()[:n], batches_for(g), a.timed_steps, log)
        except Exception as e:  # keep going: one failing layout must not lose the others
            traceback.print_exc()
            r = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        r.update(layout=spec, n_devices=n, mesh=axes, global_batch=g)
        if "tokens_per_s" in r:
            r["tokens_per_s_per_device"] = r["tokens_per_s"] / n
            r["mfu"] = mfu(flops_tok, r["tokens_per_s"], n, peak)
        res["runs"].append(r)
        if "losses" in r:
            reference(g)
            compare(r)
        save()
        tps = (f"{r['tokens_per_s']:,.0f} tok/s ({r['tokens_per_s_per_device']:,.0f}/GPU)" if "tokens_per_s" in r
               else r.get("error", ""))
        print(f"[scaling] {spec:22s} batch {g:4d}: {tps}  compile {r.get('compile_s', 0):.0f}s  "
              f"peak {r.get('peak_gb', 0):.1f} GB  loss {r.get('losses', [0])[-1]:.4f}  "
              f"max |loss - reference| {r.get('max_loss_diff', float('nan')):.4f}", flush=True)
    # Each run against the one-device run of its own per-device batch (weak scaling: efficiency =
    # tokens/s per device over that run's tokens/s) and of its own global batch (speed-up).
    one = {r["global_batch"]: r for r in res["runs"] if r.get("n_devices") == 1 and "tokens_per_s" in r}
    for r in res["runs"]:
        if "tokens_per_s" not in r:
            continue
        same_per_device = one.get(r["global_batch"] // r["n_devices"])
        same_global = one.get(r["global_batch"])
        if same_per_device:
            r["per_device_efficiency"] = r["tokens_per_s_per_device"] / same_per_device["tokens_per_s"]
        if same_global:
            r["speedup"] = r["tokens_per_s"] / same_global["tokens_per_s"]
    save()
    print(f"\n{a.preset} on {res['device_kind']} ({res['mode']} batch): ")
    print(f"{'layout':24s} {'batch':>5s} {'tok/s':>11s} {'tok/s/GPU':>10s} {'MFU':>6s} {'eff':>6s} "
          f"{'speedup':>7s} {'dloss':>7s} {'GB':>5s}")
    for r in res["runs"]:
        if "tokens_per_s" not in r:
            print(f"{r['layout']:24s} {r.get('error', r.get('skipped', ''))[:80]}")
            continue
        u = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        print(f"{r['layout']:24s} {r['global_batch']:5d} {r['tokens_per_s']:11,.0f} {r['tokens_per_s_per_device']:10,.0f} "
              f"{u:>6s} {r.get('per_device_efficiency', float('nan')):6.3f} {r.get('speedup', float('nan')):7.3f} "
              f"{r.get('max_loss_diff', float('nan')):7.4f} {r['peak_gb']:5.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
