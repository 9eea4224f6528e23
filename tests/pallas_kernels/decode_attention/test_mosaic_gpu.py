"""The Hopper kernel (``mosaic_gpu.py``) in Mosaic GPU's interpret mode against the reference,
its lowering for CUDA on this CPU machine, and the reasons it does not apply.

Interpret mode runs the kernel program: TMA copies into the two-slot K/V ring and back to GMEM,
barrier phases, the scalar count read, the dynamic block loop, the masks and online softmax, and
Q K^T as a wgmma from SMEM. P V's register-operand wgmma is a ``jnp.dot`` there; it, the real
lowering through ptxas, asynchrony and speed are for the GPU issue. Called eagerly (the
interpreter can deadlock under an outer jit on a CPU with few cores)."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.decode_attention import mosaic_gpu

from .test_base import HOPPER_CASES, DecodeTestBase


class TestMosaicGPU(DecodeTestBase):
    cases = HOPPER_CASES

    def run(self, case, q, k, v, pos, q_pos, counts):
        return mosaic_gpu.decode_attention(q, k, v, pos, q_pos, counts, return_lse=True, interpret=True,
                                           n_splits=case.n_splits)


def test_a_three_slot_ring_matches_the_reference(monkeypatch):
    """``STAGES = 3``: two blocks in flight, the ring wrapping several times over a long split
    (barrier phases), a split shorter than the ring, and an empty head."""
    from pallas_kernels.decode_attention import reference
    monkeypatch.setattr(mosaic_gpu, "STAGES", 3)
    kq, kk, kv = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(kq, (1, 1, 4, 64), jnp.float16)
    k = jax.random.normal(kk, (1, 2, 700, 64), jnp.float16)
    v = jax.random.normal(kv, (1, 2, 700, 64), jnp.float16)
    pos = jnp.broadcast_to(jnp.arange(700, dtype=jnp.int32), (1, 2, 700))
    qp = jnp.full((1, 1), 700, jnp.int32)
    for counts, splits in ((jnp.asarray([[700, 90]], jnp.int32), 1), (jnp.asarray([[0, 650]], jnp.int32), 2)):
        o, lse = mosaic_gpu.decode_attention(q, k, v, pos, qp, counts, return_lse=True, interpret=True,
                                             n_splits=splits)
        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        o_r, lse_r = reference.decode_attention(f32(q), f32(k), f32(v), pos, qp, counts, return_lse=True)
        err = float(jnp.abs(o.astype(jnp.float32) - o_r).max() / jnp.abs(o_r).max())
        assert err < 5e-3, (counts, err)
        fin = jnp.isfinite(lse_r)
        assert bool((jnp.isfinite(lse) == fin).all())
        assert float(jnp.abs(jnp.where(fin, lse - lse_r, 0)).max()) < 1e-3


@pytest.mark.parametrize("d", [64, 128])
def test_lowers_for_cuda(d, monkeypatch):
    real = mosaic_gpu.applies
    monkeypatch.setattr(mosaic_gpu, "applies", lambda *a, **kw: real(*a, **{**kw, "interpret": True}))
    q = jnp.zeros((2, 1, 8, d), jnp.bfloat16)
    k = jnp.zeros((2, 2, 300, d), jnp.bfloat16)
    pos = jnp.zeros((2, 2, 300), jnp.int32)
    f = jax.jit(lambda q, k, p, qp, c: mosaic_gpu.decode_attention(q, k, k, p, qp, c))
    exported = jax.export.export(f, platforms=["cuda"])(q, k, pos, jnp.zeros((2, 1), jnp.int32),
                                                       jnp.full((2, 2), 300, jnp.int32))
    assert "mosaic_gpu" in exported.mlir_module()


def test_applies_reasons():
    q = jnp.zeros((1, 1, 8, 64), jnp.bfloat16)
    k = jnp.zeros((1, 2, 64, 64), jnp.bfloat16)
    assert mosaic_gpu.applies(q, k, k, interpret=True) == (True, "ok")
    assert "Hopper" in mosaic_gpu.applies(q, k, k)[1]
    assert "bfloat16" in mosaic_gpu.applies(q.astype(jnp.float32), k, k, interpret=True)[1]
    assert "head_dim" in mosaic_gpu.applies(q[..., :32], k[..., :32], k[..., :32], interpret=True)[1]
    big = jnp.zeros((1, 20, 8, 64), jnp.bfloat16)
    assert "query rows" in mosaic_gpu.applies(big, k, k, interpret=True)[1]
    with pytest.raises(ValueError, match="mosaic_gpu"):
        mosaic_gpu.decode_attention(q.astype(jnp.float32), k, k, jnp.zeros((1, 2, 64), jnp.int32),
                                    jnp.zeros((1, 1), jnp.int32), interpret=True)
