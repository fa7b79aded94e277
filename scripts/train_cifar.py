"""Train one backdoored CIFAR-10 PreActResNet18 with the knobs `fire train` does not expose yet
(batch size, learning rate, augmentation). Same library call as `fire train`; writes the same checkpoint.

    python scripts/train_cifar.py --data npz:runs/cifar/c10.npz --attack badnets --width 8 --epochs 5 \\
        --batch-size 128 --out runs/cifar/badnets
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fire_backend.offline.training import TrainConfig, train_backdoored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="npz:PATH or cifar10:PATH (in any order)")
    parser.add_argument("--attack", default="badnets", help="badnets | blended | sig | package.module:function")
    parser.add_argument("--target", type=int, default=0)
    parser.add_argument("--poison-rate", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=64, help="PreActResNet18 base width (64 = standard)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (Adam, one-cycle)")
    parser.add_argument("--augment", action="store_true", help="random crop + horizontal flip per image")
    parser.add_argument("--train-subset", type=int, default=None, help="a class-stratified draw of N images")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (auto: cuda when available)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    config = TrainConfig(data=args.data, attack=args.attack, target=args.target, poison_rate=args.poison_rate,
                         seed=args.seed, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         arch="preact_resnet18", width=args.width, train_subset=args.train_subset,
                         augment=args.augment, device=args.device)
    start = time.perf_counter()
    meta = train_backdoored(config, args.out)
    print(f"saved {args.out}: {args.attack} -> {args.target}, width {args.width}, {args.epochs} epochs "
          f"in {time.perf_counter() - start:.0f} s; CA {meta.ca:.4f}  ASR {meta.asr:.4f}")


if __name__ == "__main__":
    main()
