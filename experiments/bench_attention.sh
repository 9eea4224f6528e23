#!/usr/bin/env bash
# The block-sparse attention benchmark on one GPU (see experiments/bench_attention.py): the jax
# side (jaxeff, cuDNN, tokamax), the torch side (FlexAttention) on the same inputs and blocks,
# then the merged JSON in $OUT (or the current folder) and a PNG.
# Usage: bash experiments/bench_attention.sh [--quick]
# With tokamax's wheels carried in .whl (and the xprof stub in .carry/stubs), they are installed first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-.}"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site:$PWD/.carry/stubs"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# JAX_DEADLINE / TORCH_DEADLINE: seconds after which a part starts no new case (to fit a time limit)
XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 python3 experiments/bench_attention.py --part jax --deadline-s "${JAX_DEADLINE:-1e9}" "$@" \
  2>&1 | tee "$out/bench_attention_jax.log"
cp /tmp/bench_attention_jax.json "$out/" 2>/dev/null || true
python3 experiments/bench_attention.py --part torch --deadline-s "${TORCH_DEADLINE:-1e9}" "$@" 2>&1 \
  | tee "$out/bench_attention_torch.log"
python3 experiments/bench_attention.py --part merge --out "$out/bench_attention.json" "$@"
python3 experiments/plot_attention.py "$out/bench_attention.json" --out "$out/bench_attention.png" || true
