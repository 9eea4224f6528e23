"""Writes golden.npz: logits and greedy generations of fixed-seed models, so that refactors can
prove they change no numbers (tests/models/test_golden.py compares against it).

Run from the repository root: ``JAX_PLATFORMS=cpu python tests/models/golden/make_golden.py``.
It was run once on the code before the architecture redesign (commit 253ef41); re-run it only
when a change is *meant* to alter the numbers, and say so in the commit.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

from golden_cases import CASES, run_case, run_gguf  # noqa: E402


def main() -> None:
    out = {}
    for name in CASES:
        for key, value in run_case(name).items():
            out[f"{name}/{key}"] = value
            print(name, key, value.shape, value.dtype)
    for key, value in run_gguf().items():
        out[f"gguf/{key}"] = value
        print("gguf", key, value.shape, value.dtype)
    np.savez_compressed(os.path.join(os.path.dirname(__file__), "golden.npz"), **out)


if __name__ == "__main__":
    main()
