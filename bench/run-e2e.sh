#!/usr/bin/env bash
# End-to-end case: wall time to train a Houlsby adapter (m=64) on a task for N epochs and the dev/test
# accuracy reached, adapterkit vs PyTorch + AdapterHub on the identical split, interleaved A B A B.
# Usage: bench/run-e2e.sh [--task mr] [--epochs 5] [--rounds 2] [--threads 2] [--out FILE] [--baseline BIN]
#        [--precision f32|fp16]   (ours with `train --precision`; PyTorch stays f32)
# (--baseline: another adapterkit binary in PyTorch's place, an end-to-end before/after)
# (default FILE: bench/results/<date>-e2e-<task>.json)
set -euo pipefail
source "$(dirname "$0")/setup.sh"
task=mr; epochs=5; rounds=2; threads=2; out=""; baseline=(); precision=f32
while [ $# -gt 0 ]; do
  case "$1" in
    --task) task="$2"; shift 2;;
    --epochs) epochs="$2"; shift 2;;
    --rounds) rounds="$2"; shift 2;;
    --threads) threads="$2"; shift 2;;
    --out) out="$2"; shift 2;;
    --baseline) baseline=(--baseline "$2"); shift 2;;
    --precision) precision="$2"; shift 2;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
done
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
./target/release/adapterkit split --task "$task" --out "$work/split"
python3 bench/e2e.py --ours ./target/release/adapterkit --python "$venv/bin/python" --model "$model" \
  --task "$task" --split "$work/split" --epochs "$epochs" --rounds "$rounds" --threads "$threads" \
  --work "$work" --out "${out:-bench/results/$(date +%F)-e2e-$task.json}" --precision "$precision" "${baseline[@]}"
