"""A picture of a block mask: full / partial / empty blocks of one (batch, head) in three colours."""

from __future__ import annotations

import numpy as np

COLOURS = ("#f2f2f2", "#f4a259", "#2a6f97")  # empty, partial, full


def save_block_picture(block_mask, path, *, b: int = 0, h: int = 0, title: str | None = None):
    """Writes a PNG of ``block_mask``'s block states for batch row ``b`` and head ``h``."""
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("BlockMask.plot needs matplotlib: pip install 'jaxeff[plot]'") from e
    states = np.asarray(block_mask.block_states())
    bm, hm = states.shape[:2]
    if not (0 <= b < bm and 0 <= h < hm):
        raise ValueError(f"BlockMask.plot: (b={b}, h={h}) outside the mask's (B={bm}, H={hm})")
    grid = states[b, h]
    nq, nk = grid.shape
    bq, bk = block_mask.block_size
    fig, ax = plt.subplots(figsize=(min(10, 2 + 0.25 * nk), min(10, 2 + 0.25 * nq)), dpi=100)
    ax.imshow(grid, cmap=ListedColormap(COLOURS), vmin=0, vmax=2, interpolation="nearest")
    ax.set_xlabel(f"key block ({bk} tokens)")
    ax.set_ylabel(f"query block ({bq} tokens)")
    density = (grid > 0).mean()
    ax.set_title(title or f"b={b} h={h}: {density:.1%} of blocks computed")
    ax.legend(handles=[Patch(color=c, label=n) for c, n in zip(COLOURS, ("empty", "partial", "full"))],
              loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
