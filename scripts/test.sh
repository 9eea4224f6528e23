#!/usr/bin/env bash
# The test suite: unit tests (not marked slow) plus a short end-to-end training run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh" test
cd "$root"
export JAX_PLATFORMS=cpu
python -m pytest -m "not slow" -q "$@"
