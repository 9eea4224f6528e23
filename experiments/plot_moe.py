"""The MoE kernel benchmark's JSON (experiments/bench_moe.py) as one PNG.

``python experiments/plot_moe.py bench_moe.json --out bench_moe.png``: one panel per chunk-sweep
shape (kernel / dense time against the union ratio, one line per chunk length, and the goal
1.25 * ratio), the grouped matmuls' TFLOP/s per implementation (top-1, top-8), and the checks'
relative errors against their tolerances. A part missing from the JSON (not run, or cut by the
deadline) leaves its panel saying so."""

from __future__ import annotations

import argparse
import json
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _empty(ax, title: str, why: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _ok(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def chunk_panels(axes, rows) -> None:
    chunk = [r for r in rows if r.get("part") == "chunk"]
    shapes = list(dict.fromkeys(r.get("shape", "?") for r in chunk))
    timed = [s for s in shapes if any(_ok(r.get("kernel_ms")) and _ok(r.get("dense_ms")) for r in chunk
                                      if r.get("shape") == s)]
    for i, ax in enumerate(axes):
        if i >= len(timed):
            if i == 0:
                why = "no chunk-sweep rows" if not chunk else "no timed kernel rows\n" + "\n".join(
                    sorted({str(r.get("error", ""))[:60] for r in chunk if r.get("error")})[:3])
                _empty(ax, "chunk sweep", why)
            else:
                ax.axis("off")
            continue
        shape = timed[i]
        rs = [r for r in chunk if r.get("shape") == shape and _ok(r.get("kernel_ms")) and _ok(r.get("dense_ms"))]
        for length in sorted({r.get("chunk_len") for r in rs}, reverse=True):
            pts = sorted((r.get("union_ratio", r.get("union_ratio_target")), r["kernel_ms"] / r["dense_ms"])
                         for r in rs if r.get("chunk_len") == length)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"chunk {length}")
        xs = np.linspace(0.0, 1.0, 50)
        ax.plot(xs, 1.25 * xs, "k--", lw=1, label="goal 1.25 x ratio")
        ax.axhline(1.0, color="0.6", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("union ratio (union experts / E)")
        ax.set_ylabel("kernel / dense FFN time")
        dense = rs[0]["dense_ms"]
        ax.set_title(f"{shape}: dense {dense:.3f} ms", fontsize=9)
        ax.legend(fontsize=7)


def grouped_panel(ax, rows) -> None:
    g = [r for r in rows if r.get("part") == "grouped" and _ok(r.get("tflops"))]
    if not g:
        _empty(ax, "grouped matmul", "no grouped rows")
        return
    ks = sorted({r["k"] for r in g})
    impls = list(dict.fromkeys(r["impl"] for r in g))
    width = 0.8 / max(1, len(ks))
    for j, k in enumerate(ks):
        vals = [next((r["tflops"] for r in g if r["k"] == k and r["impl"] == name), np.nan) for name in impls]
        ax.barh(np.arange(len(impls)) + j * width, vals, width, label=f"top-{k}")
    ax.set_yticks(np.arange(len(impls)) + width * (len(ks) - 1) / 2)
    ax.set_yticklabels([name[:44] for name in impls], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("TFLOP/s")
    r0 = g[0]
    ax.set_title(f"grouped matmul: N={r0.get('N')}, [E={r0.get('E')}, {r0.get('D')}, {r0.get('F')}]", fontsize=9)
    ax.legend(fontsize=7)


def checks_panel(ax, rows) -> None:
    c = [r for r in rows if r.get("part") == "checks"]
    if not c:
        _empty(ax, "checks", "no check rows")
        return
    labels, vals, colors, tols = [], [], [], []
    for r in c:
        dt = {"bfloat16": "bf16", "float16": "fp16"}.get(r.get("dtype"), str(r.get("dtype", "")))
        labels.append(f"{str(r.get('case', '?'))[:34]} {dt}")
        err = r.get("rel_err")
        status = r.get("status")
        vals.append(err if _ok(err) else (1e-8 if err == 0 else np.nan))
        colors.append({"PASS": "tab:green", "FAIL": "tab:red"}.get(status, "0.7"))
        tols.append(r.get("tol", np.nan))
    y = np.arange(len(c))
    ax.barh(y, vals, color=colors)
    ax.scatter(tols, y, marker="|", color="k", s=60, label="tolerance")
    for yi, r in zip(y, c):
        if r.get("status") in ("N/A", "SKIPPED") or (r.get("status") == "FAIL" and r.get("rel_err") is None):
            ax.text(1e-7, yi, r.get("status"), va="center", fontsize=6)
        elif r.get("rel_err") == 0:
            ax.text(1e-7, yi, "exactly 0", va="center", fontsize=6)
    ax.set_xscale("log")
    ax.set_xlim(1e-8, 1.0)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("max|y - ref| / max|ref|")
    n_pass = sum(r.get("status") == "PASS" for r in c)
    ax.set_title(f"checks: {n_pass}/{len(c)} PASS", fontsize=9)
    ax.legend(fontsize=7)


def main(argv=None) -> str:
    p = argparse.ArgumentParser()
    p.add_argument("json")
    p.add_argument("--out", default="bench_moe.png")
    a = p.parse_args(argv)
    res = json.load(open(a.json))
    rows = res.get("rows", [])
    fig = plt.figure(figsize=(16, 9))
    gs = fig.add_gridspec(2, 3)
    chunk_panels([fig.add_subplot(gs[0, i]) for i in range(3)], rows)
    grouped_panel(fig.add_subplot(gs[1, 0:2]), rows)
    checks_panel(fig.add_subplot(gs[1, 2]), rows)
    summ = res.get("summary", {}).get("chunk", {})
    extra = f", overhead_ms {summ['overhead_ms']:.3f}" if isinstance(summ.get("overhead_ms"), (int, float)) else ""
    fig.suptitle(f"{res.get('device', '?')}, jax {res.get('jax', '?')}, tokamax {res.get('tokamax')}, "
                 f"{res.get('date', '')}, status {res.get('status', '?')}{extra}", fontsize=9)
    fig.tight_layout()
    fig.savefig(a.out, dpi=100)
    print(a.out)
    return a.out


if __name__ == "__main__":
    main()
