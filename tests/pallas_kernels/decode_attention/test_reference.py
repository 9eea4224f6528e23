"""The jnp reference against a numpy loop over rows, tokens and heads."""

import jax.numpy as jnp

from pallas_kernels.decode_attention import reference

from .test_base import CASES, close, make_inputs, numpy_oracle


def test_reference_matches_numpy_on_every_case():
    for case in CASES:
        q, k, v, pos, q_pos, counts = make_inputs(case, seed=1)
        o, lse = reference.decode_attention(q, k, v, pos, q_pos, counts, return_lse=True)
        o_n, lse_n = numpy_oracle(q, k, v, pos, q_pos, counts)
        close(case.name, o, o_n, 1e-5)
        close(case.name, lse, lse_n, 1e-5)


def test_counts_default_to_the_whole_cache_and_positions_decide():
    q, k, v, pos, q_pos, _ = make_inputs(CASES[3])
    a = reference.decode_attention(q, k, v, pos, q_pos)
    b = reference.decode_attention(q, k, v, pos, q_pos, jnp.full((2, 2), 64, jnp.int32))
    close("counts", a, b, 0)
