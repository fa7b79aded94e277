#!/usr/bin/env bash
# The GPU check in one call, on a lent GPU machine (see benchmarks/gpu/README.md). Needs the bundle of
# benchmarks/gpu/bundle.py in .gpu-bundle/ (carried), python3 with a CUDA torch, and $OUT for the results.
# Writes ONE file, $OUT/gpu-results.tar.gz (a call brings back at most 8): the served check (CA/PA/ASR of every
# layout before and after online learning, bypass, push/rollback, Triton's per-stage counters) and `fire bench`
# (every layout vs the undefended split vs the monolithic model) for the digits model and the full-size
# PreActResNet18, each figure with the card's name beside it, plus the logs.
#
#   bash benchmarks/gpu/run.sh            # CONCURRENCY, DURATION, EVAL and SKIP_DIGITS override the defaults
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
OUT=${OUT:?set OUT to the folder whose files come back}
WORK=${WORK:-/tmp/fire-gpu}
CONCURRENCY=${CONCURRENCY:-1,16,64}
DURATION=${DURATION:-8}
EVAL=${EVAL:-300}
RESULTS=$WORK/results
START=$(date +%s)
mkdir -p "$WORK" "$RESULTS"
exec > >(tee "$RESULTS/run.log") 2>&1
step() { echo "== $(( $(date +%s) - START )) s: $*"; }
finish() {
  step "packing results"
  tar -czf "$OUT/gpu-results.tar.gz" -C "$WORK" results
  ls -la "$OUT"
}
trap finish EXIT

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RESULTS/gpu.csv"
BASE_PY=${BASE_PY:-python3}
DEVICE_SITE=$("$BASE_PY" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))') || exit 1
PYVER=$("$BASE_PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
WANT=$(python3 -c 'import json; print(json.load(open(".gpu-bundle/manifest.json"))["device_python"])')
[ "$PYVER" = "$WANT" ] || { echo "the bundle is for Python $WANT, this machine has $PYVER"; exit 1; }

step "venv with the bundle (numpy 1.26 first for the stub; the device's torch after it)"
"$BASE_PY" -m venv --without-pip "$WORK/venv" || exit 1
PY=$WORK/venv/bin/python
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
tar -xJf .gpu-bundle/triton.tar.xz -C "$SITE" && tar -xJf .gpu-bundle/python.tar.xz -C "$SITE" || exit 1
# The stub ignores PYTHONPATH: the package and the device's site-packages come in by a .pth, after the overlay.
printf '%s\n%s\n' "$REPO" "$DEVICE_SITE" > "$SITE/fire-backend.pth"
LIBDIR=$("$BASE_PY" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "")')
export LD_LIBRARY_PATH=${LIBDIR}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}  # the stub links libpython of this Python
export FIRE_BACKEND_CACHE_DIR=$WORK/cache PYTHONUNBUFFERED=1
"$PY" - <<'EOF' || exit 1
import numpy, torch, tritonclient, locust, fire_backend
assert numpy.__version__.startswith("1."), numpy.__version__
print("numpy", numpy.__version__, "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
EOF

step "models and data"
mkdir -p "$WORK/models" && tar -xJf .gpu-bundle/models.tar.xz -C "$WORK/models" || exit 1
"$PY" - "$WORK/models" <<'EOF' || exit 1
import json, sys, torch
from pathlib import Path
root = Path(sys.argv[1]) / "full"
state = torch.load(root / "model.fp16.pt", map_location="cpu", weights_only=True)
torch.save({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, root / "model.pt")
meta = json.loads((root / "meta.json").read_text())
meta["dataset"] = f"npz:{root / 'cifar10-sample.npz'}"
(root / "meta.json").write_text(json.dumps(meta, indent=2))
print("full-size checkpoint ready:", meta["spec"]["arch"], meta["attack"])
EOF

STATUS=0
for name in digits full; do
  [ "$name" = digits ] && [ -n "${SKIP_DIGITS:-}" ] && continue
  step "$name: served check (every layout, --gpu)"
  "$PY" benchmarks/gpu/check.py --checkpoint "$WORK/models/$name" --out "$RESULTS/$name-check" --gpu \
    --eval "$EVAL" || STATUS=1
  rm -rf "$RESULTS/$name-check/repository/artifacts"/*.pt  # weights do not come back
  step "$name: fire bench --gpu (concurrency $CONCURRENCY, $DURATION s per run)"
  "$PY" -m fire_backend.cli bench --checkpoint "$WORK/models/$name" --gpu --concurrency "$CONCURRENCY" \
    --duration "$DURATION" --warmup 2 --out "$RESULTS/$name-bench" > "$RESULTS/$name-bench.txt" 2>&1 || STATUS=1
  tail -45 "$RESULTS/$name-bench.txt"
  rm -rf "$RESULTS/$name-bench/repository/artifacts"/*.pt "$RESULTS/$name-bench/data"
done
step "done (status $STATUS)"
exit $STATUS
