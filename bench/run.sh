#!/usr/bin/env bash
# Benchmarks adapterkit against PyTorch + transformers + AdapterHub `adapters` on this machine,
# interleaved, and writes bench/results/<date>.json. Extra arguments go to bench/compare.py, e.g.
#   bench/run.sh --shapes minilm --sizes 16x128 --cases adapter-train --rounds 5
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
python3 bench/compare.py --ours ./target/release/adapterkit --python "$venv/bin/python" \
  --model "${ADAPTERKIT_HOME:-$HOME/.cache/adapterkit}/models/all-MiniLM-L6-v2" \
  --out "bench/results/$(date +%F).json" "$@"
