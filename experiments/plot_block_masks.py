"""Draws the block patterns of the README's example masks (experiments/results/block_masks.png).

``python experiments/plot_block_masks.py [--out PATH]``: sequence 1024 in blocks of 64; causal,
sliding window, chunked, and a window inside three packed documents, with each one's density.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

import jaxeff.sparse as sp  # noqa: E402
from jaxeff.sparse.picture import COLOURS  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="experiments/results/block_masks.png")
    a = p.parse_args()
    s, block = 1024, 64
    docs = jnp.asarray(np.repeat([1, 2, 3], [400, 360, 264])[None, :])
    masks = {"causal()": sp.causal(), "local(256, 0)": sp.local(256, 0), "chunked_causal(256)": sp.chunked_causal(256),
             "and_masks(document(seg),\n          local(256, 0))": sp.and_masks(sp.document(docs), sp.local(256, 0))}
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.8))
    for ax, (name, fn) in zip(axes, masks.items()):
        bm = sp.create_block_mask(fn, 1, None, s, s, block_q=block, block_kv=block)
        ax.imshow(np.asarray(bm.block_states())[0, 0], cmap=ListedColormap(COLOURS), vmin=0, vmax=2,
                  interpolation="nearest")
        ax.set_title(f"{name}\n{float(bm.block_density()):.0%} of blocks", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"BlockMask of a {s}-token sequence in {block} x {block} blocks: full (dark), partial (orange, "
                 f"element-masked), empty (skipped)", fontsize=9)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(a.out)


if __name__ == "__main__":
    main()
