"""Shared cases for the decode-attention implementations: ragged per-head slot counts, empty
heads, gaps in the positions (an evicted cache), GQA groups, a few query tokens per row
(speculative verification) and caches long enough to split over several programs. Each
implementation's test file subclasses :class:`DecodeTestBase`."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from pallas_kernels.decode_attention import reference


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    b: int
    t: int
    h: int
    kh: int
    c: int
    d: int
    dtype: str = "float32"
    n_splits: int | None = None
    empty_head: bool = True


CASES = (
    Case("one_token_gqa3", 2, 1, 6, 2, 100, 16),
    Case("three_tokens_mha", 1, 3, 2, 2, 70, 8, n_splits=3),
    Case("long_split", 1, 1, 4, 1, 600, 16),
    Case("full_counts", 2, 2, 4, 2, 64, 8, empty_head=False),
)
HOPPER_CASES = (
    Case("hopper_gqa4_d64", 1, 1, 8, 2, 150, 64, "bfloat16", n_splits=2),
    Case("hopper_two_tokens_d128", 1, 2, 4, 1, 130, 128, "float16"),
)


def make_inputs(case: Case, seed: int = 0):
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(case.dtype)
    q = jnp.asarray(rng.normal(size=(case.b, case.t, case.h, case.d)), dt)
    k = jnp.asarray(rng.normal(size=(case.b, case.kh, case.c, case.d)), dt)
    v = jnp.asarray(rng.normal(size=(case.b, case.kh, case.c, case.d)), dt)
    counts = rng.integers(case.c // 3, case.c + 1, (case.b, case.kh))
    if case.empty_head:
        counts[0, -1] = 0
    else:
        counts[:] = case.c
    span = 2 * case.c
    pos = np.full((case.b, case.kh, case.c), -1, np.int32)
    for i in range(case.b):
        for h in range(case.kh):
            n = int(counts[i, h])
            pos[i, h, :n] = np.sort(rng.choice(span, n, replace=False))
    q_pos = np.stack([span - case.t + np.arange(case.t) - 3 * i for i in range(case.b)]).astype(np.int32)
    return q, k, v, jnp.asarray(pos), jnp.asarray(q_pos), jnp.asarray(counts, jnp.int32)


def numpy_oracle(q, k, v, pos, q_pos, counts):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    pos, q_pos, counts = np.asarray(pos), np.asarray(q_pos), np.asarray(counts)
    b, t, h, d = q.shape
    kh = k.shape[1]
    o = np.zeros((b, t, h, d))
    lse = np.full((b, t, h), -np.inf)
    for i in range(b):
        for j in range(t):
            for hh in range(h):
                g = hh // (h // kh)
                ok = [c for c in range(k.shape[2]) if c < counts[i, g] and 0 <= pos[i, g, c] <= q_pos[i, j]]
                if not ok:
                    continue
                s = k[i, g, ok] @ q[i, j, hh] / np.sqrt(d)
                m = s.max()
                w = np.exp(s - m)
                o[i, j, hh] = w @ v[i, g, ok] / w.sum()
                lse[i, j, hh] = m + np.log(w.sum())
    return o, lse


def close(name, got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    fin = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), fin, err_msg=name)
    np.testing.assert_allclose(np.where(fin, got, 0), np.where(fin, want, 0), rtol=tol, atol=tol, err_msg=name)


class DecodeTestBase:
    """``run(case, inputs) -> (o, lse)`` for the implementation under test."""

    cases = CASES
    tol = 1e-5

    def run(self, case, q, k, v, pos, q_pos, counts):
        raise NotImplementedError

    def test_against_the_reference(self, case):
        q, k, v, pos, q_pos, counts = make_inputs(case)
        o, lse = self.run(case, q, k, v, pos, q_pos, counts)
        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        o_r, lse_r = reference.decode_attention(f32(q), f32(k), f32(v), pos, q_pos, counts, return_lse=True)
        tol = self.tol if case.dtype == "float32" else 2e-2
        close(f"{case.name} o", o, o_r, tol)
        close(f"{case.name} lse", lse, lse_r, tol)
        if case.empty_head:  # the empty head's group: o = 0, lse = -inf
            g = case.h // case.kh
            assert not np.asarray(o, np.float32)[0, :, -g:].any()
            assert np.isneginf(np.asarray(lse)[0, :, -g:]).all()
