#!/usr/bin/env bash
# The test suite: every test not marked slow, on the CPU with eight simulated devices, in
# parallel worker processes (pytest-xdist; JAXEFF_TEST_WORKERS, default 2: most tests are bound by
# XLA's compile time, which runs on one core). Extra arguments go to pytest, e.g.
# `bash scripts/test.sh -m slow` for the slow set or `bash scripts/test.sh tests/sparse -n 0`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh" test
cd "$root"
export JAX_PLATFORMS=cpu
python -m pytest -m "not slow" -q -n "${JAXEFF_TEST_WORKERS:-2}" --dist loadfile "$@"
