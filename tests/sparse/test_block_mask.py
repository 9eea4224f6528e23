"""create_block_mask against a separate numpy construction of the lists: partial / full split,
ascending order, counts, padding entries, transposed lists; random masks, uneven lengths, B/H
broadcasting, T != S, block sizes 16..128; traced inputs under jit without retracing; to_dense,
block_density, the picture, bounded memory at long lengths, and bad inputs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff import sparse
from jaxeff import sparse as sp
from jaxeff.sparse import block_mask as block_mask_lib

RNG = np.random.default_rng(1)


def numpy_lists(dense: np.ndarray, bq: int, bk: int) -> dict[str, np.ndarray]:
    """The eight lists of a dense mask [B, H, T, S], by loops over blocks: a block is full when
    every element of it is a real, allowed element, partial when some are, else empty."""
    b, h, t, s = dense.shape
    nq, nk = -(-t // bq), -(-s // bk)
    state = np.zeros((b, h, nq, nk), np.int8)
    for bi, hi, i, j in np.ndindex(b, h, nq, nk):
        tile = np.zeros((bq, bk), bool)
        part = dense[bi, hi, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
        tile[:part.shape[0], :part.shape[1]] = part
        state[bi, hi, i, j] = 2 if tile.all() else (1 if tile.any() else 0)

    def lists(flags):
        n = flags.shape[-1]
        counts = np.zeros(flags.shape[:-1], np.int32)
        idx = np.zeros(flags.shape, np.int32)
        for pos in np.ndindex(*flags.shape[:-1]):
            active = [j for j in range(n) if flags[pos][j]]
            counts[pos] = len(active)
            idx[pos] = active + [active[-1] if active else 0] * (n - len(active))
        return counts, idx

    out = {}
    for prefix, value in (("", 1), ("full_", 2)):
        out[f"{prefix}kv_num_blocks"], out[f"{prefix}kv_indices"] = lists(state == value)
        out[f"{prefix}q_num_blocks"], out[f"{prefix}q_indices"] = lists((state == value).swapaxes(-1, -2))
    return out


LIST_NAMES = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices",
              "full_q_num_blocks", "full_q_indices")


def assert_lists(bm: sparse.BlockMask, dense: np.ndarray):
    want = numpy_lists(dense, *bm.block_size)
    for name in LIST_NAMES:
        got = np.asarray(getattr(bm, name))
        assert got.dtype == np.int32, name
        np.testing.assert_array_equal(got, want[name], err_msg=name)


def random_blocky(shape, rng, bq=16, bk=16):
    """Random elements inside random blocks plus some all-True blocks: every block state occurs."""
    *lead, t, s = shape
    nb = (*lead, -(-t // bq), -(-s // bk))
    up = lambda x: np.repeat(np.repeat(x, bq, -2), bk, -1)[..., :t, :s]  # noqa: E731
    return ((rng.random(shape) < 0.3) & up(rng.random(nb) < 0.6)) | up(rng.random(nb) < 0.2)


@pytest.mark.parametrize("b,h,t,s,bq,bk", [
    (2, 3, 96, 96, 16, 16),
    (1, 2, 100, 70, 32, 16),  # uneven lengths, T != S
    (2, 1, 50, 130, 16, 64),
    (1, 1, 200, 200, 128, 128),
    (1, 2, 33, 257, 64, 32),
])
def test_lists_match_numpy_for_random_masks(b, h, t, s, bq, bk):
    dense = random_blocky((b, h, t, s), RNG, bq, bk)
    bm = sparse.create_block_mask(sparse.from_dense(dense), b, h, t, s, block_q=bq, block_kv=bk)
    assert bm.shape == (b, h, t, s) and bm.block_size == (bq, bk) and bm.seq_lengths == (t, s)
    assert_lists(bm, dense)
    np.testing.assert_array_equal(bm.to_dense(), dense)
    states = np.asarray(bm.block_states())
    if states[0, 0].size >= 16:
        assert set(np.unique(states)) == {0, 1, 2}
    np.testing.assert_allclose(float(bm.block_density()), (states > 0).mean(), rtol=1e-6)


def test_padding_blocks_are_never_full():
    bm = sparse.create_block_mask(lambda b, h, q, kv: q >= 0, None, None, 40, 40, block_q=16, block_kv=16)
    states = np.asarray(bm.block_states())[0, 0]
    assert (states[:2, :2] == 2).all() and (states[2, :] == 1).all() and (states[:, 2] == 1).all()
    assert float(bm.block_density()) == 1.0


@pytest.mark.parametrize("b,h", [(None, None), (2, None), (None, 3), (2, 3)])
def test_batch_and_head_broadcasting(b, h):
    t = 64
    seg = np.sort(RNG.integers(0, 3, (2, t)), axis=1)
    per_head = sparse.index_mask(lambda b_, h_, q, kv: kv <= q - 8 * h_)
    fn = sparse.and_masks(sparse.causal(), *([sparse.document(seg)] if b else []), *([per_head] if h else []))
    bm = sparse.create_block_mask(fn, b, h, t, t, block_q=16, block_kv=16)
    assert bm.kv_num_blocks.shape == (b or 1, h or 1, 4)
    hi = np.arange(h or 1)[None, :, None, None]
    qi, ki = np.arange(t)[:, None], np.arange(t)[None, :]
    want = np.broadcast_to(ki <= qi, (b or 1, h or 1, t, t))
    if b:
        want = want & np.stack([seg[i][:, None] == seg[i][None, :] for i in range(b)])[:, None]
    if h:
        want = want & (ki <= qi - 8 * hi)
    np.testing.assert_array_equal(bm.to_dense(), want)
    assert_lists(bm, np.asarray(want))


@pytest.mark.parametrize("block", [16, 32, 64, 128])
def test_structured_masks_all_block_sizes(block):
    t, s = 150, 190
    for fn in (sparse.causal(offset=40), sparse.local(30, 5), sparse.chunked_causal(48),
               sparse.prefix_lm(np.array([70]))):
        bm = sparse.create_block_mask(fn, None, None, t, s, block_q=block, block_kv=block)
        assert_lists(bm, np.asarray(bm.to_dense()))


def test_traced_segment_ids_under_jit_do_not_retrace():
    t, traces = 96, []

    @jax.jit
    def build(seg):
        traces.append(1)
        return sparse.create_block_mask(sparse.and_masks(sparse.causal(), sparse.document(seg)), 2, None, t, t,
                                        block_q=16, block_kv=32)

    for _ in range(3):
        seg = np.sort(RNG.integers(0, 5, (2, t)), axis=1).astype(np.int32)
        bm = build(jnp.asarray(seg))
        eager = sparse.create_block_mask(sparse.and_masks(sparse.causal(), sparse.document(seg)), 2, None, t, t,
                                         block_q=16, block_kv=32)
        for name in LIST_NAMES:
            np.testing.assert_array_equal(getattr(bm, name), getattr(eager, name), err_msg=name)
        assert_lists(bm, np.asarray(eager.to_dense()))
    assert len(traces) == 1


def test_block_mask_is_a_pytree_through_jit():
    seg = jnp.asarray(np.sort(RNG.integers(0, 3, (1, 64)), axis=1))
    bm = sparse.create_block_mask(sparse.and_masks(sparse.causal(), sparse.document(seg)), 1, None, 64, 64,
                                  block_q=16, block_kv=16)
    leaves = jax.tree.leaves(bm)
    assert len(leaves) == 9 and any(x is seg for x in leaves)
    out = jax.jit(lambda m: m)(bm)
    assert isinstance(out, sparse.BlockMask) and out.block_size == (16, 16)
    np.testing.assert_array_equal(jax.jit(lambda m: m.to_dense())(bm), bm.to_dense())
    layout = bm.layout()
    assert (layout.block_q, layout.block_kv, layout.q_len, layout.kv_len) == (16, 16, 64, 64)
    assert bm.element_mask(batch=1).q_segment_ids.shape == (1, 64)


def test_memory_stays_bounded_at_long_lengths():
    """S = 16384, B = 2: no intermediate of the traced computation is as large as one [S, S] mask."""
    length = 16384

    def sizes(jaxpr):
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                yield int(np.prod(getattr(var.aval, "shape", ())))
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        yield from sizes(inner)

    seg = jax.ShapeDtypeStruct((2, length), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda s: sparse.create_block_mask(
        sparse.and_masks(sparse.causal(), sparse.document(s)), 2, None, length, length))(seg)
    assert max(sizes(jaxpr.jaxpr)) <= block_mask_lib.CLASSIFY_BUDGET < length * length
    bm = sparse.create_block_mask(sparse.causal(), 2, None, 4096, 4096)
    assert float(bm.block_density()) == pytest.approx((32 * 33 / 2) / 32 ** 2)


def test_plot_writes_a_png(tmp_path):
    bm = sparse.create_block_mask(sparse.local(40, 0), None, 2, 200, 200, block_q=16, block_kv=16)
    path = bm.plot(tmp_path / "mask.png", h=1)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="outside"):
        bm.plot(tmp_path / "x.png", b=1)


def test_bad_inputs():
    c = sparse.causal()
    for kw, match in ((dict(block_q=48), "block_q must be a power of two"),
                      (dict(block_q=8), "block_q must be a power of two between 16"),
                      (dict(block_kv=512), "block_kv must be a power of two between 16 and 128"),
                      (dict(block_q=True), "block_q")):
        with pytest.raises(ValueError, match=match):
            sparse.create_block_mask(c, 1, 1, 100, 100, **kw)
    sparse.create_block_mask(c, 1, 1, 5, 5, block_q=16, block_kv=16)  # 16 is always allowed
    with pytest.raises(ValueError, match="Q_LEN must be a positive integer"):
        sparse.create_block_mask(c, 1, 1, 0, 100)
    with pytest.raises(ValueError, match="B must be a positive integer or None"):
        sparse.create_block_mask(c, 0, 1, 10, 10, block_q=16, block_kv=16)
    with pytest.raises(ValueError, match="mask_fn must be callable"):
        sparse.create_block_mask("causal", 1, 1, 10, 10, block_q=16, block_kv=16)
    seg = np.zeros((2, 32), np.int32)
    with pytest.raises(ValueError, match="document.*lengths.*kv_segment_ids"):
        sparse.create_block_mask(sparse.document(seg), 2, None, 32, 48, block_q=16, block_kv=16)
    with pytest.raises(ValueError, match="document segment ids: batch size 2 but B=None .*pass B"):
        sparse.create_block_mask(sparse.document(seg), None, None, 32, 32, block_q=16, block_kv=16)
    with pytest.raises(ValueError, match="document segment ids: batch size 2 but B=3"):
        sparse.create_block_mask(sparse.document(seg), 3, None, 32, 32, block_q=16, block_kv=16)
    with pytest.raises(ValueError, match=r"from_dense\(mask\): mask has lengths"):
        sparse.create_block_mask(sparse.from_dense(np.ones((32, 32), bool)), None, None, 32, 40, block_q=16,
                                 block_kv=16)
    with pytest.raises(ValueError, match=r"from_dense\(mask\): mask has 2 heads but H=None"):
        sparse.create_block_mask(sparse.from_dense(np.ones((2, 32, 32), bool)), None, None, 32, 32, block_q=16,
                                 block_kv=16)
    with pytest.raises(ValueError, match="prefix_lm"):
        sparse.create_block_mask(sparse.prefix_lm(np.array([1, 2])), 3, None, 32, 32, block_q=16, block_kv=16)
    # Inside and_masks the arrays are checked too.
    with pytest.raises(ValueError, match="document"):
        sparse.create_block_mask(sparse.and_masks(c, sparse.document(seg)), None, None, 32, 32, block_q=16,
                                 block_kv=16)
    assert dataclasses.is_dataclass(sparse.BlockMask)


def test_dense_parts_use_the_block_lists_batch_and_heads():
    """A custom callable's dense part is materialised at the sizes its lists were built with
    (here broadcast B = H = 1), while segment ids follow the input batch."""
    seg = np.zeros((1, 32), np.int32)
    fn = sparse.and_masks(sparse.document(seg), lambda b, h, q, kv: (q + kv) % 2 == 0)
    bm = sparse.create_block_mask(fn, None, None, 32, 32, block_q=16, block_kv=16)
    em = bm.element_mask(batch=4, heads=8)
    assert em.dense.shape == (1, 1, 32, 32) and em.q_segment_ids.shape == (4, 32)


# --- block tables (what block-selection methods return) -------------------------------------------

@pytest.mark.parametrize("q_len,kv_len", [(64, 64), (50, 70)])
def test_from_blocks_lists_exactly_the_table_and_needs_no_element_mask(q_len, kv_len):
    rng = np.random.default_rng(3)
    nq, nk = -(-q_len // 16), -(-kv_len // 16)
    table = rng.random((2, 3, nq, nk)) < 0.4
    bm = sp.create_block_mask(sp.from_blocks(table, 16), 2, 3, q_len, kv_len, block_q=16, block_kv=16)
    states = np.asarray(bm.block_states())
    padded = np.zeros((nq, nk), bool)
    padded[-1, :] |= q_len % 16 != 0
    padded[:, -1] |= kv_len % 16 != 0
    np.testing.assert_array_equal(states > 0, table)
    np.testing.assert_array_equal(states == 1, table & padded)  # only padding makes a block partial
    dense = np.repeat(np.repeat(table, 16, 2), 16, 3)[:, :, :q_len, :kv_len]
    np.testing.assert_array_equal(np.asarray(bm.to_dense()), dense)
    assert bm.element_mask().dense is None  # nothing to evaluate inside blocks
    # at another block size the table is an ordinary (dense) mask and still exact
    other = sp.create_block_mask(sp.from_blocks(table, 16), 2, 3, q_len, kv_len, block_q=32, block_kv=32)
    assert other.element_mask().dense is not None
    np.testing.assert_array_equal(np.asarray(other.to_dense()), dense)


def test_from_blocks_attention_equals_dense_reference():
    rng = np.random.default_rng(4)
    table = rng.random((1, 2, 4, 4)) < 0.5
    table[0, 0, 1] = False  # an empty query block
    bm = sp.create_block_mask(sp.from_blocks(table, 16), 1, 2, 64, 64, block_q=16, block_kv=16)
    q = jnp.asarray(rng.normal(size=(1, 64, 2, 16)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(1, 64, 1, 16)), jnp.float32)
    out = sp.block_sparse_attention(q, kv, kv, bm, impl="pallas")
    want = sp.block_sparse_attention(q, kv, kv, bm, impl="reference")
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert not np.asarray(out[0, 16:32, 0]).any()


def test_from_blocks_rejects_bad_tables():
    with pytest.raises(ValueError, match="from_blocks: table must be a boolean"):
        sp.from_blocks(np.ones((2, 2), np.int32))
    with pytest.raises(ValueError, match="table has 2 x 2 blocks"):
        sp.create_block_mask(sp.from_blocks(np.ones((2, 2), bool), 16), None, None, 64, 64, block_q=16, block_kv=16)
