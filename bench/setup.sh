# Sourced by the bench runners: the PyTorch + AdapterHub venv (created if missing), the release
# binary, the assets. Sets $venv and $model.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="${ADAPTERKIT_BENCH_VENV:-$HOME/.cache/adapterkit/bench-venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch adapters==1.3.0
fi
cargo build --release --quiet
python3 tools/fetch_assets.py >/dev/null
mkdir -p bench/results
model="${ADAPTERKIT_HOME:-$HOME/.cache/adapterkit}/models/all-MiniLM-L6-v2"
