"""Figures from experiments/bench_decode.py's JSON: ``python experiments/plot_decode.py
bench_decode.json --out bench_decode.png``.

Four panels, each left with a note when its part is missing from the JSON: the kernel's time
against the fraction of the cache in use per cache size (cuDNN and XLA over the full cache as
horizontal lines, the linear scaling f * t_full dotted), the full-cache bandwidths, the checks'
errors over their tolerance, and the end-to-end decode rates."""

from __future__ import annotations

import argparse
import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _ok(r) -> bool:
    return "error" not in r and r.get("ms") is not None


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in this JSON", ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_scaling(ax, rows) -> None:
    bench = [r for r in rows if r.get("part") == "bench" and _ok(r)]
    kern = [r for r in bench if r.get("kind") == "kernel"]
    if not kern:
        _empty(ax, "bench rows")
        return
    ns = sorted({r["N"] for r in kern})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, n in enumerate(ns):
        c = colors[i % len(colors)]
        for impl in sorted({r["impl"] for r in kern if r["N"] == n}):
            pts = sorted((r["frac"], r["ms"] * 1e3) for r in kern if r["N"] == n and r["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=c, label=f"N={n} {impl}")
            full = next((p[1] for p in pts if p[0] >= 0.999), None)
            if full is not None:
                xs = np.linspace(0, 1, 11)
                ax.plot(xs, xs * full, ":", color=c, lw=1)
        for r in bench:
            if r["N"] == n and r.get("kind") == "peer":
                ax.axhline(r["ms"] * 1e3, color=c, ls="--" if r["impl"].startswith("cudnn") else "-.", lw=1)
                ax.text(1.0, r["ms"] * 1e3, f" {r['impl']}", color=c, fontsize=7, va="center")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of the cache in use (mean count / N)")
    ax.set_ylabel("time per call (us)")
    ax.set_title("decode attention: kernel vs budget (dotted: f x t_full; dashed: cuDNN, dash-dot: XLA, full cache)",
                 fontsize=8)
    ax.legend(fontsize=7)


def plot_bandwidth(ax, rows) -> None:
    full = [r for r in rows if r.get("part") == "bench" and _ok(r) and r.get("budget") == 1.0 and r.get("tbps")]
    if not full:
        _empty(ax, "full-cache bench rows")
        return
    ns = sorted({r["N"] for r in full})
    impls = sorted({r["impl"] for r in full}, key=lambda s: (s != "mosaic_gpu", s))
    w = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        vals = [next((r["tbps"] for r in full if r["N"] == n and r["impl"] == impl), np.nan) for n in ns]
        ax.bar(np.arange(len(ns)) + i * w, vals, w, label=impl)
    ax.set_xticks(np.arange(len(ns)) + 0.4 - w / 2)
    ax.set_xticklabels([f"N={n}" for n in ns])
    ax.set_ylabel("effective K/V bandwidth (TB/s)")
    ax.set_title("full cache: bytes of K and V in use / time", fontsize=8)
    ax.legend(fontsize=7)


def plot_checks(ax, rows) -> None:
    ch = [r for r in rows if r.get("part") == "checks"]
    if not ch:
        _empty(ax, "checks")
        return
    names, vals, cols = [], [], []
    for r in ch:
        names.append(f"{r.get('impl', '')} {r.get('name', '?')}")
        if r.get("expect_error"):
            v = 1e-3 if r.get("ok") else 10.0  # refused as it must be: drawn low
        elif "error" in r:
            v = 10.0
        else:
            v = max(r.get("o_err") or 0.0, r.get("lse_err") or 0.0) / r["tol"]
            v = v if math.isfinite(v) else 10.0
        vals.append(max(v, 1e-4))
        cols.append("tab:green" if r.get("ok") else "tab:red")
    y = np.arange(len(names))
    ax.barh(y, vals, color=cols)
    ax.axvline(1.0, color="k", lw=1)
    ax.set_xscale("log")
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("worst error / tolerance (red: FAIL)")
    ax.set_title(f"checks against the float32 reference: {sum(bool(r.get('ok')) for r in ch)}/{len(ch)} pass",
                 fontsize=8)


def plot_e2e(ax, rows) -> None:
    dec = [r for r in rows if r.get("part") == "e2e" and r.get("phase") == "decode" and "error" not in r]
    if not dec:
        _empty(ax, "end-to-end rows")
        return
    labels = [f"{r['policy']}\n{r['read']}" for r in dec]
    vals = [r["decode_tok_s"] for r in dec]
    bars = ax.bar(np.arange(len(dec)), vals, color=["tab:blue" if r["policy"] == "full" else "tab:orange" for r in dec])
    for b, r in zip(bars, dec):
        note = f"{r['ms_per_token']:.2f} ms/tok\nkept {r.get('kept_frac', 1):.0%}\nprefill {r['prefill_s']:.2f} s"
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), note, ha="center", va="bottom", fontsize=6)
    ax.set_xticks(np.arange(len(dec)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("decode tokens / s")
    ax.set_ylim(0, max(vals) * 1.35)
    r0 = dec[0]
    ax.set_title(f"end to end: prompt {r0.get('prompt')}, {r0.get('new')} new tokens (policy / cache read)", fontsize=8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("json")
    p.add_argument("--out", default=None, help="PNG path (default: the JSON's path with .png)")
    a = p.parse_args(argv)
    res = json.load(open(a.json))
    rows = res.get("rows", [])
    out = a.out or os.path.splitext(a.json)[0] + ".png"
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    plot_scaling(axes[0, 0], rows)
    plot_bandwidth(axes[0, 1], rows)
    plot_checks(axes[1, 0], rows)
    plot_e2e(axes[1, 1], rows)
    fig.suptitle(f"{res.get('device', '?')}, jax {res.get('jax', '?')}, {res.get('date', '')}"
                 f"{'  (quick)' if res.get('quick') else ''}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
