"""Efficient-vDiT: attention tiles (Ding et al., 2025, "Efficient-vDiT: Efficient Video Diffusion
Transformers With Attention Tile", arXiv 2502.06155).

The rule (paper Sec. 3, the "attention tile" pattern and its k:m tile masks): viewed frame by
frame, a video DiT's attention map is an F x F grid of tiles whose mass sits on the diagonal
(a frame attending to itself) and on a few columns (frames every frame attends to). The sparse
mask keeps, for every query frame, its own frame's tile and the tiles of ``references`` = k
reference frames: tile (f, f') is computed iff f' == f or f' is a reference frame. Reference
frames: the first k (``reference_frames="first"``, the paper's global frames), k frames evenly
spaced over the video (``"uniform"``), or an explicit tuple. Static: the mask depends on the grid
only, the same for every head and input; its density is about (k + 1) / F.

Fixed blocks: a block is computed when any (query token, key token) pair in it falls in a kept
tile; with frames of a whole number of blocks (H * W a multiple of the block size) this is the
tile mask exactly, else the blocks straddling frame boundaries are computed whole (never fewer
keys). ``density`` d picks k = round(d * F) - 1 reference frames (at least 0).
"""

from __future__ import annotations

import jax
import numpy as np

from jaxeff.sparse.block_mask import BlockMask
from jaxeff.sparse.select.common import check_block, check_grid, check_int, check_knobs, check_qk, to_block_mask

DEFAULTS = dict(references=1, reference_frames="first", block=64)
WHERE = "efficient_vdit"


def reference_set(frames: int, references: int, reference_frames="first") -> tuple[int, ...]:
    if isinstance(reference_frames, str):
        if reference_frames == "first":
            return tuple(range(references))
        if reference_frames == "uniform":
            return tuple(sorted({int(round(x)) for x in np.linspace(0, frames - 1, references)})) if references else ()
        raise ValueError(f"{WHERE}: reference_frames must be 'first', 'uniform' or a tuple of frame indices, got "
                         f"{reference_frames!r}")
    refs = tuple(int(f) for f in reference_frames)
    if any(not 0 <= f < frames for f in refs):
        raise ValueError(f"{WHERE}: reference_frames {refs} must lie in [0, {frames})")
    return refs


def frame_tiles(frames: int, refs: tuple[int, ...]) -> np.ndarray:
    """[F, F] bool: query frame f sees key frame f' (its own, or a reference)."""
    tiles = np.eye(frames, dtype=bool)
    tiles[:, list(refs)] = True
    return tiles


def tile_table(grid: tuple[int, int, int], refs: tuple[int, ...], block_q: int, block_kv: int) -> np.ndarray:
    """[nQ, nK] bool: the fixed blocks meeting a kept tile (module docstring)."""
    f, hh, ww = grid
    t, per = f * hh * ww, hh * ww
    tiles = frame_tiles(f, refs)
    nq, nk = -(-t // block_q), -(-t // block_kv)
    frame = np.arange(t) // per
    qf = np.zeros((nq, f), bool)
    qf[np.arange(t) // block_q, frame] = True
    kf = np.zeros((nk, f), bool)
    kf[np.arange(t) // block_kv, frame] = True
    return (qf.astype(np.int32) @ tiles.astype(np.int32) @ kf.T.astype(np.int32)) > 0


def efficient_vdit(q_BxTxHxD: jax.Array, k_BxTxKxD: jax.Array, *, grid: tuple[int, int, int],
                   density: float | None = None, threshold: float | None = None, state=None,
                   block=DEFAULTS["block"], references: int | None = None,
                   reference_frames=DEFAULTS["reference_frames"]) -> tuple[BlockMask, None, None]:
    """The tile mask as a BlockMask shared by every batch row and head (module docstring);
    q/k give only the shapes. Default: 1 reference frame (the first)."""
    del state
    b, t, h, d, s, kh = check_qk(WHERE, q_BxTxHxD, k_BxTxKxD)
    if s != t:
        raise ValueError(f"{WHERE}: self-attention over the video only (q has {t} tokens, k {s})")
    grid = check_grid(WHERE, grid, t)
    density, _ = check_knobs(WHERE, density, threshold, takes_threshold=False)
    bq, bk = check_block(WHERE, block, t, s)
    f = grid[0]
    if density is not None:
        if references is not None:
            raise ValueError(f"{WHERE}: pass density or references, not both")
        references = int(np.clip(round(density * f) - 1, 0, f - 1))
    references = check_int(WHERE, "references", DEFAULTS["references"] if references is None else references,
                           minimum=0, maximum=f)
    refs = reference_set(f, references, reference_frames)
    table = tile_table(grid, refs, bq, bk)
    return to_block_mask(jax.numpy.asarray(table)[None, None], bq, bk, t, s), None, None
