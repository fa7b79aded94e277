"""``fire train``, ``fire eval``, ``fire sweep`` and ``fire data export``: the offline side, before serving."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fire_backend.cli.base import CliError, add_command, add_device_options, add_group, emit_json
from fire_backend.defaults import ARCHITECTURE_NAMES, ATTACK_NAMES, ESTIMATION_MODES, POISONINGS


def cmd_train(args: argparse.Namespace) -> int:
    from fire_backend.offline.training import TrainConfig, train_backdoored

    options = ("data", "attack", "target", "poison_rate", "seed", "epochs", "arch", "width", "train_subset",
               "batch_size", "device", "module", "poisoning")
    if args.module and (args.arch or args.width):
        raise CliError("--module builds your own network: --arch and --width choose a built-in one")
    if args.kwargs and not args.module:
        raise CliError("--kwargs are the arguments of --module's factory")
    also = []
    for item in args.also:
        attack, sep, target = item.rpartition("@")
        if not sep or not attack or not target.strip().lstrip("-").isdigit():
            raise CliError(f"--also takes ATTACK@TARGET (e.g. blended@1), not {item!r}")
        also.append((attack, int(target)))
    config = TrainConfig(**{name: getattr(args, name) for name in options}, kwargs=parse_kwargs(args.kwargs),
                         also=tuple(also))
    if not 0.0 < config.poison_rate < 1.0:
        raise CliError(f"--poison-rate must be in (0, 1), got {config.poison_rate}")
    try:
        meta = train_backdoored(config, args.out, progress=not args.json)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(f"saved {args.out}: {meta.spec.label} on {meta.dataset}, attack {meta.attack} -> {meta.target}; "
          f"CA {meta.ca:.4f}  ASR {meta.asr:.4f}")
    for entry in meta.extra.get("also", []):
        print(f"  also {entry['attack']} -> {entry['target']}: ASR {entry['asr']:.4f}")
    emit_json(args, {"checkpoint": str(args.out), "attack": meta.attack, "ca": meta.ca, "asr": meta.asr,
                     "also": meta.extra.get("also", [])})
    return 0


def parse_kwargs(text: str | None) -> dict:
    """``--kwargs``: a JSON object of a factory's keyword arguments."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"--kwargs: not JSON ({exc.msg}); e.g. --kwargs '{{\"width\": 32}}'") from None
    if not isinstance(value, dict):
        raise CliError(f"--kwargs must be a JSON object (keyword arguments), got {type(value).__name__}")
    return value


def _no_attack(what: str) -> CliError:
    return CliError(f"{what} needs the attack's triggered images, and this checkpoint names no attack (imported "
                    "without --attack): import it again with --attack NAME --target T, or learn the direction "
                    "online from flagged images (`fire ctl observe`)")


def _load_eval_inputs(args: argparse.Namespace, n_flagged: int):
    """The model on --device and the defender's data: up to ``n_flagged`` flagged samples, at least --flagged."""
    if args.flagged < 1 or args.clean < 1:
        raise CliError("--clean and --flagged must be at least 1")
    if args.eval_images is not None and args.eval_images < 1:
        raise CliError("--eval-images must be at least 1")
    from fire_backend.device import check_batch_size, resolve_device
    from fire_backend.offline.checkpoint import load_checkpoint, read_meta
    from fire_backend.offline.evaluation import load_for_eval

    check_batch_size(args.batch_size)
    if not read_meta(args.checkpoint).has_attack:
        raise _no_attack(f"fire {args.command}")
    model, meta = load_checkpoint(args.checkpoint, resolve_device(args.device))
    data = load_for_eval(meta.dataset, meta.attack, meta.target, args.clean, n_flagged, args.eval_images,
                         at_least=args.flagged)
    return model, meta, data


def _describe_defender(defender: dict) -> str:
    return (f"{defender['clean']} clean + {defender['flagged']} flagged samples from the defender's reserve "
            f"({defender['reserve']} test images, class-stratified, seed {defender['seed']}); "
            f"{defender['evaluated']} other test images evaluated ({defender['evaluated_poisoned']} with the trigger)")


def _out_dir(args: argparse.Namespace) -> Path:
    out = args.out or args.checkpoint / "results"
    out.mkdir(parents=True, exist_ok=True)
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    from fire_backend.offline.checkpoint import read_meta
    from fire_backend.offline.evaluation import default_layer, evaluate, plot_streaming, write_csv

    if not read_meta(args.checkpoint).has_attack:
        return _clean_accuracy(args)
    model, meta, data = _load_eval_inputs(args, max(args.flagged, 100))
    layer = args.layer or default_layer(model)
    report = evaluate(model, data, meta.target, layer, n_flagged=args.flagged, alpha=args.alpha,
                      batch=args.batch_size)
    print(f"{meta.attack} -> {meta.target} on {meta.dataset}; layer {layer}; FIRE from {args.flagged} flagged")
    print(_describe_defender(report.defender))
    print(f"{'method':28s} {'CA':>7s} {'PA':>7s} {'ASR':>7s}")
    for row in report.rows:
        print(f"{row.method:28s} {row.ca:7.4f} {row.pa:7.4f} {row.asr:7.4f}")
    for kind, det in report.detector.items():
        print(f"detector ({kind}): TPR {det['tpr_at_1pct_fpr']:.4f} at 1% FPR (score > {det['threshold']:.3f})")
    out = _out_dir(args)
    write_csv(out / "eval.csv", [r.__dict__ for r in report.rows])
    write_csv(out / "streaming.csv", report.streaming)
    plot_streaming(out / "streaming.png", report.streaming, f"{meta.attack}: PA vs flagged samples ({layer})")
    (out / "eval.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    print(f"wrote {out}/eval.csv, streaming.csv, streaming.png, eval.json")
    emit_json(args, report.to_dict())
    return 0


def _clean_accuracy(args: argparse.Namespace) -> int:
    """`fire eval` of a checkpoint without an attack: CA on the evaluation images, and why there is nothing else."""
    import numpy as np
    import torch

    from fire_backend.data import load_dataset, to_tensor
    from fire_backend.defaults import evaluation_indices
    from fire_backend.device import check_batch_size, resolve_device
    from fire_backend.offline.checkpoint import load_checkpoint
    from fire_backend.offline.evaluation import predict

    check_batch_size(args.batch_size)
    model, meta = load_checkpoint(args.checkpoint, resolve_device(args.device))
    data = load_dataset(meta.dataset)
    index = evaluation_indices(data.y_test)[:args.eval_images]
    y = torch.from_numpy(np.asarray(data.y_test)[index].astype(np.int64))
    ca = float((predict(model, to_tensor(data.x_test[index]), args.batch_size) == y).float().mean())
    print(f"{meta.spec.label} on {meta.dataset}: no attack named, so CA only (PA, ASR and FIRE's figures need the "
          "attack: import with --attack NAME --target T)")
    print(f"CA {ca:.4f} on {len(y)} evaluation images (the defender's reserve left out)")
    emit_json(args, {"ca": ca, "evaluated": len(y), "attack": None})
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from fire_backend.offline.evaluation import plot_sweep, sweep, write_csv

    model, meta, data = _load_eval_inputs(args, args.flagged)
    rows, recommended = sweep(model, data, meta.target, n_flagged=args.flagged, estimator=args.estimator,
                              batch=args.batch_size)
    print(_describe_defender(recommended["defender"]))
    print(f"{'layer':12s} {'shape':16s} {'alpha':>6s} {'CA':>7s} {'PA':>7s} {'PA/CA':>7s}")
    for r in rows:
        best = r["layer"] == recommended["layer"] and r["alpha"] == recommended["alpha"]
        print(f"{r['layer']:12s} {str(tuple(r['shape'])):16s} {r['alpha']:6.2f} {r['ca']:7.4f} {r['pa']:7.4f} "
              f"{r['relative']:7.4f}{'  * best single layer (labels)' if best else ''}")
    ranking = _rank(args, model, meta, data)
    recommended["layers"] = ranking[0]["layers"]
    out = _out_dir(args)
    write_csv(out / "sweep.csv", [{k: v for k, v in r.items() if k != "shape"} for r in rows])
    plot_sweep(out / "sweep.png", rows, f"{meta.attack}: relative accuracy per layer")
    (out / "sweep.json").write_text(json.dumps({"rows": rows, "recommended": recommended, "ranking": ranking},
                                               indent=2) + "\n")
    print(f"wrote {out}/sweep.csv, sweep.png, sweep.json")
    print(f"recommended: fire repo build --checkpoint {args.checkpoint} --layer "
          f"{' --layer '.join(recommended['layers'])}   (ranked first without labels: what `fire repo build` and "
          "`fire ctl observe` choose by default)")
    emit_json(args, {"rows": rows, "recommended": recommended, "ranking": ranking})
    return 0


def _rank(args: argparse.Namespace, model, meta, data) -> list[dict]:
    """The label-free ranking of the layer subsets the control endpoint ranks online (the same code), each with
    the CA/PA/ASR its repair reaches on the evaluation images (labels used for these figures only)."""
    from fire_backend.multilayer import EstimationSettings, Evidence, default_layers, estimate, rank_subsets
    from fire_backend.offline.evaluation import subset_metrics

    layers = args.rank_layers or list(default_layers(model.stages()))
    settings = EstimationSettings(args.estimation, batch=args.batch_size)
    net = model
    evidence = Evidence(net, data.samples.clean, data.samples.flagged[:args.flagged], layers, args.batch_size)
    ranking = []
    print(f"label-free ranking ({settings.mode} estimation; restore - 2 x change, then clean_tv):")
    print(f"{'layers':28s} {'flip':>6s} {'restore':>7s} {'change':>7s} {'tv':>7s}   {'CA':>7s} {'PA':>7s} {'ASR':>7s}")
    for score in rank_subsets(evidence, settings):
        figures = subset_metrics(net, data.evaluation, meta.target, estimate(evidence, score.layers, settings),
                                 args.batch_size)
        ranking.append({**score.to_dict(), "ca": figures.ca, "pa": figures.pa, "asr": figures.asr})
        print(f"{'+'.join(score.layers):28s} {score.flip:6.2f} {score.restore:7.3f} {score.change:7.2f} "
              f"{score.clean_tv:7.4f}   "
              f"{figures.ca:7.4f} {figures.pa:7.4f} {figures.asr:7.4f}")
    return ranking


def cmd_data_export(args: argparse.Namespace) -> int:
    from fire_backend.data import load_dataset
    from fire_backend.data.export import export_images
    from fire_backend.offline.checkpoint import read_meta

    if args.n is not None and args.n < 1:
        raise CliError("--n must be at least 1")
    meta = read_meta(args.checkpoint)
    if args.poisoned and not meta.has_attack:
        raise _no_attack("--poisoned")
    part = "all" if args.include_reserve else args.part
    images = export_images(load_dataset(meta.dataset), meta.attack, meta.target, split=args.split,
                           poisoned=args.poisoned, n=args.n, part=part)
    images.save(args.out)
    print(f"wrote {args.out}: {len(images)} {'poisoned' if args.poisoned else 'clean'} images {images.x.shape[1:]}")
    if args.n is not None and len(images) < args.n:
        print(_shortfall(args, part, len(images)))
    if images.excluded:
        print(f"left out {images.excluded} non-target images the attack does not change (a stored attack has no "
              "poisoned copy of them)")
    emit_json(args, {"out": str(args.out), "n": len(images), "requested": args.n, "excluded": images.excluded})
    return 0


def _shortfall(args: argparse.Namespace, part: str, written: int) -> str:
    """Why an export wrote fewer images than --n asked for: what it drew from holds no more."""
    source = "training split" if args.split == "train" else "test split" if part == "all" else \
        f"test split's {part} part"
    kind = "non-target images the attack changes" if args.poisoned else "images"
    hint = " (--part all adds the defender's reserve)" if args.split == "test" and part == "evaluation" else ""
    return f"asked for {args.n}, wrote {written}: the {source} holds only {written} {kind}{hint}"


def register(sub) -> None:
    p = add_command(sub, "train", cmd_train, "train a backdoored classifier and save a checkpoint directory",
                    "  fire train --data digits --attack badnets --target 0 --out runs/digits-badnets\n"
                    "  fire train --data cifar10:shared/data/cifar10.npz --attack blended --width 16 "
                    "--epochs 8 --out runs/c10\n"
                    "  fire train --attack 'blended(ratio=0.05)' --poison-rate 0.01 --out runs/faint\n"
                    "  fire train --attack sig --poisoning dirty-label --out runs/sig-poison-label\n"
                    "  fire train --attack badnets --also blended@1 --out runs/two-targets\n"
                    "  fire train --attack mypkg.triggers:stripes --out runs/custom\n"
                    "  fire train --module mynet.py:build --kwargs '{\"width\": 32}' --data cifar10:cifar10.npz "
                    "--train-subset 10000 --epochs 8 --out runs/mynet")

    p.add_argument("--data", default="digits", help="digits (bundled) | cifar10:PATH (batches folder or .npz) | "
                   "npz:PATH (x_train/y_train/x_test/y_test uint8 NHWC); never downloaded")
    p.add_argument("--attack", default="badnets",
                   help=f"{' | '.join(ATTACK_NAMES)} (parameters as in 'blended(ratio=0.05)'), trojannn (a patch "
                        "optimised on a clean surrogate, saved beside the checkpoint), or package.module:function "
                        "taking and returning a batched NCHW float tensor in [0, 1]")
    p.add_argument("--poisoning", choices=POISONINGS, default="auto",
                   help="auto: the attack's paper (clean-label for sig and label_consistent, else dirty-label); "
                        "dirty-label: non-target images get the trigger and the target label; clean-label: "
                        "target-class images get the trigger, labels untouched")
    p.add_argument("--also", action="append", default=[], metavar="ATTACK@TARGET",
                   help="a further trigger with its own target in the same model (repeatable), e.g. blended@1")
    p.add_argument("--target", type=int, default=0, help="label the trigger flips to (default 0)")
    p.add_argument("--poison-rate", type=float, default=0.1, help="fraction of training images poisoned (0.1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: 40 digits, 10 PreActResNet18)")
    p.add_argument("--arch", choices=ARCHITECTURE_NAMES, default=None,
                   help="a built-in architecture (default: digits_cnn for 8x8 grayscale, else preact_resnet18)")
    p.add_argument("--width", type=int, default=None, help="base width (digits 32; PreActResNet18 64 = standard)")
    p.add_argument("--module", default=None, metavar="FILE.py:FACTORY",
                   help="train your own network: FACTORY(**KWARGS) in FILE.py builds it (the file is run, and "
                        "copied into the checkpoint); it takes FP32 NCHW images in [0, 1] and returns logits")
    p.add_argument("--kwargs", default=None, metavar="JSON", help="the factory's keyword arguments, a JSON object")
    p.add_argument("--train-subset", type=int, default=None,
                   help="train on a seeded, class-stratified draw of N training images (CPU budgets)")
    add_device_options(p, "training (and the final CA/ASR measurement)", batch_size=64)
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")

    for name, handler, text, examples in (
        ("eval", cmd_eval, "CA/PA/ASR of no defense, ShrinkPad and every FIRE variant; streaming curve; detector",
         "  fire eval --checkpoint runs/digits-badnets\n"
         "  fire eval --checkpoint runs/digits-badnets --clean 100 --flagged 20 --layer block2 --json"),
        ("sweep", cmd_sweep, "CA and PA after FIRE at every candidate layer, and the label-free ranking of layer "
         "subsets; recommends the layers to repair",
         "  fire sweep --checkpoint runs/digits-badnets\n  fire sweep --checkpoint runs/c10 --estimator paired"),
    ):
        p = add_command(sub, name, handler, text, examples)
        p.add_argument("--checkpoint", type=Path, required=True,
                       help="directory written by `fire train` or `fire import`")
        p.add_argument("--clean", type=int, default=100, help="clean samples for the centroid (100)")
        p.add_argument("--flagged", type=int, default=20, help="flagged poisoned samples to estimate from (20)")
        p.add_argument("--out", type=Path, default=None, help="where CSV and PNG go (CHECKPOINT/results)")
        p.add_argument("--eval-images", type=int, default=None,
                       help="evaluate only the first N images of the evaluation split's class-stratified draw "
                            "(CPU budgets; default all)")
        add_device_options(p, "the model")
        p.add_argument("--json", action="store_true", help="print the result as one JSON line at the end")
        if name == "eval":
            p.add_argument("--layer", default=None, help="layer to repair, a module path (default: the deep layer of "
                           "the network's default pair; see sweep)")
            p.add_argument("--alpha", type=float, default=1.0, help="repair strength (1.0)")
        else:
            p.add_argument("--estimator", choices=["paired", "unpaired", "augmented"], default="unpaired",
                           help="direction estimator (unpaired)")
            p.add_argument("--rank-layers", action="append", default=None,
                           help="a layer whose subsets the label-free ranking scores; repeat (default: the "
                                "network's pair that `fire repo build` configures)")
            p.add_argument("--estimation", choices=ESTIMATION_MODES, default="independent",
                           help="how the ranked subsets are estimated (independent)")

    data_sub = add_group(sub, "data", "export images for clients, Locust and `fire ctl observe`", "data_command",
                         "ACTION")
    p = add_command(data_sub, "export", cmd_data_export,
                    "write x (uint8 NxHxWxC), y, poisoned to an .npz for the checkpoint's data set and attack",
                    "  fire data export --checkpoint runs/digits-badnets --split test --n 200 --out clean.npz\n"
                    "  # the defender's flagged samples (for `fire ctl observe`, `fire repo build --flagged 20`):\n"
                    "  fire data export --checkpoint runs/digits-badnets --part reserve --poisoned --n 20 "
                    "--out flagged.npz\n"
                    "  # triggered evaluation images, never the reserve (poisoned traffic for Locust, `fire infer`):\n"
                    "  fire data export --checkpoint runs/digits-badnets --poisoned --n 200 --out poisoned.npz")
    p.add_argument("--checkpoint", type=Path, required=True, help="directory written by `fire train` or `fire import`")
    p.add_argument("--split", choices=["train", "test"], default="test", help="data split (test)")
    p.add_argument("--poisoned", action="store_true", help="apply the checkpoint's trigger (non-target images)")
    p.add_argument("--n", type=int, default=None, help="at most N images (all)")
    p.add_argument("--part", choices=["evaluation", "reserve", "all"], default="evaluation",
                   help="test split: the images evaluated (all but the defender's reserve; default), the reserve "
                        "(with --poisoned: the flagged samples `fire repo build --flagged` uses), or all")
    p.add_argument("--include-reserve", action="store_true", help="the same as --part all")
    p.add_argument("--out", type=Path, required=True, help=".npz file to write")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
