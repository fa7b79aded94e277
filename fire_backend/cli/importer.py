"""``fire import backdoorbench``: turn another tool's backdoored model into a fire checkpoint directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fire_backend.cli.base import CliError, add_command, add_device_options, add_group, emit_json
from fire_backend.defaults import ATTACK_NAMES


def cmd_import_backdoorbench(args: argparse.Namespace) -> int:
    from fire_backend.backdoorbench import import_backdoorbench

    if args.attack is not None and args.target is None:
        raise CliError("--attack needs --target (the label the trigger flips to)")
    report = import_backdoorbench(
        args.result, args.out, args.data, trust_pickle=args.trust_pickle, attack=args.attack, target=args.target,
        measure=args.measure, device=args.device, batch_size=args.batch_size,
    )
    meta = report.meta
    for warning in report.warnings:
        print(f"fire import: warning: {warning}", file=sys.stderr)
    source = (f"{report.poisoned} stored poisoned test images" if report.poisoned else f"trigger {meta.attack}")
    print(f"saved {args.out}: {meta.spec.arch} (width {meta.spec.kwargs['width']}, {meta.extra['clean_data']} "
          f"normalization) on {meta.dataset}; {source} -> target {meta.target}")
    if meta.ca is not None:
        excluded = report.measure_excluded
        left_out = f" ({excluded} non-target images without a poisoned copy left out of ASR)" if excluded else ""
        print(f"CA {meta.ca:.4f}  ASR {meta.asr:.4f}{left_out}")
    print(f"next: fire eval --checkpoint {args.out}   |   fire sweep --checkpoint {args.out}")
    emit_json(args, {"checkpoint": str(args.out), "attack": meta.attack, "target": meta.target,
                     "poisoned": report.poisoned, "uncovered": report.uncovered, "ca": meta.ca, "asr": meta.asr,
                     "measure_excluded": report.measure_excluded, "warnings": report.warnings})
    return 0


def register(sub) -> None:
    sources = add_group(sub, "import", "turn another tool's backdoored model into a fire checkpoint",
                        "import_command", "SOURCE",
                        description="turn another tool's backdoored model into a fire checkpoint directory")
    p = add_command(
        sources, "backdoorbench", cmd_import_backdoorbench,
        "import a BackdoorBench attack_result.pt (PreActResNet18) with the attack's own poisoned test images",
        "  fire import backdoorbench record/badnet_0_1/attack_result.pt \\\n"
        "      --data cifar10:data/cifar-10-batches-py --out runs/bb-badnets\n"
        "  fire eval --checkpoint runs/bb-badnets && fire sweep --checkpoint runs/bb-badnets\n"
        "  fire import backdoorbench attack_result.pt --data cifar10:data/cifar-10-batches-py --trust-pickle "
        "--out runs/bb",
    )
    p.add_argument("result", type=Path, help="attack_result.pt written by BackdoorBench's save_attack_result")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--data", required=True,
                   help="local copy of the clean data set the attack ran on, in the same order (BackdoorBench "
                        "indexes torchvision's): cifar10:PATH (cifar-10-batches-py folder or .npz) | npz:PATH")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow arbitrary unpickling (can run code!) for files that need more than tensors, numpy "
                        "arrays and PIL images; only for files from a source you trust")
    p.add_argument("--attack", default=None,
                   help="evaluate with this fire trigger instead of the file's poisoned test set (needs --target): "
                        f"{', '.join(ATTACK_NAMES)} with or without parameters ('wanet(strength=0.5)'), "
                        "trigger:PATH, or package.module:function")
    p.add_argument("--target", type=int, default=None, help="target label (default: read from the poisoned set)")
    p.add_argument("--measure", action="store_true",
                   help="also compute CA and ASR over the whole test split now (slow on a CPU: see --device)")
    add_device_options(p, "--measure")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
