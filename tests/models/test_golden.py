"""Refactors change no numbers: fixed-seed models give the logits and greedy generations that
tests/models/golden/golden.npz recorded before the architecture redesign (make_golden.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.models.golden_cases import CASES, _tokens, run_case, run_gguf

GOLDEN = np.load(os.path.join(os.path.dirname(__file__), "golden", "golden.npz"))


def _check(prefix: str, got: dict[str, np.ndarray], valid=None) -> None:
    """Logits at real tokens (padding positions carry no meaning) and generations exactly."""
    want_keys = sorted(k.split("/", 1)[1] for k in GOLDEN.files if k.startswith(prefix + "/"))
    assert sorted(got) == want_keys
    for key, value in got.items():
        want = GOLDEN[f"{prefix}/{key}"]
        if key.startswith("generate"):
            np.testing.assert_array_equal(value, want, err_msg=f"{prefix}/{key}")
        else:
            if valid is not None and value.ndim == 3:
                value, want = value[valid], want[valid]
            np.testing.assert_allclose(value, want, rtol=2e-5, atol=2e-5, err_msg=f"{prefix}/{key}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_case_matches_golden(name):
    _check(name, run_case(name), valid=np.asarray(_tokens()[1]) != 0)


def test_gguf_matches_golden():
    pytest.importorskip("gguf")
    _check("gguf", run_gguf())
