#!/usr/bin/env bash
# Data-parallel scaling of `jaxeff train --config small` on one host: the same config (same global
# batch) on 1 GPU, then with mesh.data=2 over 2 GPUs. Writes each run's metrics.jsonl and log to
# $OUT (or ./dp_scaling_out). Usage: bash experiments/dp_scaling.sh [STEPS]
set -uo pipefail
steps="${1:-500}"
out="${OUT:-dp_scaling_out}"
mkdir -p "$out"
common=(--config small --set train.steps=$steps --set train.eval_every=$steps --set train.ckpt_every=$steps
        --set train.log_every=25 --set train.sample_tokens=0)
run() {  # name, devices, extra args...
  local name=$1 devs=$2; shift 2
  rm -rf "/tmp/dp_$name"
  [ -d /tmp/dp_tok ] && mkdir -p "/tmp/dp_$name" && cp -r /tmp/dp_tok "/tmp/dp_$name/tokenizer"
  CUDA_VISIBLE_DEVICES=$devs timeout 300 python3 -m jaxeff.cli train "${common[@]}" --set run_dir=/tmp/dp_$name "$@" \
    2>&1 | tr '\r' '\n' | grep -vE "it/s\]$|^$|Warn" | tee "$out/$name.log" | tail -6
  cp "/tmp/dp_$name/metrics.jsonl" "$out/$name.metrics.jsonl" 2>/dev/null
  [ -d /tmp/dp_tok ] || cp -r "/tmp/dp_$name/tokenizer" /tmp/dp_tok
}
nvidia-smi --query-gpu=name --format=csv,noheader
run gpu1 0
run gpu2 0,1 --set mesh.data=2
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
def load(n):
    return [json.loads(l) for l in open(f"{out}/{n}.metrics.jsonl")]
a, b = load("gpu1"), load("gpu2")
la = {r["step"]: r["loss"] for r in a if "loss" in r}
lb = {r["step"]: r["loss"] for r in b if "loss" in r}
common = sorted(set(la) & set(lb))
diff = max(abs(la[s] - lb[s]) for s in common)
ta = sorted(r["tokens_per_s"] for r in a if "tokens_per_s" in r)[1:]
tb = sorted(r["tokens_per_s"] for r in b if "tokens_per_s" in r)[1:]
med = lambda x: x[len(x) // 2]
print(f"loss at steps {common[0]}..{common[-1]}: max |1gpu - 2gpu| = {diff:.4f}")
print(f"tokens/s median: 1 GPU {med(ta):,.0f}, 2 GPUs {med(tb):,.0f}, speed-up {med(tb) / med(ta):.3f}")
json.dump({"loss_1gpu": la, "loss_2gpu": lb, "tok_s_1gpu": med(ta), "tok_s_2gpu": med(tb),
           "speedup": med(tb) / med(ta), "max_loss_diff": diff}, open(f"{out}/dp_summary.json", "w"), indent=1)
PY
