#!/usr/bin/env bash
# Start-up case (fresh process: load base + adapter, predict one sentence), adapterkit vs Python.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${ADAPTERKIT_BENCH_VENV:-$HOME/.cache/adapterkit/bench-venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch adapters==1.3.0
fi
cargo build --release --quiet
python3 tools/fetch_assets.py >/dev/null
mkdir -p bench/results
python3 bench/startup.py --ours ./target/release/adapterkit --python "$venv/bin/python" \
  --model "${ADAPTERKIT_HOME:-$HOME/.cache/adapterkit}/models/all-MiniLM-L6-v2" \
  --out "bench/results/$(date +%F)-startup.json" "$@"
