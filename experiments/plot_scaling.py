"""Plots the JSON of experiments/scaling.py: loss curves per layout (left) and tokens/s per device
with the per-device efficiency against one device (right), one row per JSON file.

    python experiments/plot_scaling.py results/scaling_small.json results/scaling_1b.json --out scaling.png
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--out", default="scaling.png")
    a = p.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(a.files), 2, figsize=(12, 4.2 * len(a.files)), squeeze=False)
    for (ax_loss, ax_tps), path in zip(axes, a.files):
        res = json.load(open(path))
        runs = [r for r in res["runs"] if "losses" in r]
        title = f"{res['preset']} ({res['params'] / 1e6:,.0f}M params), {res['device_kind']}"
        for g, ref in sorted(res.get("references", {}).items(), key=lambda kv: int(kv[0])):
            if "losses" in ref and not ref["from"].startswith(tuple(r["layout"] for r in runs)):
                ax_loss.plot(range(1, len(ref["losses"]) + 1), ref["losses"], "k--", lw=1,
                             label=f"reference, batch {g} ({ref['from']})")
        for r in runs:
            ax_loss.plot(range(1, len(r["losses"]) + 1), r["losses"], lw=1.2,
                         label=f"{r['layout']} (batch {r['global_batch']})")
        ax_loss.set(xlabel="step", ylabel="training loss (nats/token)", title=f"{title}: loss curves")
        ax_loss.legend(fontsize=7)
        timed = [r for r in runs if "tokens_per_s" in r]
        xs = range(len(timed))
        ax_tps.bar(xs, [r["tokens_per_s_per_device"] / 1e3 for r in timed], color="tab:blue")
        for x, r in zip(xs, timed):
            eff = r.get("per_device_efficiency")
            note = f"{100 * r['mfu']:.1f}% MFU" if r.get("mfu") else ""
            if eff is not None and r["n_devices"] > 1:
                note += f"\n{eff:.2f} of 1 GPU"
            ax_tps.text(x, r["tokens_per_s_per_device"] / 1e3, note, ha="center", va="bottom", fontsize=7)
        ax_tps.set_xticks(list(xs), [f"{r['layout']}\nbatch {r['global_batch']}" for r in timed], fontsize=7)
        ax_tps.set(ylabel="thousand tokens/s per device", title=f"{title}: throughput per device")
        ax_tps.margins(y=0.2)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
