#!/usr/bin/env bash
# The main job: train the `tiny` preset on the Shakespeare plays (CPU, <10 minutes), report
# validation loss against the unigram baseline, save a checkpoint and print a sample.
# Re-running resumes from the latest checkpoint in runs/tiny.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh" test
cd "$root"
exec jaxeff train --config tiny "$@"
