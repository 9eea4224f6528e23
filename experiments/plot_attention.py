"""Effective TFLOP/s per mask and implementation from experiments/bench_attention.py's JSON.

``python experiments/plot_attention.py bench_attention.json --out bench_attention.png [--case NAME]``:
forward and forward+backward bars for one shape (default: the first case in the file)."""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

MASKS = ("dense", "causal", "local2048", "document", "random25", "random10", "dynamic10")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("json")
    p.add_argument("--out", default="bench_attention.png")
    p.add_argument("--case", default=None)
    a = p.parse_args()
    res = json.load(open(a.json))
    rows = [r for r in res["rows"] if "error" not in r]
    case = a.case or rows[0]["case"]
    rows = [r for r in rows if r["case"] == case]
    impls = sorted({r["impl"] for r in rows})
    masks = [m for m in MASKS if any(r["mask"] == m for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), sharey=True)
    width = 0.8 / len(impls)
    for ax, key, title in ((axes[0], "fwd_tflops", "forward"), (axes[1], "fwdbwd_tflops", "forward + backward")):
        for i, impl in enumerate(impls):
            vals = [next((r.get(key, np.nan) for r in rows if r["mask"] == m and r["impl"] == impl), np.nan)
                    for m in masks]
            ax.bar(np.arange(len(masks)) + i * width, vals, width, label=impl)
        ax.set_xticks(np.arange(len(masks)) + 0.4 - width / 2)
        ax.set_xticklabels(masks, rotation=20)
        ax.set_title(f"{title}, {case}")
        ax.set_ylabel("effective TFLOP/s (allowed pairs only)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{res['device']}, jax {res['jax']}, torch {res.get('torch')}, bf16, D=128, {res['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(a.out)


if __name__ == "__main__":
    main()
