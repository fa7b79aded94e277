"""PA against the number of flagged samples, per attack, with ShrinkPad as the reference (issue 16's figures).

The default served configuration, with the library code the server runs when ``fire ctl observe`` receives the
defender's first n flagged reserve images (no second FIRE implementation):

- the network's default repair layers (:func:`fire_backend.multilayer.default_layers`) and the
  estimation settings a default ``fire repo build`` writes, read back as the control endpoint reads them
  (:meth:`fire_backend.multilayer.EstimationSettings.of`);
- the evidence: the 100 clean reserve images (``clean_samples``) and the first n flagged reserve images, passed
  through uint8 as ``fire data export`` / ``observe`` pass them; :func:`fire_backend.multilayer.learn` ranks the
  layer subsets without labels (n >= 5; below that every default layer is repaired, unranked, as served) and
  estimates the directions; the evaluation repairs with :func:`fire_backend.multilayer.repairs_of` (fire.py's
  repair, the fused layout's hooks) via :func:`fire_backend.offline.evaluation.subset_metrics`;
- ShrinkPad (:func:`fire_backend.data.augment.shrinkpad_defense`) on the same evaluation images: a reference line
  (it needs no flagged sample);
- the evaluation images: the first N of the seeded, class-stratified order of the test split without the reserve
  (:func:`fire_backend.offline.evaluation.evaluation_set`), clean and the non-target ones with the trigger.

Models: the shared full-size BadNets and Blended PreActResNet18 (checkpoints from ``make_attack_result.py`` + ``fire
import backdoorbench``, reused from --work as ``benchmarks/default_config_check.py`` leaves them; the script stops
with the missing paths when the shared files are absent; ``--no-shared`` skips them) and the digits attacks
(trained once into --digits, as the tests' FIRE_TEST_CACHE). Writes ``pa_vs_flagged.json`` and ``pa_vs_flagged.png``
(one panel per attack) to --out and prints the table. A measurement: the exit status is 0 whatever the figures.

    python benchmarks/pa_vs_flagged.py --eval-images 1000                     # docs/results/pa-vs-flagged/
    python benchmarks/pa_vs_flagged.py --no-shared --out /tmp/figures          # digits only, a minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from real_data_check import ATTACKS as SHARED_ATTACKS
from real_data_check import ROOT, imported_checkpoint

from fire_backend.data import load_dataset, resolve_attack, to_tensor
from fire_backend.data.augment import shrinkpad_defense
from fire_backend.data.datasets import to_uint8
from fire_backend.data.reserve import defender_samples
from fire_backend.defaults import shared_dir
from fire_backend.models.network import Network
from fire_backend.multilayer import EstimationSettings, Evidence, default_layers, learn
from fire_backend.offline.checkpoint import load_checkpoint
from fire_backend.offline.evaluation import accuracy_figures, evaluation_set, predict, subset_metrics
from fire_backend.repository.build import RepositoryOptions
from fire_backend.repository.layout import ServingSettings

#: the flagged counts of the curve (the defender's reserve holds at least 20 usable images for every attack here)
CURVE = (1, 2, 3, 5, 10, 20)


def default_estimation(model: Network, meta) -> tuple[tuple[str, ...], object]:
    """The default repository's repair layers and estimation settings (what ``fire repo build`` with no option
    writes, read back as the control endpoint reads them)."""
    options = RepositoryOptions()
    layers = default_layers(model.stages())
    shapes = {layer.name: layer.shape for layer in model.candidates()}
    settings = ServingSettings(
        layer=layers[-1], input_shape=meta.spec.input_shape, latent_shape=shapes[layers[-1]],
        num_classes=meta.spec.classes, arch=meta.spec.label, repair_layers=layers,
        layer_shapes={name: shapes[name] for name in layers}, default_alpha=options.alpha,
        default_threshold=options.flag_threshold, estimation=options.estimation)
    return layers, EstimationSettings.of(settings)


def curve(checkpoint: Path, eval_images: int | None, batch: int) -> dict:
    """Undefended and ShrinkPad figures, and per flagged count the default configuration's figures and layers."""
    model, meta = load_checkpoint(checkpoint)
    data, attack = load_dataset(meta.dataset), resolve_attack(meta.attack)
    evaluation = evaluation_set(data.x_test, data.y_test, attack, meta.target, eval_images)
    samples = defender_samples(data.x_test, data.y_test, attack, meta.target, RepositoryOptions().clean_samples,
                               max(CURVE))
    layers, settings = default_estimation(model, meta)
    net = model
    undefended = subset_metrics(net, evaluation, meta.target, {}, batch)
    shrinkpad = accuracy_figures(predict(model, shrinkpad_defense(evaluation.x), batch), evaluation.y,
                                 predict(model, shrinkpad_defense(evaluation.poisoned), batch), evaluation.poisoned_y,
                                 meta.target)
    flagged = to_tensor(to_uint8(samples.flagged))  # as exported and observed
    points = []
    for n in CURVE:
        start = time.perf_counter()
        evidence = Evidence(net, samples.clean, flagged[:n], layers, settings.batch)
        sets, _ = learn(evidence, settings)
        figures = subset_metrics(net, evaluation, meta.target, sets, batch)
        points.append({"flagged": n, **asdict(figures), "layers": [name for name, (d, _) in sets.items() if d],
                       "target_found": evidence.target, "seconds": round(time.perf_counter() - start, 1)})
        print(f"  n={n:2d} CA {figures.ca:.4f} PA {figures.pa:.4f} ASR {figures.asr:.4f} "
              f"layers {'+'.join(points[-1]['layers'])} ({points[-1]['seconds']} s)", flush=True)
    return {"target": meta.target, "images": len(evaluation.y), "poisoned_images": len(evaluation.poisoned_y),
            "undefended": asdict(undefended), "shrinkpad": asdict(shrinkpad), "points": points}


#: the digits attacks of the curves: name -> (trigger, poisoning); SIG poison-label at amplitude 0.12, as measured
#: (clean-label SIG does not implant on 8 x 8 digits: ASR 0.006)
DIGITS_ATTACKS = {"badnets": ("badnets", "auto"), "blended": ("blended", "auto"),
                  "sig": ("sig(delta=0.12)", "dirty-label")}


def digits_checkpoint(root: Path, name: str) -> Path:
    """``root/digits-NAME`` (the tests' FIRE_TEST_CACHE layout for badnets and blended), trained once when absent."""
    from fire_backend.offline.training import TrainConfig, train_backdoored

    attack, poisoning = DIGITS_ATTACKS[name]
    out = root / (f"digits-{name}" if poisoning == "auto" else f"digits-{name}-{poisoning}")
    if not (out / "meta.json").is_file():
        print(f"[digits {name}] training into {out}", flush=True)
        train_backdoored(TrainConfig(attack=attack, poisoning=poisoning), out, progress=False)
    return out


def plot(path: Path, results: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.3 * len(results), 3.7), sharey=True, squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items(), strict=True):
        xs = [p["flagged"] for p in result["points"]]
        ax.plot(xs, [p["pa"] for p in result["points"]], marker="o", label="FIRE default (PA)")
        ax.plot(xs, [p["asr"] for p in result["points"]], marker=".", linestyle=":", color="tab:red",
                label="FIRE default (ASR)")
        ax.axhline(result["shrinkpad"]["pa"], linestyle="--", color="tab:gray", label="ShrinkPad (PA)")
        ax.axhline(result["undefended"]["ca"], linestyle="-.", color="tab:green", linewidth=0.8,
                   label="undefended CA")
        ax.set(xscale="log", xticks=xs, xticklabels=[str(x) for x in xs], ylim=(0, 1.02), xlabel="flagged samples",
               title=f"{name} ({result['images']} images)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy / attack success")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-images", type=int, default=1000, help="evaluation images per shared model (1000)")
    parser.add_argument("--batch", type=int, default=64, help="images per forward pass (64)")
    parser.add_argument("--torch-threads", type=int, default=2, help="torch threads (2)")
    parser.add_argument("--shared", type=Path, default=shared_dir(ROOT),
                        help="the CIFAR-10 file and models (FIRE_SHARED_DIR, else shared/ in the project root)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "default-check",
                        help="where the shared models' checkpoints are, or go (runs/default-check)")
    parser.add_argument("--digits", type=Path, default=Path(os.environ.get("FIRE_TEST_CACHE") or
                                                            ROOT / "runs" / "digits"),
                        help="the digits checkpoints, digits-ATTACK (FIRE_TEST_CACHE, else runs/digits)")
    parser.add_argument("--no-shared", action="store_true", help="the digits attacks only")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "pa-vs-flagged",
                        help="where the figure and its JSON go (docs/results/pa-vs-flagged)")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)

    begin = time.perf_counter()
    try:
        checkpoints = {} if args.no_shared else {
            f"CIFAR-10 {attack}": imported_checkpoint(args.shared, attack, args.work / attack, {})
            for attack in SHARED_ATTACKS}
    except SystemExit as exc:
        raise SystemExit(f"{exc}; or --no-shared for the digits attacks only") from None
    checkpoints.update({f"digits {attack}": digits_checkpoint(args.digits, attack) for attack in DIGITS_ATTACKS})
    results = {}
    for name, checkpoint in checkpoints.items():
        print(f"[{name}] {checkpoint}", flush=True)
        results[name] = curve(checkpoint, args.eval_images if name.startswith("CIFAR") else None, args.batch)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"curve": list(CURVE), "results": results, "total_s": round(time.perf_counter() - begin, 1),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
                         f"{os.getloadavg()[0]:.1f} at the end, torch threads {args.torch_threads}"}
    (args.out / "pa_vs_flagged.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(args.out / "pa_vs_flagged.png", results)
    print("\n| attack | undefended CA / PA / ASR | ShrinkPad CA / PA / ASR | "
          + " | ".join(f"n={n}" for n in CURVE) + " |\n" + "| --- " * (3 + len(CURVE)) + "|")
    for name, r in results.items():
        row = " | ".join(f"{p['ca']:.3f} / **{p['pa']:.3f}** / {p['asr']:.3f}" for p in r["points"])
        print(f"| {name} | {'{ca:.3f} / {pa:.3f} / {asr:.3f}'.format(**r['undefended'])} | "
              f"{'{ca:.3f} / **{pa:.3f}** / {asr:.3f}'.format(**r['shrinkpad'])} | {row} |")
    print(f"machine: {record['machine']}; total {record['total_s']} s; wrote {args.out}/pa_vs_flagged.json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
