#!/usr/bin/env bash
# The multi-GPU runs of BENCHMARKS.md, one preset per call (each fits a 10-minute device call):
#   bash experiments/scaling_runs.sh small   # 1 vs 2 GPUs at global batch 32 (issue 2), weak scaling to 4
#   bash experiments/scaling_runs.sh 1b      # fsdp / fsdp x tensor at 8 sequences per GPU (8 GPUs when present)
# Writes scaling_<preset>.json / .log under $OUT (or ./scaling_out). A tokenizer folder built
# beforehand (TOKENIZER_DIR, default .carry/tok_shakespeare_bpe32768 when present) skips the BPE
# training.
set -uo pipefail
preset="${1:?usage: scaling_runs.sh small|1b}"
out="${OUT:-scaling_out}"
mkdir -p "$out"
tok="${TOKENIZER_DIR:-.carry/tok_shakespeare_bpe32768}"
tok_args=()
[ -d "$tok" ] && tok_args=(--tokenizer-dir "$tok")
n=$(nvidia-smi -L 2>/dev/null | wc -l)
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
case "$preset" in
  small) layouts=(1:data=1@32 2:data=2@32 1:data=1 8:data=8 4:data=4 4:fsdp=4)
         args=(--per-device-batch 16 --ref-max-batch 32 --loss-steps 30 --timed-steps 15) ;;
  1b)    layouts=(1:data=1 8:fsdp=8 4:fsdp=4 4:fsdp=2,tensor=2 2:fsdp=2)
         args=(--per-device-batch 8 --loss-steps 20 --timed-steps 10) ;;
  *) echo "unknown preset $preset" >&2; exit 2 ;;
esac
# LAYOUTS="1:data=1 4:data=2,fsdp=2" replaces the list; layouts needing more GPUs than visible are dropped.
[ -n "${LAYOUTS:-}" ] && read -ra layouts <<< "$LAYOUTS"
keep=()
for l in "${layouts[@]}"; do [ "${l%%:*}" -le "$n" ] && keep+=(--layout "$l"); done
timeout "${LIMIT_S:-560}" python3 experiments/scaling.py --preset "$preset" "${args[@]}" "${keep[@]}" \
  "${tok_args[@]}" --time-limit "${TIME_LIMIT_S:-420}" --out "$out/scaling_$preset.json" 2>&1 \
  | grep -v Warn | tee "$out/scaling_$preset.log" | grep -E "^\[scaling\]|^[0-9]|^layout|^$preset |Error"
