"""The portable Pallas kernel in interpret mode: values, and the experts it really loaded (its own
record, written inside the expert loop) equal each chunk's union."""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.chunk_sparse_ffn import api, common, portable

from .test_base import CASES, ChunkTestBase, make_inputs


class TestPortable(ChunkTestBase):
    def run(self, case, x, a, w_up, w_down):
        return api.chunk_sparse_ffn(x, a, w_up, w_down, chunk_len=case.chunk_len, impl="portable", return_reads=True)


def test_a_corrupted_list_changes_the_experts_read():
    """The kernel follows the list it is given (it reads nothing else): dropping an expert from a
    chunk's list removes it from the record and from the output."""
    x, a, w_up, w_down = make_inputs(CASES[1])
    xc, ac = common.to_chunks(x, 64), common.to_chunks(a, 64)
    ids, counts = common.union_lists(ac)
    y_full, reads = portable.chunk_sparse_ffn(xc, ac, w_up, w_down, ids, counts, interpret=True, return_reads=True)
    y_cut, reads_cut = portable.chunk_sparse_ffn(xc, ac, w_up, w_down, ids, counts.at[1].add(-1), interpret=True,
                                                 return_reads=True)
    dropped = int(ids[1, counts[1] - 1])
    assert bool(reads[1, dropped]) and not bool(reads_cut[1, dropped])
    np.testing.assert_array_equal(np.asarray(y_cut[0]), np.asarray(y_full[0]))
    assert not np.allclose(np.asarray(y_cut[1]), np.asarray(y_full[1]))


def test_runs_under_jit_with_bf16():
    x, a, w_up, w_down = make_inputs(CASES[0])
    bf = lambda v: v.astype(jnp.bfloat16)  # noqa: E731
    y = jax.jit(lambda *v: api.chunk_sparse_ffn(*v, impl="portable"))(bf(x), a, bf(w_up), bf(w_down))
    want = api.chunk_sparse_ffn(x, a, w_up, w_down, impl="reference")
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want), atol=5e-2, rtol=5e-2)
