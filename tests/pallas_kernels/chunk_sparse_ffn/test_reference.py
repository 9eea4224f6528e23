"""The jnp oracle and the union lists against numpy transcriptions."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.chunk_sparse_ffn import api, common, reference

from .test_base import ChunkTestBase


class TestReference(ChunkTestBase):
    def run(self, case, x, a, w_up, w_down):
        return api.chunk_sparse_ffn(x, a, w_up, w_down, chunk_len=case.chunk_len, impl="reference", return_reads=True)


def test_union_lists_are_compacted_ascending_and_padded_with_the_last_id():
    a = np.zeros((3, 4, 6), np.float32)
    a[0, 1, 4] = a[0, 3, 1] = a[0, 2, 4] = 1.0  # experts {1, 4}
    a[2, :, :] = 0.5  # every expert
    ids, counts = common.union_lists(jnp.asarray(a))
    np.testing.assert_array_equal(np.asarray(counts), [2, 0, 6])
    np.testing.assert_array_equal(np.asarray(ids), [[1, 4, 4, 4, 4, 4], [0] * 6, [0, 1, 2, 3, 4, 5]])


def test_chunks_are_whole_rows_up_to_chunk_len_then_chunk_len_tokens():
    assert common.chunk_shape(1, 64) == (1, 1)
    assert common.chunk_shape(64, 64) == (1, 64)
    assert common.chunk_shape(65, 64) == (2, 64)
    x = jnp.arange(2 * 5 * 1, dtype=jnp.float32).reshape(2, 5, 1)
    c = common.to_chunks(x, 2)
    assert c.shape == (6, 2, 1)
    np.testing.assert_array_equal(np.asarray(common.from_chunks(c, 2, 5)), np.asarray(x))


def test_experts_read_is_the_union():
    a = jnp.asarray([[[0, 1.0, 0], [0, 0, 2.0]]])
    np.testing.assert_array_equal(np.asarray(reference.experts_read(a)), [[False, True, True]])


@pytest.mark.parametrize("bad, match", [
    (dict(x=jnp.zeros((2, 3))), "x must be"),
    (dict(a=jnp.zeros((1, 2, 5))), "a must be"),
    (dict(w_down=jnp.zeros((4, 3, 8))), "w_down must be"),
    (dict(chunk_len=0), "chunk_len must be"),
])
def test_bad_input_names_the_argument(bad, match):
    args = dict(x=jnp.zeros((1, 2, 8)), a=jnp.zeros((1, 2, 4)), w_up=jnp.zeros((4, 8, 6)), w_down=jnp.zeros((4, 6, 8)),
                chunk_len=64)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        api.chunk_sparse_ffn(args["x"], args["a"], args["w_up"], args["w_down"], chunk_len=args["chunk_len"])
    with pytest.raises(ValueError, match="impl must be"):
        api.chunk_sparse_ffn(jnp.zeros((1, 2, 8)), jnp.zeros((1, 2, 4)), jnp.zeros((4, 8, 6)), jnp.zeros((4, 6, 8)),
                             impl="triton")
