#!/usr/bin/env bash
# Reproduces docs/results/: CIFAR-10 figures and tables from `fire sweep` and `fire eval` on the
# CPU-sized PreActResNet18s of tests/slow/test_cifar.py (width 8, 5 epochs, a class-stratified draw of 12,000
# training images; target 0; 50 flagged samples from the defender's reserve, a class-stratified draw of 200 test
# images; 2,000 of the other test images evaluated). The shared file is used as it is (sorted by class).
#
#   scripts/make_figures.sh                  # about 5 minutes of training per model on 2 busy CPU cores
#   RUNS=/tmp/c10 OUT=/tmp/results scripts/make_figures.sh
#
# Per attack (badnets, blended, sig) it writes to $OUT/<attack>/:
#   sweep.csv, sweep.png          relative accuracy PA/CA per candidate layer (unpaired FIRE, best alpha)
#   eval.csv                      CA/PA/ASR: undefended, ShrinkPad, FIRE paired/unpaired/augmented x constant/projection
#   streaming.csv, streaming.png  PA vs flagged samples: FIRE unpaired, FIRE guided by ShrinkPad-transformed
#                                 images (augmented), ShrinkPad as a flat reference
#   sweep.txt, eval.txt           the commands' printed tables
#   recommended/                  eval.csv, streaming.csv/png, eval.txt at the sweep's best single layer and alpha
#                                 (sweep.json's recommended.layer and .alpha)
# and $OUT/summary.csv (all eval rows). Trained weights stay in $RUNS (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."

CIFAR=${CIFAR:-${FIRE_SHARED_DIR:-shared}/data/cifar10.npz}
RUNS=${RUNS:-runs/cifar-small}
OUT=${OUT:-docs/results}
TRAIN=${TRAIN:-12000}
EVAL=${EVAL:-2000}
WIDTH=${WIDTH:-8}
EPOCHS=${EPOCHS:-5}
ATTACKS=${ATTACKS:-badnets blended sig}

for attack in $ATTACKS; do
    checkpoint="$RUNS/$attack"
    [ -f "$checkpoint/meta.json" ] || python scripts/train_cifar.py --data "npz:$CIFAR" --attack "$attack" \
        --target 0 --width "$WIDTH" --epochs "$EPOCHS" --batch-size 128 --train-subset "$TRAIN" --out "$checkpoint"
    mkdir -p "$OUT/$attack"
    fire sweep --checkpoint "$checkpoint" --clean 100 --flagged 50 --eval-images "$EVAL" --out "$OUT/$attack" \
        | tee "$OUT/$attack/sweep.txt"
    fire eval --checkpoint "$checkpoint" --clean 100 --flagged 50 --eval-images "$EVAL" --out "$OUT/$attack" \
        | tee "$OUT/$attack/eval.txt"
    # again at the layer and alpha the sweep recommends (slow when that is an early layer: the tail is the network)
    mkdir -p "$OUT/$attack/recommended"
    read -r layer alpha < <(python -c 'import json, sys; r = json.load(open(sys.argv[1]))["recommended"]
print(r["layer"], r["alpha"])' "$OUT/$attack/sweep.json")
    fire eval --checkpoint "$checkpoint" --clean 100 --flagged 50 --eval-images "$EVAL" --layer "$layer" --alpha "$alpha" \
        --out "$OUT/$attack/recommended" | tee "$OUT/$attack/recommended/eval.txt"
done
python scripts/summarize_results.py "$OUT"
