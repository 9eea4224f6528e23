"""experiments/op_profile.py: a traced call's ops (CPU: no device planes, reported as such), bad input."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "experiments"))
from op_profile import print_profile, profile_ops  # noqa: E402


def test_profile_of_a_jitted_call_on_the_cpu(capsys):
    fn = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    rep = profile_ops(fn, jnp.ones((64, 64)), calls=2)
    assert rep["ops"] == [] and rep["device_ms"] is None and "no device ops" in rep["note"]
    print_profile("tanh", rep)
    assert "no device ops" in capsys.readouterr().out


def test_calls_must_be_positive():
    with pytest.raises(ValueError, match="calls must be >= 1"):
        profile_ops(jax.jit(lambda x: x), jnp.ones(2), calls=0)
