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


def test_ops_are_ranked_per_call_with_their_hlo(monkeypatch):
    """A GPU-like trace (the 'XLA Ops' line of a device plane): each op's time divided by the
    number of traced calls, most expensive first, with its line from the compiled HLO."""
    import op_profile
    fn = jax.jit(lambda x: jnp.tanh(x) + 1.0)
    x = jnp.ones((8,))
    hlo_names = list(op_profile.hlo_lines(fn.lower(x).compile().as_text()))
    named = hlo_names[0]
    fake = {"/device:GPU:0 | XLA Ops": {named: 6e6, "other-op": 12e6, "tiny": 3e3},
            "/device:GPU:0 | Stream #1": {named: 1e9}}
    monkeypatch.setattr(op_profile, "read_trace", lambda _dir: fake)
    rep = profile_ops(fn, x, calls=3, top=2)
    assert rep["op_line"] == "/device:GPU:0 | XLA Ops" and rep["n_ops"] == 3
    assert [r["op"] for r in rep["ops"]] == ["other-op", named]
    assert rep["ops"][0]["ms"] == pytest.approx(4.0) and rep["ops"][1]["ms"] == pytest.approx(2.0)
    assert rep["device_ms"] == pytest.approx(6.001)
    assert rep["ops"][1]["hlo"] and rep["ops"][0]["hlo"] == ""
