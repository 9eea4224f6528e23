"""Dispatch: ``auto`` is the reference on a CPU, named kernels run in interpret mode here."""

import jax.numpy as jnp

from pallas_kernels.chunk_sparse_ffn import api


def test_auto_on_cpu_is_the_reference_and_named_impls_are_kept():
    x = jnp.zeros((2, 4, 128), jnp.bfloat16)
    w_up, w_down = jnp.zeros((8, 128, 64), jnp.bfloat16), jnp.zeros((8, 64, 128), jnp.bfloat16)
    assert api.which_impl(x, w_up, w_down) == "reference"
    assert api.which_impl(x, w_up, w_down, "portable") == "portable"
    assert api.which_impl(x, w_up, w_down, "mosaic_gpu") == "mosaic_gpu"
