#!/usr/bin/env bash
# Step load against a running server (`fire serve`): 4, 8, 12, 16 users for STEP_TIME s each, 80/20 clean/poisoned
# traffic from the demo checkpoint; per-step throughput/latency in $OUT_stats_history.csv, defense in $OUT_defense.csv.
#   HOST=grpc://127.0.0.1:8001 CHECKPOINT=runs/digits-badnets benchmarks/step_load.sh   # default: the demo's model
set -euo pipefail
cd "$(dirname "$0")/.."
HOST="${HOST:-grpc://127.0.0.1:8001}"
CHECKPOINT="${CHECKPOINT:-$(python3 -c 'from fire_backend.defaults import demo_checkpoint_dir; print(demo_checkpoint_dir())')}"
OUT="${OUT:-bench-results/step}"
DATA="$(mktemp -d)"
trap 'rm -rf "$DATA"' EXIT
fire data export --checkpoint "$CHECKPOINT" --split test --n 300 --out "$DATA/clean.npz"
fire data export --checkpoint "$CHECKPOINT" --split test --poisoned --n 300 --out "$DATA/poisoned.npz"
mkdir -p "$(dirname "$OUT")"
locust -f loadtest/locustfile.py,loadtest/stepload.py --headless --host "$HOST" \
    --clean-npz "$DATA/clean.npz" --poisoned-npz "$DATA/poisoned.npz" --batch "${BATCH:-1}" \
    --step-users "${STEP_USERS:-4}" --step-time "${STEP_TIME:-10}" --step-count "${STEP_COUNT:-4}" \
    --csv "$OUT" --csv-full-history --html "$OUT.html" --only-summary "$@"
