#!/usr/bin/env bash
# Benchmarks adapterkit against PyTorch + transformers + AdapterHub `adapters` on this machine,
# interleaved, and writes bench/results/<date>.json. Extra arguments go to bench/compare.py, e.g.
#   bench/run.sh --shapes minilm --sizes 16x128 --cases adapter-train --rounds 5
set -euo pipefail
source "$(dirname "$0")/setup.sh"
python3 bench/compare.py --ours ./target/release/adapterkit --python "$venv/bin/python" \
  --model "$model" --out "bench/results/$(date +%F).json" "$@"
