"""The Hopper kernel (``mosaic_gpu.py``) in Mosaic GPU's interpret mode against the numpy oracle,
its lowering for CUDA on this CPU machine, and the reasons it does not apply.

Interpret mode runs the kernel program: TMA copies of the token tiles, the weight tiles of the
union experts and the activation rows, barrier phases over the dynamic expert loop and the
tile loop, the scalar reads of the union lists, the SMEM x SMEM wgmma of the up projection,
silu and the scaling by a. The down projection's register-operand wgmma is a ``jnp.dot`` there;
it, the real lowering through ptxas, asynchrony and speed are for the GPU issue. Called eagerly
(the interpreter can deadlock under an outer jit on a CPU with few cores). Which experts were
read is the union lists the kernel is given (it has no other way to name an expert); the
portable kernel's test checks the record of the loads themselves."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.chunk_sparse_ffn import api, mosaic_gpu

from .test_base import HOPPER_CASES, ChunkTestBase


class TestMosaicGPU(ChunkTestBase):
    cases = HOPPER_CASES

    def run(self, case, x, a, w_up, w_down):
        return api.chunk_sparse_ffn(x, a, w_up, w_down, chunk_len=case.chunk_len, impl="mosaic_gpu", return_reads=True)


@pytest.mark.parametrize("f", [64, 128])
def test_lowers_for_cuda(f, monkeypatch):
    real = mosaic_gpu.applies
    monkeypatch.setattr(mosaic_gpu, "applies", lambda *a, **kw: real(*a, **{**kw, "interpret": True}))
    x = jnp.zeros((3, 4, 256), jnp.bfloat16)
    a = jnp.zeros((3, 4, 8), jnp.float32)
    w_up, w_down = jnp.zeros((8, 256, f), jnp.bfloat16), jnp.zeros((8, f, 256), jnp.bfloat16)
    ids, counts = jnp.zeros((3, 8), jnp.int32), jnp.zeros((3,), jnp.int32)
    exported = jax.export.export(jax.jit(mosaic_gpu.chunk_sparse_ffn), platforms=["cuda"])(x, a, w_up, w_down, ids,
                                                                                           counts)
    assert "mosaic_gpu" in exported.mlir_module()


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
