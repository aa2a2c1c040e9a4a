#!/usr/bin/env bash
# The quickstart: fetch the real model and data, build, train a Houlsby adapter (m=64) on MR, compare
# with full fine-tuning and a linear probe on the same split, reload the adapter and predict.
set -euo pipefail
cd "$(dirname "$0")"
runs="${RUNS:-runs}"
cargo build --release --quiet
ak=./target/release/adapterkit
$ak fetch
$ak train --task mr --method adapters --bottleneck 64 --epochs 5 --seed 42 --out "$runs/mr-adapters"
$ak train --task mr --method full --epochs 2 --seed 42 --out "$runs/mr-full"
$ak train --task mr --method head --epochs 3 --seed 42 --out "$runs/mr-head"
echo
echo "== Saved adapter"
$ak info --adapter "$runs/mr-adapters"
echo
echo "== Reloaded adapter predicts"
$ak predict --adapter "$runs/mr-adapters" \
  "a moving, beautifully acted film that stays with you ." \
  "a tedious mess with nothing to say ."
echo
echo "== MR test accuracy (split seed 0, 3200/400/400; training seed 42)"
python3 - "$runs" <<'PY'
import json, sys, os
runs = sys.argv[1]
print(f"{'method':<10} {'dev acc':>8} {'test acc':>9} {'trainable':>10} {'% of base':>10} {'dir MB':>7} {'seconds':>8}")
for m in ["adapters", "full", "head"]:
    r = json.load(open(os.path.join(runs, f"mr-{m}", "metrics.json")))
    print(f"{m:<10} {r['dev']['accuracy']:>8.4f} {r['test']['accuracy']:>9.4f} {r['trainable_params']:>10} "
          f"{r['trainable_percent']:>9.2f}% {r['adapter_dir_bytes']/1e6:>7.2f} {r['seconds']:>8.0f}")
PY
