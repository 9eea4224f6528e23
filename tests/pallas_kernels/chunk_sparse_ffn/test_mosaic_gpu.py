"""The Hopper kernels (``mosaic_gpu.py``, v2: an up kernel per (chunk, union slot) and a down
kernel per (chunk, column block)) in Mosaic GPU's interpret mode against the numpy oracle, their
lowering for CUDA on this CPU machine, and the reasons they do not apply.

Interpret mode runs both kernel programs: the early exit of idle union slots, TMA rings of the
x / W_up tiles (static trip count D / 64) and of the H / W_down tiles (dynamic trip count
counts[c]), barrier phases, the scalar reads of the union lists, all SMEM x SMEM wgmmas, silu
and the scaling by a. wgmma asynchrony (interpret mode runs wgmma synchronously), ptxas and
speed are for the GPU issue. Called eagerly
(the interpreter can deadlock under an outer jit on a CPU with few cores). Which experts were
read is the union lists the kernel is given (it has no other way to name an expert); the
portable kernel's test checks the record of the loads themselves."""

import jax
import jax.numpy as jnp
import pytest

import numpy as np

from pallas_kernels.chunk_sparse_ffn import api, mosaic_gpu
from pallas_kernels.chunk_sparse_ffn.common import union_lists

from .test_base import HOPPER_CASES, ChunkTestBase, numpy_oracle


class TestMosaicGPU(ChunkTestBase):
    cases = HOPPER_CASES

    def run(self, case, x, a, w_up, w_down):
        return api.chunk_sparse_ffn(x, a, w_up, w_down, chunk_len=case.chunk_len, impl="mosaic_gpu", return_reads=True)


def _direct(x, a, w_up, w_down, masks):
    """The kernel called on chunks directly; ``masks[c]`` (bool [E]) picks each chunk's union."""
    a = a * np.asarray(masks, np.float32)[:, None, :]
    a = jnp.asarray(a)
    ids, counts = union_lists(a)
    y = mosaic_gpu.chunk_sparse_ffn(x, a, w_up, w_down, ids, counts, interpret=True)
    return np.asarray(y, np.float64), numpy_oracle(x, a, w_up, w_down), np.asarray(counts)


def _inputs(rng, c, length, d, e, f):
    x = jnp.asarray(rng.normal(size=(c, length, d)), jnp.bfloat16)
    a = rng.random((c, length, e)) + 0.1
    w_up = jnp.asarray(rng.normal(size=(e, d, f)) / np.sqrt(d), jnp.bfloat16)
    w_down = jnp.asarray(rng.normal(size=(e, f, d)) / np.sqrt(f), jnp.bfloat16)
    return x, a, w_up, w_down


def test_d2048():
    """D = 2048 (32 up-projection steps, 16 down column blocks): a partial and a full union."""
    rng = np.random.default_rng(1)
    x, a, w_up, w_down = _inputs(rng, 2, 3, 2048, 3, 64)
    y, want, counts = _direct(x, a, w_up, w_down, [[True, False, True], [True, True, True]])
    assert list(counts) == [2, 3]
    np.testing.assert_allclose(y, want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("groups", [None, 2, 1])
def test_ragged_union(groups, monkeypatch):
    """Counts differing across chunks, 0 and E included (the down ring's dynamic trip count from
    0 through more than its depth), F = 128, D = 192 (column blocks of 64); the up kernel with one
    CTA per slot, and with ``UP_GROUPS`` CTAs per chunk looping over the slots (2: some CTAs take
    3 slots, some none; 1: one CTA takes the whole union)."""
    monkeypatch.setattr(mosaic_gpu, "UP_GROUPS", groups)
    rng = np.random.default_rng(2)
    x, a, w_up, w_down = _inputs(rng, 5, 6, 192, 5, 128)
    masks = [[False] * 5, [True] * 5, [False, False, False, True, False], [True, False, True, False, True],
             [False, True, True, True, True]]
    y, want, counts = _direct(x, a, w_up, w_down, masks)
    assert list(counts) == [0, 5, 1, 3, 4]
    np.testing.assert_allclose(y, want, rtol=3e-2, atol=3e-2)
    assert not y[0].any()


@pytest.mark.parametrize("d,f,block_d,groups", [(256, 64, 128, None), (256, 128, 128, None), (2048, 128, 128, None),
                                                (2048, 128, 256, None), (2048, 128, 128, 4)])
def test_lowers_for_cuda(d, f, block_d, groups, monkeypatch):
    monkeypatch.setattr(mosaic_gpu, "BLOCK_D", block_d)
    monkeypatch.setattr(mosaic_gpu, "UP_GROUPS", groups)
    real = mosaic_gpu.applies
    monkeypatch.setattr(mosaic_gpu, "applies", lambda *a, **kw: real(*a, **{**kw, "interpret": True}))
    x = jnp.zeros((3, 4, d), jnp.bfloat16)
    a = jnp.zeros((3, 4, 8), jnp.float32)
    w_up, w_down = jnp.zeros((8, d, f), jnp.bfloat16), jnp.zeros((8, f, d), jnp.bfloat16)
    ids, counts = jnp.zeros((3, 8), jnp.int32), jnp.zeros((3,), jnp.int32)
    exported = jax.export.export(jax.jit(mosaic_gpu.chunk_sparse_ffn), platforms=["cuda"])(x, a, w_up, w_down, ids,
                                                                                           counts)
    assert exported.mlir_module().count("mosaic_gpu") >= 2  # both kernels


def test_smem_budget():
    up, down = mosaic_gpu.smem_bytes(2048, 128)
    assert up < mosaic_gpu.SMEM_BYTES and down < mosaic_gpu.SMEM_BYTES
    assert (up, down) == (90368, 163840)  # 3 stages each at BLOCK_D = 128


def test_applies_reasons():
    x = jnp.zeros((2, 4, 128), jnp.bfloat16)
    w_up, w_down = jnp.zeros((8, 128, 64), jnp.bfloat16), jnp.zeros((8, 64, 128), jnp.bfloat16)
    assert mosaic_gpu.applies(x, w_up, w_down, interpret=True) == (True, "ok")
    assert "Hopper" in mosaic_gpu.applies(x, w_up, w_down)[1]
    assert "bfloat16" in mosaic_gpu.applies(x.astype(jnp.float32), w_up, w_down, interpret=True)[1]
    assert "64-row" in mosaic_gpu.applies(jnp.zeros((1, 65, 128), jnp.bfloat16), w_up, w_down, interpret=True)[1]
    assert "multiple of 64" in mosaic_gpu.applies(x[..., :96], w_up[:, :96], w_down[..., :96], interpret=True)[1]
    assert "expert width" in mosaic_gpu.applies(x, w_up[..., :32], w_down[:, :32], interpret=True)[1]
    with pytest.raises(ValueError, match="mosaic_gpu"):
        api.chunk_sparse_ffn(x.astype(jnp.float32), jnp.zeros((2, 4, 8)), w_up, w_down, impl="mosaic_gpu")
