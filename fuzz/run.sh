#!/usr/bin/env bash
# Builds the fuzz targets with libFuzzer's coverage instrumentation on the stable toolchain (the
# flags `cargo fuzz build -s none` passes, so neither nightly nor cargo-fuzz is needed) and runs
# each for SECONDS (default 600) on one core, corpus in fuzz/corpus/TARGET, crashes in
# fuzz/artifacts/TARGET. A crash is a finding: keep its input as a test case and fix it.
#   fuzz/run.sh [SECONDS] [TARGET ...]
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-600}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(safetensors_header config_json adapter_config data_readers)
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# With an explicit --target the flags reach only the targets, not build scripts and proc macros.
host=$(rustc -vV | sed -n 's/^host: //p')
cargo build --release --bins --target "$host"
fix=../crates/adapterkit/tests/fixtures
seed() { # TARGET FILE...: real files as the first corpus entries
  local t=$1; shift
  for f in "$@"; do cp -n "$f" "corpus/$t/seed-$(echo "$f" | tr / _)" 2>/dev/null || true; done
}
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  case $t in
    safetensors_header) seed "$t" "$fix"/adapterhub/*/*.safetensors "$fix"/tiny-bert/golden.safetensors ;;
    config_json) seed "$t" "$fix"/tiny-bert/config.json ;;
    adapter_config) seed "$t" "$fix"/adapterhub/*/adapter_config.json
                    printf "lora[r=4, attn_matrices=['q','k'], leave_out=[1]]" > "corpus/$t/seed-string-lora"
                    printf 'par_bn[reduction_factor={"default": 4, "0": 2}, scaling="learned"]' > "corpus/$t/seed-string-par"
                    printf "compacter++[phm_dim=2, shared_W_phm=True, phm_rank=2]" > "corpus/$t/seed-string-compacter"
                    printf "prefix_tuning[prefix_length=4, flat=True, leave_out=[0]]" > "corpus/$t/seed-string-prefix" ;;
    data_readers) printf 'text,label\n"a, quoted",pos\nplain,neg\n' > "corpus/$t/seed-csv"
                  printf '{"text": "a", "label": 1}\n{"text": "b", "label": "1.0"}\n' > "corpus/$t/seed-jsonl" ;;
  esac
  echo "== $t: ${secs} s"
  # -rss_limit_mb: an input that makes a reader allocate gigabytes is a finding too.
  "target/$host/release/$t" "corpus/$t" -max_total_time="$secs" -rss_limit_mb=2048 \
    -artifact_prefix="artifacts/$t/" -print_final_stats=1 2>&1 | tail -n 25
done
