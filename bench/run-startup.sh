#!/usr/bin/env bash
# Start-up case (fresh process: load base + adapter, predict one sentence), adapterkit vs Python.
set -euo pipefail
source "$(dirname "$0")/setup.sh"
python3 bench/startup.py --ours ./target/release/adapterkit --python "$venv/bin/python" \
  --model "$model" --out "bench/results/$(date +%F)-startup.json" "$@"
