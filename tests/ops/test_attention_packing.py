"""The pieces of the cuDNN paths that run on any backend: packed-run offsets and per-device
execution under a mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.config import MeshConfig
from jaxeff.ops import AttentionMask, attention_reference, masked_attention_reference
from jaxeff.ops.attention_cudnn import packed_tier, per_device, segment_offsets
from jaxeff.parallel import make_mesh


def runs_of(row):
    """(start, length) of each maximal run of equal values, in plain Python."""
    out, start = [], 0
    for i in range(1, len(row) + 1):
        if i == len(row) or row[i] != row[start]:
            out.append((start, i - start))
            start = i
    return out


@pytest.mark.parametrize("seed", range(4))
def test_segment_offsets_match_python_runs(seed):
    rng = np.random.default_rng(seed)
    b, t, m = 5, 48, 6
    cuts = rng.random((b, t)) < rng.uniform(0.02, 0.25)
    seg = np.cumsum(cuts, axis=1) + 1
    seg[-1, -rng.integers(1, 10):] = 0  # trailing padding is a run of its own
    offsets, lengths, n = map(np.asarray, segment_offsets(jnp.asarray(seg, jnp.int32), m))
    assert offsets.shape == (b, m + 1) and lengths.shape == (b, m)
    for r in range(b):
        runs = runs_of(list(seg[r]))
        assert n[r] == len(runs)
        k = min(len(runs), m)
        assert list(offsets[r, :k]) == [s for s, _ in runs[:k]]
        assert list(lengths[r, :k]) == [l for _, l in runs[:k]]
        assert (offsets[r, k:] == -1).all() and (lengths[r, k:] == -1).all()


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=8), MeshConfig(data=2, fsdp=2, tensor=2),
                                      MeshConfig(data=2, tensor=4)])
def test_per_device_equals_unsharded(mesh_cfg):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices")
    ks = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(ks[0], (8, 32, 8, 16))
    k = jax.random.normal(ks[1], (8, 32, 4, 16))
    seg = (jnp.cumsum(jax.random.uniform(ks[2], (8, 32)) < 0.1, axis=1) + 1).astype(jnp.int32)
    want = attention_reference(q, k, k, mask=AttentionMask.training(seg))
    fn = lambda q_, k_, v_, s_: attention_reference(q_, k_, v_, mask=AttentionMask.training(s_))
    with jax.set_mesh(make_mesh(mesh_cfg)):
        got = jax.jit(lambda q_, k_, s_: per_device(fn, q_, k_, k_, s_))(q, k, seg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_packed_tier_picks_the_smallest_tier_that_holds_every_row(seed):
    rng = np.random.default_rng(seed)
    tiers = (1, 2, 4, 16)
    for _ in range(20):
        b, t = rng.integers(1, 5), rng.integers(2, 40)
        seg = np.cumsum(rng.random((b, t)) < rng.uniform(0, 0.6), axis=1) + 1
        if rng.random() < 0.3:
            seg[-1, -rng.integers(1, t):] = 0  # trailing padding: a run of its own
        most = max(len(runs_of(list(row))) for row in seg)
        want = next((i for i, m in enumerate(tiers) if most <= m), len(tiers))
        assert int(packed_tier(jnp.asarray(seg, jnp.int32), tiers)) == want


@pytest.mark.parametrize("per_head", [False, True])
def test_per_device_with_a_dense_mask_equals_unsharded(per_head):
    """The dense-mask branch's extra argument [B, N, T, S] is split by batch (and heads when N = H)."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices")
    ks = jax.random.split(jax.random.key(4), 3)
    q = jax.random.normal(ks[0], (4, 16, 8, 16))
    k = jax.random.normal(ks[1], (4, 16, 4, 16))
    mask = jax.random.uniform(ks[2], (4, 8 if per_head else 1, 16, 16)) < 0.7
    mask = mask | jnp.eye(16, dtype=bool)
    fn = lambda q_, k_, v_, m_: masked_attention_reference(q_, k_, v_, m_[:, ::2] if m_.shape[1] > 1 else m_)
    want = fn(q, k, k, mask)
    with jax.set_mesh(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))):
        got = jax.jit(lambda q_, k_, m_: per_device(fn, q_, k_, k_, m_))(q, k, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
