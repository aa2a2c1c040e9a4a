#!/bin/bash
# Before/after A/B of two adapterkit builds on one bench case, interleaved A B A B, medians.
# usage: [NEW=/path/to/new/adapterkit] BASE=/path/to/old/adapterkit bench/ab.sh ROUNDS --case infer-base --batch 16 --seq 128 --steps 6
# (build the old commit with: git worktree add /tmp/base REV && (cd /tmp/base && CARGO_TARGET_DIR=/tmp/base-target cargo build --release -p adapterkit-cli))
R=$1; shift
M=~/.cache/adapterkit/models/all-MiniLM-L6-v2
for i in $(seq $R); do
  for b in base new; do
    bin=${BASE:-/tmp/base-target/release/adapterkit}; [ $b = new ] && bin=${NEW:-./target/release/adapterkit}
    $bin bench --model $M "$@" 2>/dev/null | python3 -c "import json,sys; d=json.load(sys.stdin); print('$b', d['median_seconds'], d.get('gemm_peak_gflops'))"
  done
done | python3 -c "
import sys,statistics as st
r={}
for l in sys.stdin:
    b,t,g=l.split(); r.setdefault(b,[]).append(float(t))
for b in r: print(b, 'median %.4f s'%st.median(r[b]), ' '.join('%.3f'%x for x in r[b]))
print('speedup new/base %.2f'%(st.median(r['base'])/st.median(r['new'])))
"
