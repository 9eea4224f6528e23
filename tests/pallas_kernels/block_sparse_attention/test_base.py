"""Shared cases for every block-sparse attention implementation (tokamax-style test base).

Subclass :class:`AttentionTestBase` in ``test_<impl>.py`` and set ``impl`` (and ``interpret``,
``cases`` (e.g. ``HOPPER_CASES``), ``lse_grad``, ``skip_blocks`` as needed); each case builds fresh random inputs, a dense element mask,
the layout from it (a numpy construction written here, independent of ``jaxeff.sparse``) and an
``ElementMask`` that exercises index functions, segment ids and dense tiles, then compares
outputs, LSE and gradients (dq, dk, dv through ``jax.vjp`` with random cotangents on o and, where
supported, on the LSE) against ``reference.attention``. Cases an implementation does not support
(its ``applies`` says why) are skipped with that reason.

(``tests/pallas_kernels`` has no ``__init__.py`` on purpose: with one, pytest would import it as
the top-level package ``pallas_kernels`` and shadow the real one.)
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_attention import api, reference
from pallas_kernels.block_sparse_attention.common import ElementMask, SoftCap, SparseLayout


# --- Index functions (module level: hashable, static in kernels) ----------------------------------

def causal_fn(b, h, q, kv):
    return kv <= q


def local_fn(b, h, q, kv):
    return (kv <= q) & (kv >= q - 20)


def per_head_fn(b, h, q, kv):  # head h sees keys at least h * 8 behind: the first rows of h > 0 are empty
    return kv <= q - h * 8


INDEX_FNS = {"causal": causal_fn, "local": local_fn, "per_head": per_head_fn}


# --- Layouts from dense masks (numpy, the padding rule written out) -------------------------------

def lists_from_flags(flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """flags [..., n] -> counts, indices (ascending active, then the last active repeated, 0 if none)."""
    lead, n = flags.shape[:-1], flags.shape[-1]
    counts = np.zeros(lead, np.int32)
    idx = np.zeros(flags.shape, np.int32)
    for pos in np.ndindex(*lead):
        active = np.nonzero(flags[pos])[0]
        counts[pos] = len(active)
        row = np.full(n, active[-1] if len(active) else 0, np.int32)
        row[:len(active)] = active
        idx[pos] = row
    return counts, idx


def layout_from_dense(mask: np.ndarray, bq: int, bk: int) -> SparseLayout:
    """mask [Bm, Hm, T, S] bool -> layout; padded elements count as masked."""
    bm, hm, t, s = mask.shape
    nq, nk = -(-t // bq), -(-s // bk)
    padded = np.zeros((bm, hm, nq * bq, nk * bk), bool)
    padded[:, :, :t, :s] = mask
    tiles = padded.reshape(bm, hm, nq, bq, nk, bk)
    full = tiles.all(axis=(3, 5))
    partial = tiles.any(axis=(3, 5)) & ~full
    arrays = [*lists_from_flags(partial), *lists_from_flags(full), *lists_from_flags(partial.swapaxes(-1, -2)),
              *lists_from_flags(full.swapaxes(-1, -2))]
    return SparseLayout(*map(jnp.asarray, arrays), block_q=bq, block_kv=bk, q_len=t, kv_len=s)


# --- Cases ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    b: int
    t: int
    s: int
    h: int
    kh: int
    d: int
    bq: int
    bk: int
    mask: str  # causal | local | per_head | document | random | empty_rows | full
    dtype: str = "float32"
    soft_cap: float | None = None

    def __str__(self):
        return self.name


CASES = (
    Case("causal_gqa2", 2, 80, 80, 4, 2, 32, 16, 32, "causal"),
    Case("document_causal_gqa4", 1, 100, 100, 4, 1, 32, 32, 16, "document"),
    Case("random_cross_t_ne_s", 2, 64, 96, 2, 2, 16, 32, 32, "random"),
    Case("empty_rows", 1, 70, 50, 2, 1, 32, 16, 16, "empty_rows"),
    Case("all_true", 1, 72, 72, 2, 2, 32, 64, 64, "full"),
    Case("fp16_per_head_index_fn", 1, 48, 48, 4, 2, 16, 16, 16, "per_head", "float16"),
    Case("softcap_local", 1, 96, 96, 4, 2, 32, 32, 32, "local", soft_cap=5.0),
    Case("block128_random", 1, 150, 200, 2, 1, 32, 128, 128, "random"),
    Case("bf16_causal", 1, 128, 128, 4, 2, 64, 64, 64, "causal", "bfloat16"),
    Case("bf16_document_softcap", 2, 100, 100, 2, 1, 32, 32, 32, "document", "bfloat16", soft_cap=10.0),
)

# Cases shaped for kernels with 128 x 128 tiles and 16-bit inputs (e.g. the Hopper kernel):
# ``cases = HOPPER_CASES`` in a subclass.
HOPPER_CASES = (
    Case("hopper_causal_gqa2", 1, 256, 256, 4, 2, 64, 128, 128, "causal", "bfloat16"),
    Case("hopper_document_gqa2", 2, 200, 200, 4, 2, 128, 128, 128, "document", "bfloat16"),
    Case("hopper_random_uneven_t_ne_s", 1, 300, 200, 2, 2, 64, 128, 128, "random", "float16"),
    Case("hopper_empty_rows", 1, 130, 140, 2, 1, 64, 128, 128, "empty_rows", "bfloat16"),
    Case("hopper_softcap_local_gqa4", 1, 256, 256, 4, 1, 64, 128, 128, "local", "bfloat16", soft_cap=20.0),
    Case("hopper_all_true", 1, 256, 384, 2, 2, 128, 128, 128, "full", "float16"),
)

TOLERANCES = {"float32": dict(o=2e-5, lse=2e-5, grad=1e-4), "bfloat16": dict(o=3e-2, lse=3e-2, grad=6e-2),
              "float16": dict(o=5e-3, lse=5e-3, grad=1e-2)}


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


def build_mask(case: Case, rng: np.random.Generator) -> tuple[np.ndarray, ElementMask]:
    """(dense truth [B|1, H|1, T, S], the ElementMask that describes it to kernels)."""
    b, h, t, s = case.b, case.h, case.t, case.s
    qi, ki = np.arange(t)[:, None], np.arange(s)[None, :]
    if case.mask in INDEX_FNS:
        fn = INDEX_FNS[case.mask]
        dense = np.stack([np.asarray(fn(0, hh, qi, ki)) for hh in range(h)])[None]
        if case.mask != "per_head":
            dense = dense[:, :1]
        return dense, ElementMask(index_fn=fn)
    if case.mask == "document":
        seg = np.sort(rng.integers(0, 4, (b, t)), axis=1).astype(np.int32)
        dense = (seg[:, None, :, None] == seg[:, None, None, :]) & (ki <= qi)[None, None]
        return dense, ElementMask(q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg), index_fn=causal_fn)
    if case.mask == "random":
        # Sparse random blocks of random elements: some blocks full, some partial, some empty.
        dense = rng.random((b, h, t, s)) < 0.3
        blocks = rng.random((b, h, -(-t // 16), -(-s // 16))) < 0.6
        dense &= np.repeat(np.repeat(blocks, 16, 2), 16, 3)[:, :, :t, :s]
        dense |= np.repeat(np.repeat(rng.random(blocks.shape) < 0.15, 16, 2), 16, 3)[:, :, :t, :s]
    elif case.mask == "empty_rows":
        dense = rng.random((b, h, t, s)) < 0.4
        dense[:, :, 3] = False  # one empty row
        dense[:, 0, 16:32] = False  # a whole empty query block of head 0
        dense[:, :, t - 1] = False
    elif case.mask == "full":
        dense = np.ones((1, 1, t, s), bool)
    else:
        raise ValueError(case.mask)
    return dense, ElementMask(dense=jnp.asarray(dense))


def make_inputs(case: Case, rng: np.random.Generator):
    dt = jnp.dtype(case.dtype)
    q = jnp.asarray(rng.standard_normal((case.b, case.t, case.h, case.d)), dt)
    k = jnp.asarray(rng.standard_normal((case.b, case.s, case.kh, case.d)), dt)
    v = jnp.asarray(rng.standard_normal((case.b, case.s, case.kh, case.d)), dt)
    return q, k, v


def _close(name, got, want, tol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = max(1.0, float(np.max(np.abs(want[np.isfinite(want)]), initial=0.0)))
    np.testing.assert_allclose(got, want, atol=tol * scale, rtol=tol, err_msg=name)


class AttentionTestBase:
    """The cases; subclasses set ``impl`` (an ``api.IMPLEMENTATIONS`` name) and options."""

    impl = "pallas"
    interpret: bool | None = True
    cases = CASES
    lse_grad = True  # whether gradients flow through the returned LSE
    # test_skips_unlisted_blocks: (block_q, block_kv, head_dim, dtype)
    skip_blocks = (16, 32, 32, "float32")
    slow_cases: tuple[str, ...] = ()  # case names marked ``slow`` (run in the second CI step)

    def attend(self, q, k, v, layout, em, *, score_mod=None, return_lse=True):
        return api.block_sparse_attention(q, k, v, layout, em, score_mod=score_mod, impl=self.impl,
                                          return_lse=return_lse, interpret=self.interpret)

    def _skip_unless_applies(self, q, k, v, layout, em, score_mod):
        ok, why = api.IMPLEMENTATIONS[self.impl].applies(q, k, v, layout, em, score_mod=score_mod,
                                                         interpret=bool(self.interpret))
        if not ok:
            pytest.skip(f"{self.impl} does not apply: {why}")

    def pytest_generate_tests(self, metafunc):  # pytest calls this per test class: one test per case
        if "case" in metafunc.fixturenames:
            params = [pytest.param(c, marks=pytest.mark.slow) if c.name in self.slow_cases else c for c in self.cases]
            metafunc.parametrize("case", params, ids=[c.name for c in self.cases])

    def test_against_reference(self, case: Case):
        rng = _rng(case.name)
        dense, em = build_mask(case, rng)
        layout = layout_from_dense(dense, case.bq, case.bk)
        q, k, v = make_inputs(case, rng)
        score_mod = None if case.soft_cap is None else SoftCap(case.soft_cap)
        self._skip_unless_applies(q, k, v, layout, em, score_mod)
        tol = TOLERANCES[case.dtype]
        do = jnp.asarray(rng.standard_normal(q.shape), q.dtype)
        dlse = jnp.asarray(rng.standard_normal((case.b, case.h, case.t)), jnp.float32)

        def run(fn, *xs, lse_grad):
            if lse_grad:
                (o, lse), vjp = jax.vjp(fn, *xs)
                return o, lse, vjp((do.astype(o.dtype), dlse))
            o, vjp, lse = jax.vjp(fn, *xs, has_aux=True)  # the LSE as a value only
            return o, lse, vjp(do.astype(o.dtype))

        o, lse, grads = run(lambda q, k, v: self.attend(q, k, v, layout, em, score_mod=score_mod), q, k, v,
                            lse_grad=self.lse_grad)
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        o_r, lse_r, grads_r = run(lambda q, k, v: reference.attention(q, k, v, jnp.asarray(dense), score_mod=score_mod,
                                                                      return_lse=True), *f32, lse_grad=self.lse_grad)
        assert o.dtype == q.dtype and o.shape == q.shape
        assert lse.dtype == jnp.float32 and lse.shape == (case.b, case.h, case.t)
        _close("o", o, o_r, tol["o"])
        empty = ~np.broadcast_to(dense, (case.b, case.h, case.t, case.s)).any(-1)  # [B, H, T]
        np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), empty, err_msg="LSE -inf exactly on empty rows")
        _close("lse", np.where(empty, 0, lse), np.where(empty, 0, lse_r), tol["lse"])
        if empty.any():
            np.testing.assert_array_equal(np.asarray(o, np.float32)[np.transpose(empty, (0, 2, 1))], 0.0)
        for name, g, g_r, x in zip(("dq", "dk", "dv"), grads, grads_r, (q, k, v)):
            assert g.dtype == x.dtype and g.shape == x.shape, name
            assert np.isfinite(np.asarray(g, np.float32)).all(), name
            _close(name, g, g_r, tol["grad"])

    def test_skips_unlisted_blocks(self):
        """K/V blocks that no list names are NaN: a kernel that loaded them would return NaN (0 *
        NaN in p @ v), so finite, reference-equal outputs show they were skipped."""
        bq, bk, d, dtype = self.skip_blocks
        t, s = 4 * bq, 3 * bk
        case = Case("skip", 1, t, s, 2, 1, d, bq, bk, "random", dtype)
        rng = _rng("skip")
        dense = np.zeros((1, 2, t, s), bool)
        dense[:, :, :, bk:2 * bk] = rng.random((1, 2, t, bk)) < 0.5  # kv block 1: partial
        dense[:, 0, bq:3 * bq, 2 * bk:] = True  # kv block 2: full for some query blocks of head 0
        layout = layout_from_dense(dense, bq, bk)
        em = ElementMask(dense=jnp.asarray(dense))
        q, k, v = make_inputs(case, rng)
        self._skip_unless_applies(q, k, v, layout, em, None)
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        o_r, _ = reference.attention(*f32, jnp.asarray(dense), return_lse=True)
        k_nan = k.at[:, :bk].set(jnp.nan)
        v_nan = v.at[:, :bk].set(jnp.nan)
        o, _ = self.attend(q, k_nan, v_nan, layout, em)
        _close("o", o, o_r, TOLERANCES[case.dtype]["o"])
        do = jnp.asarray(rng.standard_normal(q.shape), q.dtype)
        _, vjp = jax.vjp(lambda q, k, v: self.attend(q, k, v, layout, em, return_lse=False)[0], q, k_nan, v_nan)
        dq, dk, dv = vjp(do)
        assert np.isfinite(np.asarray(dq, np.float32)).all()
        np.testing.assert_array_equal(np.asarray(dk[:, :bk], np.float32), 0.0)
        np.testing.assert_array_equal(np.asarray(dv[:, :bk], np.float32), 0.0)
