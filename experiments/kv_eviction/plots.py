"""The pictures of ``results.json``: perplexity and accuracy against the budget, per policy."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"streaming_llm": ("tab:blue", "o"), "h2o": ("tab:orange", "s"), "snapkv": ("tab:green", "^"),
         "snapkv_adakv": ("tab:olive", "^"), "pyramidkv": ("tab:red", "v"), "tova": ("tab:purple", "D"),
         "knorm": ("tab:brown", "P"), "quest": ("tab:pink", "X"), "lazy_eviction": ("tab:gray", "*"),
         "d2o": ("tab:cyan", "h"), "elastic_cache": ("gold", "p"), "random": ("black", "x")}


def _style(name):
    return STYLE.get(name, ("tab:gray", "."))


def perplexity_figure(ppl: dict, path: str, title: str):
    texts = list(ppl)
    fig, axes = plt.subplots(1, len(texts), figsize=(5.2 * len(texts), 4.2), squeeze=False)
    for ax, text in zip(axes[0], texts):
        r = ppl[text]
        for name, p in r["policies"].items():
            if p["budget"][0] is None:
                continue
            c, m = _style(name)
            ax.plot(p["budget"], p["perplexity"], marker=m, color=c, label=name, lw=1.2)
        ax.axhline(r["full"], color="k", ls="--", lw=1, label="full cache")
        ax.set_yscale("log")
        ax.set_xlabel("budget (fraction of the context kept)")
        ax.set_ylabel("continuation perplexity")
        ax.set_title(f"{text}: {r['context_tokens']} context, {r['continuation_tokens']} scored")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper right", ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accuracy_figure(acc: dict, path: str, title: str, ylabel: str = "accuracy"):
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, p in acc["policies"].items():
        if p["budget"][0] is None or len(p["budget"]) < 2:
            continue
        c, m = _style(name)
        ax.plot(p["budget"], p["accuracy"], marker=m, color=c, label=name, lw=1.2)
    ax.axhline(acc["full"], color="k", ls="--", lw=1, label="full cache")
    ax.set_xlabel("budget (fraction of the context kept)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def multiturn_figure(mt: dict, path: str, title: str):
    """Per-turn accuracy at each budget: one panel per budget, one line per policy."""
    budgets = mt["budgets"]
    fig, axes = plt.subplots(1, len(budgets), figsize=(5.2 * len(budgets), 4.0), squeeze=False)
    turns = list(range(1, len(mt["full"]) + 1))
    for ax, b in zip(axes[0], budgets):
        for name, p in mt["policies"].items():
            key = str(b)
            if key not in p["per_turn"]:
                continue
            c, m = _style(name.replace(" (query-aware)", ""))
            ax.plot(turns, p["per_turn"][key], marker=m, color=c, label=name,
                    ls=":" if "query-aware" in name else "-", lw=1.2)
        ax.plot(turns, mt["full"], "k--", lw=1, label="full cache")
        ax.set_xticks(turns)
        ax.set_xlabel("turn (question asked)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"budget {b}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
