"""Dispatch: auto is the reference on CPU; named implementations run (interpret mode on CPU) or
say why they do not apply."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import api

from .test_base import CASES, make_inputs


def test_auto_is_the_reference_on_cpu_and_named_kernels_agree():
    q, k, v, pos, q_pos, counts = make_inputs(CASES[0])
    assert api.which_impl(q, k, v) == "reference"
    ref = api.decode_attention(q, k, v, pos, q_pos, counts)
    port = api.decode_attention(q, k, v, pos, q_pos, counts, impl="portable", block_c=16)
    np.testing.assert_allclose(np.asarray(port), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_bad_impl_and_inputs():
    q, k, v, pos, q_pos, counts = make_inputs(CASES[0])
    with pytest.raises(ValueError, match="impl must be one of"):
        api.decode_attention(q, k, v, pos, q_pos, counts, impl="triton")
    with pytest.raises(ValueError, match="impl='mosaic_gpu' does not apply: q, k, v must all be bfloat16"):
        api.decode_attention(q, k, v, pos, q_pos, counts, impl="mosaic_gpu")
    with pytest.raises(ValueError, match="counts must be"):
        api.decode_attention(q, k, v, pos, q_pos, counts[:, :1], impl="portable")
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        api.decode_attention(q[:, :, :5], k, v, pos, q_pos, counts, impl="portable")
    assert jnp.asarray(0).ndim == 0
