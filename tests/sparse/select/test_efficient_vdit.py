"""Efficient-vDiT: the frame-tile mask (own frame + k reference frames) on hand-made grids, block
cover when frames straddle blocks, the density knob, reference choices, and errors."""

from __future__ import annotations

import numpy as np
import pytest

from jaxeff.sparse.select import efficient_vdit, select
from jaxeff.sparse.select.efficient_vdit import frame_tiles, reference_set
from tests.sparse.select.helpers import qk, states


def test_tile_mask_with_frames_of_one_block():
    q, k, _ = qk(t=128, h=4, kh=2)
    bm, perm, state = efficient_vdit(q, k, grid=(8, 4, 4), references=2, block=16)
    want = np.eye(8, dtype=bool)
    want[:, :2] = True
    assert perm is None and state is None and bm.shape[:2] == (1, 1)
    np.testing.assert_array_equal(states(bm)[0, 0] == 2, want)
    assert set(np.unique(states(bm))) <= {0, 2}
    assert float(bm.block_density()) == pytest.approx(want.mean())


def test_frames_straddling_blocks_and_uniform_references():
    q, k, _ = qk(t=96)
    bm, _, _ = efficient_vdit(q, k, grid=(4, 4, 6), references=1, reference_frames="uniform", block=16)
    frame = np.arange(96) // 24
    tiles = frame_tiles(4, (0,))
    elem = tiles[frame][:, frame]
    want = elem.reshape(6, 16, 6, 16).any((1, 3))  # every block meeting a kept tile
    np.testing.assert_array_equal(states(bm)[0, 0] == 2, want)
    assert reference_set(9, 3, "uniform") == (0, 4, 8)
    assert reference_set(9, 2, (3, 5)) == (3, 5)


def test_density_picks_the_number_of_references():
    q, k, _ = qk(t=128)
    bm, _, _ = select(q, k, method="efficient_vdit", grid=(8, 4, 4), density=0.375, block=16)
    np.testing.assert_array_equal((states(bm)[0, 0] == 2)[:, :3].all(0), [True, True, False])  # k = 3 - 1 = 2
    bm, _, _ = select(q, k, method="efficient_vdit", grid=(8, 4, 4), density=0.05, block=16)
    np.testing.assert_array_equal(states(bm)[0, 0] == 2, np.eye(8, dtype=bool))


def test_errors():
    q, k, _ = qk(t=128)
    with pytest.raises(ValueError, match="threshold is not a knob"):
        efficient_vdit(q, k, grid=(8, 4, 4), threshold=0.9, block=16)
    with pytest.raises(ValueError, match="grid"):
        efficient_vdit(q, k, grid=(8, 4, 5), block=16)
    with pytest.raises(ValueError, match="references"):
        efficient_vdit(q, k, grid=(8, 4, 4), references=9, block=16)
    with pytest.raises(ValueError, match="reference_frames"):
        efficient_vdit(q, k, grid=(8, 4, 4), reference_frames=(8,), block=16)
