#!/usr/bin/env bash
# Serving benchmark: adapterkit serve at 1, 8 and 64 adapters vs PyTorch + AdapterHub, answers
# checked, RSS, hot reload under traffic. Extra arguments go to bench/serve.py (e.g. --rounds 3).
set -euo pipefail
source "$(dirname "$0")/setup.sh"
python3 bench/serve.py --ours ./target/release/adapterkit --python "$venv/bin/python" \
  --model "$model" --work "${ADAPTERKIT_HOME:-$HOME/.cache/adapterkit}/bench-serve" \
  --out "bench/results/$(date +%F)-serve.json" "$@"
