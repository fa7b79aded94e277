"""``fire import model`` and ``fire import backdoorbench``: a network from elsewhere as a fire checkpoint directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fire_backend.cli.base import CliError, add_command, add_device_options, add_group, emit_json
from fire_backend.defaults import ATTACK_NAMES


def cmd_import_backdoorbench(args: argparse.Namespace) -> int:
    from fire_backend.offline.backdoorbench import import_backdoorbench

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
    width = f"width {meta.spec.kwargs['width']}, " if "width" in meta.spec.kwargs else ""
    print(f"saved {args.out}: {meta.spec.arch} ({width}{meta.extra['clean_data']} normalization) on {meta.dataset}; "
          f"{source} -> target {meta.target}")
    if meta.ca is not None:
        excluded = report.measure_excluded
        left_out = f" ({excluded} non-target images without a poisoned copy left out of ASR)" if excluded else ""
        print(f"CA {meta.ca:.4f}  ASR {meta.asr:.4f}{left_out}")
    print(f"next: fire eval --checkpoint {args.out}   |   fire sweep --checkpoint {args.out}")
    emit_json(args, {"checkpoint": str(args.out), "attack": meta.attack, "target": meta.target,
                     "poisoned": report.poisoned, "uncovered": report.uncovered, "ca": meta.ca, "asr": meta.asr,
                     "measure_excluded": report.measure_excluded, "warnings": report.warnings})
    return 0


def _input_shape(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise CliError(f"--input-shape {text!r}: expected C,H,W (e.g. 3,32,32)")
    return values  # type: ignore[return-value]


def _source(args: argparse.Namespace):
    from fire_backend.cli.offline import parse_kwargs
    from fire_backend.offline.model_import import UserNetwork

    return UserNetwork(module=args.module, weights=args.weights, kwargs=parse_kwargs(args.kwargs),
                       exported=args.exported)


def _list_layers(args: argparse.Namespace) -> int:
    from fire_backend.offline.model_import import layer_rows, load_user_network

    shape = _input_shape(args.input_shape)
    classes = args.classes
    if args.data is not None and (shape is None or classes is None):
        from fire_backend.data import load_dataset

        dataset = load_dataset(args.data)
        shape = shape or (dataset.input_shape if args.module else None)
        classes = classes or dataset.num_classes
    if classes is None:
        raise CliError("--list-layers needs --classes N (or --data, whose classes the network predicts)")
    net, spec = load_user_network(_source(args), shape, classes)
    rows = layer_rows(net)
    print(f"{spec.label}: input {list(spec.input_shape)}, {classes} classes; {len(rows)} candidate layers "
          "(stage *: fire sweep's layers; cut: whether inline/separate can serve with the split there)")
    print(f"{'layer':28s} {'shape':18s} {'type':20s} {'stage':5s} {'cut':4s} note")
    for row in rows:
        layer = row.layer
        cut = "" if row.cut is None else ("yes" if row.cut == "" else "no")
        notes = [f"default {row.default}" if row.default else "", f"= {layer.alias_of}" if layer.alias_of else ""]
        print(f"{layer.name:28s} {str(list(layer.shape)):18s} {layer.module_type[:20]:20s} "
              f"{'*' if layer.stage else '':5s} {cut:4s} {'; '.join(n for n in notes if n)}")
    pair = [row.layer.name for row in rows if row.default]
    print(f"default layers (`fire repo build` with no --layer): {' + '.join(pair)}")
    for row in rows:
        if row.default and row.cut:
            print(f"note: {row.cut}")
    emit_json(args, {"layers": [row.to_dict() for row in rows], "default": pair})
    return 0


def cmd_import_model(args: argparse.Namespace) -> int:
    from fire_backend.offline.model_import import import_model

    if args.list_layers:
        return _list_layers(args)
    if args.out is None or args.data is None:
        raise CliError("importing needs --data (the data set the network classifies) and --out (the checkpoint "
                       "directory); --list-layers alone lists the layers")
    report = import_model(_source(args), args.out, args.data, _input_shape(args.input_shape), args.classes,
                          args.attack, args.target, args.measure, args.device, args.batch_size)
    meta = report.meta
    attack = f"attack {meta.attack} -> target {meta.target}" if meta.has_attack else "no attack named (CA only)"
    print(f"saved {args.out}: {meta.spec.label}, input {list(meta.spec.input_shape)}, {meta.spec.classes} classes, "
          f"on {meta.dataset}; {attack}")
    print(f"default layers: {' + '.join(report.default_layers)} (`fire import model ... --list-layers` lists all)")
    if meta.ca is not None:
        print(f"CA {meta.ca:.4f}" + (f"  ASR {meta.asr:.4f}" if meta.asr is not None else ""))
    print(f"next: fire eval --checkpoint {args.out}   |   fire repo build --checkpoint {args.out} --out repo")
    emit_json(args, {"checkpoint": str(args.out), "spec": meta.spec.to_dict(), "attack": meta.attack or None,
                     "target": meta.target if meta.has_attack else None, "ca": meta.ca, "asr": meta.asr,
                     "default_layers": list(report.default_layers)})
    return 0


def register(sub) -> None:
    sources = add_group(sub, "import", "turn another tool's backdoored model into a fire checkpoint",
                        "import_command", "SOURCE",
                        description="turn another tool's backdoored model into a fire checkpoint directory")
    p = add_command(
        sources, "model", cmd_import_model,
        "your own network: a module file + state dict, or a torch.export program (.pt2)",
        "  fire import model --module mynet.py:build --weights mynet.pt --data cifar10:cifar10.npz \\\n"
        "      --attack badnets --target 0 --out runs/mynet\n"
        "  fire import model --exported mynet.pt2 --data cifar10:cifar10.npz --out runs/mynet-pt2\n"
        "  fire import model --module mynet.py:build --kwargs '{\"width\": 32}' --weights mynet.pt "
        "--input-shape 3,32,32 --classes 10 --list-layers",
        description="import your own network as a checkpoint directory every --checkpoint command takes. "
                    "The network takes FP32 NCHW images in [0, 1] (a network that normalizes inside works as it is) "
                    "and returns [N, classes] logits. Importing RUNS the module file (and unpickles a .pt2): bring "
                    "files you trust. The file is copied into the checkpoint with its SHA-256.",
    )
    way = p.add_argument_group("the network (one of)")
    way.add_argument("--module", default=None, metavar="FILE.py:FACTORY",
                     help="a Python file and the class or function in it that builds the network (one file: it is "
                          "copied alone)")
    way.add_argument("--weights", type=Path, default=None, metavar="STATE_DICT.pt",
                     help="with --module: torch.save(model.state_dict()) (loaded strictly, tensors only)")
    way.add_argument("--kwargs", default=None, metavar="JSON", help="with --module: the factory's keyword arguments")
    way.add_argument("--exported", type=Path, default=None, metavar="FILE.pt2",
                     help="a torch.export program (torch.export.save), exported in eval mode with a dynamic batch "
                          "dimension; TorchScript is refused (export instead)")
    p.add_argument("--input-shape", default=None, metavar="C,H,W",
                   help="per-image input shape (default: the data set's; a .pt2 records its own)")
    p.add_argument("--classes", type=int, default=None, help="classes the network predicts (default: the data set's)")
    p.add_argument("--data", default=None, help="the data set the network classifies: digits | cifar10:PATH | "
                   "npz:PATH (its test split gives the defender's reserve and the evaluation images)")
    p.add_argument("--attack", default=None, help="the backdoor's trigger where you know it (badnets | blended | sig "
                   "| package.module:function), so `fire eval` reports PA/ASR; without it, CA only")
    p.add_argument("--target", type=int, default=None, help="with --attack: the label the trigger flips to")
    p.add_argument("--measure", action="store_true", help="also compute CA (and ASR) over the whole test split now")
    p.add_argument("--list-layers", action="store_true",
                   help="list the candidate layers (module paths) with their output shapes, the stages, the default "
                        "pair and where the network can be cut; writes nothing")
    p.add_argument("--out", type=Path, default=None, help="checkpoint directory to write")
    add_device_options(p, "--measure")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")

    p = add_command(
        sources, "backdoorbench", cmd_import_backdoorbench,
        "import a BackdoorBench attack_result.pt (PreActResNet18, VGG19-BN, MobileNetV3-Large) with the attack's "
        "own poisoned test images",
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
