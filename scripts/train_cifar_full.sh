#!/usr/bin/env bash
# Full-size CIFAR-10 recipe for a GPU machine: the standard PreActResNet18 (width 64) on all 50,000
# training images with random-crop/flip augmentation, one model per attack, then `fire eval` and
# `fire sweep` on each. Training and evaluation use CUDA when available (--device auto). Not run in this repository's CI (no GPU there): the CPU-sized models of
# tests/slow/test_cifar.py and scripts/make_figures.sh use width 8, 5 epochs, 12,000 images.
#
#   scripts/train_cifar_full.sh                          # badnets blended sig, 60 epochs
#   EPOCHS=100 ATTACKS="badnets" scripts/train_cifar_full.sh
#
# Weights trained on CIFAR-10 stay out of the repository (runs/ is ignored).
set -euo pipefail
cd "$(dirname "$0")/.."

CIFAR=${CIFAR:-${FIRE_SHARED_DIR:-shared}/data/cifar10.npz}
RUNS=${RUNS:-runs/cifar-full}
EPOCHS=${EPOCHS:-60}
WIDTH=${WIDTH:-64}
BATCH=${BATCH:-128}
LR=${LR:-2e-3}
ATTACKS=${ATTACKS:-badnets blended sig}

# The shared file is sorted by class: fire draws its defender's reserve (and any subset) class-stratified.
for attack in $ATTACKS; do
    python scripts/train_cifar.py --data "npz:$CIFAR" --attack "$attack" --target 0 \
        --width "$WIDTH" --epochs "$EPOCHS" --batch-size "$BATCH" --lr "$LR" --augment --out "$RUNS/$attack"
    fire sweep --checkpoint "$RUNS/$attack" --clean 100 --flagged 50 --out "$RUNS/$attack/results"
    fire eval --checkpoint "$RUNS/$attack" --clean 100 --flagged 50 --out "$RUNS/$attack/results"
done
