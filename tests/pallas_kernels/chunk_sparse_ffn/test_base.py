"""Shared cases for the chunk-sparse FFN implementations: one decoded token per row, a few
tokens per row (speculative verification), a full 64-token chunk, prefill rows split into
several chunks with a ragged last one, a chunk whose tokens activate no expert and one that
activates every expert. Each implementation's test file subclasses :class:`ChunkTestBase`,
which checks the values against a numpy transcription of ``sum_e a_e silu(x W_up_e) W_down_e``
and the experts computed against each chunk's union."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from pallas_kernels.chunk_sparse_ffn.common import chunk_shape


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    b: int
    t: int
    d: int
    e: int
    f: int
    chunk_len: int = 64
    density: float = 0.25
    dtype: str = "float32"


CASES = (
    Case("decode_one_token", 3, 1, 16, 8, 8),
    Case("verify_five_tokens", 2, 5, 16, 12, 8),
    Case("chunk_of_64", 1, 64, 16, 8, 16, density=0.05),
    Case("prefill_ragged_chunks", 2, 21, 8, 6, 8, chunk_len=8),
)
HOPPER_CASES = (
    Case("hopper_verify_d128_f64", 2, 4, 128, 8, 64, dtype="bfloat16"),
    Case("hopper_prefill_d64_f128", 1, 70, 64, 4, 128, chunk_len=64, density=0.1, dtype="bfloat16"),
)


def make_inputs(case: Case, seed: int = 0):
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(case.dtype)
    x = rng.normal(size=(case.b, case.t, case.d))
    act = rng.random((case.b, case.t, case.e)) < case.density
    a = np.where(act, rng.random((case.b, case.t, case.e)) + 0.1, 0.0)
    a[0, : min(case.t, case.chunk_len)] = 0.0  # row 0's first chunk activates nothing
    if case.b > 1:
        a[-1, 0] = rng.random(case.e) + 0.1  # a token of the last row activates every expert
    w_up = rng.normal(size=(case.e, case.d, case.f)) / np.sqrt(case.d)
    w_down = rng.normal(size=(case.e, case.f, case.d)) / np.sqrt(case.f)
    return (jnp.asarray(x, dt), jnp.asarray(a, jnp.float32), jnp.asarray(w_up, dt), jnp.asarray(w_down, dt))


def numpy_oracle(x, a, w_up, w_down):
    x, a, w_up, w_down = (np.asarray(v, np.float64) for v in (x, a, w_up, w_down))
    b, t, d = x.shape
    y = np.zeros((b, t, d))
    for i in range(b):
        for j in range(t):
            for e in np.nonzero(a[i, j])[0]:
                u = x[i, j] @ w_up[e]
                y[i, j] += a[i, j, e] * (u / (1.0 + np.exp(-u))) @ w_down[e]
    return y


def numpy_union(a, chunk_len: int):
    a = np.asarray(a)
    b, t, e = a.shape
    n, length = chunk_shape(t, chunk_len)
    out = np.zeros((b, n, e), bool)
    for i in range(b):
        for c in range(n):
            out[i, c] = (a[i, c * length:(c + 1) * length] != 0).any(0)
    return out


class ChunkTestBase:
    """``run(case, x, a, w_up, w_down) -> (y [B, T, D], reads [B, n, E] bool)``."""

    cases = CASES
    tol = 1e-5

    def run(self, case, x, a, w_up, w_down):
        raise NotImplementedError

    def test_values_and_experts_read(self, case):
        x, a, w_up, w_down = make_inputs(case)
        y, reads = self.run(case, x, a, w_up, w_down)
        want = numpy_oracle(x, a, w_up, w_down)
        tol = self.tol if case.dtype == "float32" else 3e-2
        np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=tol, atol=tol, err_msg=case.name)
        assert y.shape == x.shape and y.dtype == x.dtype
        np.testing.assert_array_equal(np.asarray(reads), numpy_union(a, case.chunk_len), err_msg=case.name)
        assert not np.asarray(reads)[0, 0].any()  # the idle chunk read no expert
