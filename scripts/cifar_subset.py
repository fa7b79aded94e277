"""Write a shuffled (optionally smaller) copy of a CIFAR-10 .npz for `fire train --data npz:OUT`.

The shared ../shared/data/cifar10.npz is sorted by class (its first 5,000 training and first 1,000 test
images are all airplanes). fire takes the *first* N training images for --train-subset and the *first*
200 test images as the defender's reserve, so both need the images in random order: this script applies
one fixed permutation (seeded) to each split and keeps the first --train / --test images of it.

    python scripts/cifar_subset.py ../shared/data/cifar10.npz runs/cifar/c10.npz                 # shuffle only
    python scripts/cifar_subset.py ../shared/data/cifar10.npz runs/cifar/c10-15k.npz --train 15000 --test 2200
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fire_backend.data.datasets import shuffled_subset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="x_train/y_train/x_test/y_test .npz (uint8 NHWC)")
    parser.add_argument("out", type=Path, help=".npz to write")
    parser.add_argument("--train", type=int, default=None, help="keep this many training images (all)")
    parser.add_argument("--test", type=int, default=None, help="keep this many test images (all)")
    parser.add_argument("--seed", type=int, default=0, help="permutation seed (0)")
    args = parser.parse_args()
    shuffled_subset(args.source, args.out, args.train, args.test, args.seed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
