#!/usr/bin/env bash
# Loads an adapterkit adapter directory with the Python `adapters` library and compares logits with
# ours on MR sentences. Usage: tools/interop/python_loads_ours.sh ADAPTER_DIR [N_SENTENCES]
# Needs PyPI access the first time (creates the venv shared with bench/ and the fixture scripts).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
adapter="$1"
n="${2:-400}"
venv="${ADAPTERKIT_BENCH_VENV:-$HOME/.cache/adapterkit/bench-venv}"  # shared with bench/setup.sh
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch "transformers>=4.57,<4.58" "adapters==1.3.0" safetensors
fi
home="${ADAPTERKIT_HOME:-$HOME/.cache/adapterkit}"
model="$home/models/all-MiniLM-L6-v2"
ak="$root/target/release/adapterkit"
[ -x "$ak" ] || (cd "$root" && cargo build --release -q)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# The last N sentences of MR's CSV (text is the second column), one per line.
python3 - "$home/data/mr/polarity-en-pang-lee2.csv" "$n" > "$work/texts.txt" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1], encoding="utf-8")))[1:]
for r in rows[-int(sys.argv[2]):]:
    print(r[1].replace("\n", " "))
PY
max_len="$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['max_len'])" "$adapter/adapterkit.json")"
"$ak" predict --model "$model" --adapter "$adapter" --logits --input "$work/texts.txt" > "$work/ours.jsonl"
"$venv/bin/python" "$here/python_loads_ours.py" --model "$model" --adapter "$adapter" \
  --ours "$work/ours.jsonl" --max-len "$max_len"
