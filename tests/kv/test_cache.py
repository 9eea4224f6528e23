"""The slot cache: appends take each head's next free slots in token order, slots remember
their positions (-1 empty), overwrites and overflow, and masks by position per head."""

import jax.numpy as jnp
import numpy as np

from jaxeff.kv import KVCache, LayerKV


def _kv(b, t, k, d, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(b, t, k, d)), jnp.float32),
            jnp.asarray(rng.normal(size=(b, t, k, d)), jnp.float32))


def test_append_fills_next_slots_in_token_order_and_skips_unkept():
    layer = LayerKV.empty(2, 3, 6, 4)
    k, v = _kv(2, 4, 3, 4)
    pos = jnp.asarray([[0, 1, 2, 3], [5, 6, 7, 8]])
    keep = jnp.asarray([[True, False, True, True], [True, True, False, False]])
    layer, slots = layer.append(k, v, pos, keep)
    np.testing.assert_array_equal(np.asarray(slots[:, 0]), [[0, 6, 1, 2], [0, 1, 6, 6]])  # 6 = capacity: skipped
    np.testing.assert_array_equal(np.asarray(layer.counts), [[3] * 3, [2] * 3])
    np.testing.assert_array_equal(np.asarray(layer.positions[0, 1]), [0, 2, 3, -1, -1, -1])
    np.testing.assert_array_equal(np.asarray(layer.positions[1, 2]), [5, 6, -1, -1, -1, -1])
    np.testing.assert_array_equal(np.asarray(layer.k[0, :, 1]), np.asarray(k[0, 2]))  # [B, K, C, D] layout
    np.testing.assert_array_equal(np.asarray(layer.v[1, :, 1]), np.asarray(v[1, 1]))
    assert not np.asarray(layer.k[0, :, 3:]).any()


def test_heads_with_different_counts_append_at_their_own_slots_and_overflow_drops():
    layer = LayerKV.empty(1, 2, 4, 2)
    layer = LayerKV(k=layer.k, v=layer.v, positions=layer.positions.at[0, 1, :3].set(jnp.asarray([0, 1, 2])),
                    counts=jnp.asarray([[0, 3]]))
    k, v = _kv(1, 2, 2, 2, seed=1)
    layer, slots = layer.append(k, v, jnp.asarray([[3, 4]]))
    np.testing.assert_array_equal(np.asarray(slots[0]), [[0, 1], [3, 4]])  # head 1's second token overflows
    np.testing.assert_array_equal(np.asarray(layer.counts), [[2, 4]])
    np.testing.assert_array_equal(np.asarray(layer.positions[0]), [[3, 4, -1, -1], [0, 1, 2, 3]])


def test_write_overwrites_given_slots_only():
    layer = LayerKV.empty(1, 1, 3, 2)
    k, v = _kv(1, 3, 1, 2, seed=2)
    layer, _ = layer.append(k, v, jnp.asarray([[0, 1, 2]]))
    k2, v2 = _kv(1, 2, 1, 2, seed=3)
    out = layer.write(k2, v2, jnp.asarray([[[2, 3]]]))  # slot 3 == capacity: nothing written
    np.testing.assert_array_equal(np.asarray(out.k[0, 0, 2]), np.asarray(k2[0, 0, 0]))
    np.testing.assert_array_equal(np.asarray(out.k[0, 0, :2]), np.asarray(layer.k[0, 0, :2]))
    np.testing.assert_array_equal(np.asarray(out.positions), np.asarray(layer.positions))


def test_mask_goes_by_each_heads_positions():
    layer = LayerKV.empty(1, 2, 4, 2)
    layer = LayerKV(k=layer.k, v=layer.v, positions=jnp.asarray([[[5, 1, 9, -1], [0, 7, 3, 2]]]),
                    counts=jnp.asarray([[3, 4]]))
    dense = np.asarray(layer.mask(jnp.asarray([[6, 8]])).dense(1, 2, 4))  # [B, K, T, C]
    np.testing.assert_array_equal(dense[0, 0], [[1, 1, 0, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(dense[0, 1], [[1, 0, 1, 1], [1, 1, 1, 1]])
    k_all, _ = layer.keys_values(jnp.bfloat16)
    assert k_all.shape == (1, 4, 2, 2) and k_all.dtype == jnp.bfloat16


def test_kv_cache_empty_and_nbytes():
    cache = KVCache.empty(3, 2, 8, 4, 16, dtype=jnp.bfloat16)
    assert len(cache.layers) == 3 and cache.capacity == 8 and cache.batch == 2
    per_layer = 2 * (2 * 4 * 8 * 16 * 2) + 2 * 4 * 8 * 4 + 2 * 4 * 4
    assert cache.nbytes() == 3 * per_layer + 2 * 4
