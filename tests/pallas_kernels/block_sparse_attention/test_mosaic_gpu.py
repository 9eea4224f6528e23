"""The Hopper Mosaic GPU kernel (``mosaic_gpu.py``, ``mosaic_gpu_bwd.py``) against the reference,
in Mosaic GPU's interpret mode on CPU.

What interpret mode exercises here (jax 0.11.2, ``plgpu.InterpretGPUParams``): the whole kernel
programs of the forward, dQ and dK/dV kernels as written, run by simulated warpgroups (two
compute, one memory) with simulated SMEM/GMEM: warp specialisation, TMA copies gmem->smem and
smem->gmem (q/k/v/dO tiles, 1-D LSE/delta/segment-id chunks, int8 dense-mask tiles), barrier
arrive/wait with phase tracking across the K/V (and Q/dO) rings (the interpreter fails a kernel
that lets a waiter fall two phases behind or leaves a phase unobserved), the schedule barrier
between the compute warpgroups, scalar reads of the block lists from GMEM with dynamic indices,
the full-then-partial loops with dynamic bounds, the GQA loop of the dK/dV kernel, element masks
(index functions on iota tiles, segment ids, dense tiles), empty rows, padding, score_mod and its
in-kernel ``jax.vjp``. wgmma with both operands in SMEM (QK^T, dO V^T, K Q^T, V dO^T) runs through
the interpreter's wgmma (a float32 matmul).

What only a GPU checks (``experiments/gpu_checks_block_sparse.py``): the Mosaic GPU lowering and
ptxas (layouts, swizzles, register allocation and ``set_max_registers``), wgmma with a register
operand (P V, dS K, P^T dO, dS^T Q; interpret mode computes these with ``jnp.dot``, see
``mosaic_gpu.mma``), asynchronous wgmma ordering, real TMA/barrier timing and races the
interpreter's sequential threads do not provoke, approx-math exp2, shared-memory limits, and speed.
The lowering itself (Pallas -> Mosaic GPU module, shared-memory budget) can be checked on CPU with
``jax.export(..., platforms=["cuda"])``: ``test_lowers_for_cuda`` does that.

The interpreter can deadlock when the kernels run inside an outer ``jax.jit`` on a CPU with few
cores, so these tests call them eagerly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_attention import mosaic_gpu, mosaic_gpu_fwd, reference
from pallas_kernels.block_sparse_attention.common import ElementMask, SparseLayout

from .test_base import HOPPER_CASES, AttentionTestBase, Case, _close, _rng, layout_from_dense, make_inputs

EXTRA_CASES = (
    Case("hopper_per_head_index_fn_gqa2", 1, 200, 130, 4, 2, 64, 128, 128, "per_head", "bfloat16"),
)


class TestMosaicGPU(AttentionTestBase):
    impl = "mosaic_gpu"
    interpret = True
    cases = HOPPER_CASES + EXTRA_CASES
    skip_blocks = (128, 128, 64, "bfloat16")
    # interpret mode takes 10-25 s a case on 2 cores: the default run keeps causal GQA, empty rows
    # and packed documents; the others run in the slow set
    slow_cases = ("hopper_per_head_index_fn_gqa2", "hopper_random_uneven_t_ne_s", "hopper_all_true",
                  "hopper_softcap_local_gqa4")


def _full_claiming_layout(t, s):
    """A layout (128 x 128) that calls every block full, also the last key block, which holds
    padding: the kernel must still mask the padded keys."""
    nq, nk = -(-t // 128), -(-s // 128)
    z = lambda *shape: jnp.zeros(shape, jnp.int32)  # noqa: E731
    ar = lambda n, m: jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (1, 1, n, m))  # noqa: E731
    return SparseLayout(kv_num_blocks=z(1, 1, nq), kv_indices=z(1, 1, nq, nk),
                        full_kv_num_blocks=jnp.full((1, 1, nq), nk, jnp.int32), full_kv_indices=ar(nq, nk),
                        q_num_blocks=z(1, 1, nk), q_indices=z(1, 1, nk, nq),
                        full_q_num_blocks=jnp.full((1, 1, nk), nq, jnp.int32), full_q_indices=ar(nk, nq),
                        block_q=128, block_kv=128, q_len=t, kv_len=s)


def test_padded_last_block_listed_full_is_masked():
    t, s = 130, 200
    rng = _rng("padded_full")
    q, k, v = make_inputs(Case("x", 1, t, s, 2, 1, 64, 128, 128, "full", "float16"), rng)
    layout = _full_claiming_layout(t, s)
    o, lse = mosaic_gpu.block_sparse_attention(q, k, v, layout, ElementMask(), return_lse=True, interpret=True)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    o_r, lse_r = reference.attention(*f32, jnp.ones((1, 1, t, s), bool), return_lse=True)
    _close("o", o, o_r, 5e-3)
    _close("lse", lse, lse_r, 5e-3)


@pytest.mark.slow
def test_arbitrary_score_mod_with_indices_and_its_gradient():
    """A score_mod that reads b, h, q_idx and kv_idx (an ALiBi-like bias): forward and gradients."""
    case = Case("alibi", 1, 140, 140, 2, 1, 64, 128, 128, "causal", "float16")
    rng = _rng(case.name)
    qi, ki = np.arange(case.t)[:, None], np.arange(case.s)[None, :]
    dense = (ki <= qi)[None, None]
    layout = layout_from_dense(dense, 128, 128)
    em = ElementMask(index_fn=lambda b, h, q, kv: kv <= q)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - (0.05 + 0.05 * h.astype(jnp.float32)) * (q_idx - kv_idx).astype(jnp.float32)

    q, k, v = make_inputs(case, rng)
    do = jnp.asarray(rng.standard_normal(q.shape), q.dtype)
    o, vjp = jax.vjp(lambda *x: mosaic_gpu.block_sparse_attention(*x, layout, em, score_mod=alibi,
                                                                  interpret=True)[0], q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    o_r, vjp_r = jax.vjp(lambda *x: reference.attention(*x, jnp.asarray(dense), score_mod=alibi)[0], *f32)
    _close("o", o, o_r, 5e-3)
    for name, g, g_r in zip(("dq", "dk", "dv"), vjp(do), vjp_r(do.astype(jnp.float32))):
        _close(name, g, g_r, 1e-2)


def test_applies_reasons():
    x16 = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    dense = np.ones((1, 1, 256, 256), bool)
    lay = layout_from_dense(dense, 128, 128)
    assert mosaic_gpu.applies(x16, x16, x16, lay, ElementMask(), interpret=True) == (True, "ok")
    ok, why = mosaic_gpu.applies(x16.astype(jnp.float32), x16, x16, lay, ElementMask(), interpret=True)
    assert not ok and "bfloat16" in why
    x32 = jnp.zeros((1, 256, 2, 32), jnp.bfloat16)
    ok, why = mosaic_gpu.applies(x32, x32, x32, lay, ElementMask(), interpret=True)
    assert not ok and "head_dim" in why
    ok, why = mosaic_gpu.applies(x16, x16, x16, layout_from_dense(dense, 64, 128), ElementMask(), interpret=True)
    assert not ok and "128 x 128" in why
    if jax.default_backend() == "cpu":
        ok, why = mosaic_gpu.applies(x16, x16, x16, lay, ElementMask(), interpret=False)
        assert not ok and "Hopper" in why


@pytest.mark.parametrize("mask", ["index_fn", "segments", "dense"])
def test_lowers_for_cuda(mask, monkeypatch):
    """Forward and backward lower to Mosaic GPU modules for CUDA on this CPU machine (what
    ``jax.export`` runs: the Pallas -> Mosaic GPU lowering and the shared-memory check)."""
    case = Case("lower", 1, 256, 256, 4, 2, 128, 128, 128, "causal", "bfloat16")
    q, k, v = make_inputs(case, _rng("lower"))
    qi, ki = np.arange(256)[:, None], np.arange(256)[None, :]
    dense = (ki <= qi)[None, None]
    em = {"index_fn": ElementMask(index_fn=lambda b, h, q, kv: kv <= q),
          "segments": ElementMask(q_segment_ids=jnp.zeros((1, 256), jnp.int32),
                                  kv_segment_ids=jnp.zeros((1, 256), jnp.int32)),
          "dense": ElementMask(dense=jnp.asarray(dense))}[mask]
    layout = layout_from_dense(dense, 128, 128)
    real_applies = mosaic_gpu.applies
    monkeypatch.setattr(mosaic_gpu, "applies", lambda *a, **kw: real_applies(*a, **{**kw, "interpret": True}))

    def loss(q, k, v):
        return jnp.sum(mosaic_gpu.block_sparse_attention(q, k, v, layout, em)[0].astype(jnp.float32))
    exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["cuda"])(q, k, v)
    assert "mosaic_gpu" in exported.mlir_module()


def test_dense_mask_and_segments_together():
    """Both a dense tile and segment ids: the entry point folds the segments into the dense mask."""
    case = Case("dense_and_segments", 2, 200, 200, 2, 1, 64, 128, 128, "document", "bfloat16")
    rng = _rng(case.name)
    seg = np.sort(rng.integers(0, 3, (case.b, case.t)), axis=1).astype(np.int32)
    dense = rng.random((case.b, 1, case.t, case.s)) < 0.7
    em = ElementMask(q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg), dense=jnp.asarray(dense),
                     index_fn=lambda b, h, q, kv: kv <= q)
    qi, ki = np.arange(case.t)[:, None], np.arange(case.s)[None, :]
    truth = dense & (seg[:, None, :, None] == seg[:, None, None, :]) & (ki <= qi)
    q, k, v = make_inputs(case, rng)
    o, lse = mosaic_gpu.block_sparse_attention(q, k, v, layout_from_dense(truth, 128, 128), em, return_lse=True,
                                               interpret=True)
    o_r, lse_r = reference.attention(*[x.astype(jnp.float32) for x in (q, k, v)], jnp.asarray(truth),
                                     return_lse=True)
    _close("o", o, o_r, 3e-2)
    _close("lse", lse, lse_r, 3e-2)


@pytest.mark.parametrize("tuning", [mosaic_gpu.Tuning(bwd_fuse=False),
                                    mosaic_gpu.Tuning(fwd_stages=3, dq_stages=3, dkv_stages=3)],
                         ids=["unfused", "three_stages"])
@pytest.mark.slow
def test_other_tunings(tuning, monkeypatch):
    """The non-default kernel variants of ``mosaic_gpu.Tuning`` (both measured on an H200)."""
    monkeypatch.setattr(mosaic_gpu_fwd, "TUNING", tuning)  # what both passes read
    TestMosaicGPU().test_against_reference(HOPPER_CASES[0])
