"""Pictures of the results: error / recall / end-task vs density per method, and each method's
block mask on one head."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

STYLE = {"local_window": ("k", "--", "s"), "svg2": ("tab:blue", "-", "o"), "paro": ("tab:orange", "-", "^"),
         "adaspa": ("tab:green", "-", "D"), "efficient_vdit": ("tab:red", "-", "v"),
         "xattention": ("tab:purple", "-", "P"), "minference": ("tab:brown", "-", "X")}


def _by_method(rows):
    out = {}
    for r in rows:
        out.setdefault(r["method"], []).append(r)
    return {m: sorted(v, key=lambda r: r["density"]) for m, v in out.items()}


def curves(rows: list[dict], path: str, *, title: str, task_key: str, task_label: str, dense_task: float):
    """Three panels against the achieved density: attention error, mass recall, end task."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method, rs in _by_method(rows).items():
        c, ls, mk = STYLE.get(method, ("gray", "-", "."))
        d = [r["density"] for r in rs]
        for ax, key in zip(axes, ("rel_error", "recall", task_key)):
            ax.plot(d, [r[key] for r in rs], color=c, linestyle=ls, marker=mk, label=method)
    axes[0].set_ylabel("relative error of the attention output")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("recall of the attention mass")
    axes[2].axhline(dense_task, color="gray", lw=1, label="dense")
    axes[2].set_ylabel(task_label)
    for ax in axes:
        ax.set_xlabel("achieved block density")
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def masks(rows: list[dict], path: str, *, title: str):
    """One mask per method (its middle setting): layer 1, head 0, in the method's own token order."""
    picks = {}
    for method, rs in _by_method(rows).items():
        picks[method] = rs[len(rs) // 2]
    n = len(picks)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.5))
    for ax, (method, r) in zip(np.atleast_1d(axes), picks.items()):
        ax.imshow(np.asarray(r["mask_layer1_head0"]), cmap="Blues", vmin=0, vmax=2, interpolation="nearest")
        knob = ", ".join(f"{k}={v}" for k, v in r["knobs"].items())
        ax.set_title(f"{method}\n{knob}\nmean density over layers {r['density']:.2f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
