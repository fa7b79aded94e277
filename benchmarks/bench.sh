#!/usr/bin/env bash
# The reference benchmark: FIRE vs undefended vs monolithic on the digits demo repository, Locust load at 1 and 16
# users, 15 s per run, per-sample latency and samples/s. Results (table, bench.json/csv/png) go to $OUT.
#   benchmarks/bench.sh                      # -> bench-results/
#   OUT=/tmp/b BATCH=8 benchmarks/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
exec fire bench --concurrency "${CONCURRENCY:-1,16}" --duration "${DURATION:-15}" --batch "${BATCH:-1}" \
    --protocol "${PROTOCOL:-grpc}" --out "${OUT:-bench-results}" "$@"
