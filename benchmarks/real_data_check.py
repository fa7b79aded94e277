"""Real-data check: a full-size backdoored CIFAR-10 model, offline FIRE against the served FIRE, on the same images.

As a new user would, on the shared data as it is (CIFAR-10 stored class by class) and a shared model:

1. ``make_attack_result.py`` (beside the shared models) writes BackdoorBench's attack_result.pt + PNGs;
2. ``fire import backdoorbench`` turns it into a checkpoint whose attack is the stored poisoned test set;
3. ``fire eval --layer L --eval-images N``: offline CA/PA/ASR, of which the unpaired projection row counts;
4. ``fire repo build --layer L --flagged 20``: the repository, its direction estimated from the reserve;
5. the served check: the real tritonserver on that repository, the same N evaluation images (clean, and the
   non-target ones poisoned) through ``fire_ensemble`` (and with ``fire_bypass``: undefended) over gRPC.

The served PA must be within --tolerance (3 points) of the offline one: the exit status is 1 otherwise. The attack
result and the imported checkpoint are reused when --work already has them (the import reads 9,000 PNGs); the
evaluation, the build and the served check always run. Timings are printed per step.

    python benchmarks/real_data_check.py                          # badnets, layer4.0, 2,000 evaluation images
    python benchmarks/real_data_check.py --attack blended --layer layer1.0 --eval-images 1000 --json
    FIRE_SHARED_DIR=/data/shared python benchmarks/real_data_check.py --work /tmp/real
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fire_backend.data import load_dataset, resolve_attack
from fire_backend.defaults import shared_dir
from fire_backend.launcher.server import running_server
from fire_backend.offline.checkpoint import load_checkpoint
from fire_backend.offline.evaluation import evaluation_set
from fire_backend.repository.layout import ARTIFACTS_DIR, ServingSettings
from fire_backend.wire.client import FireClient
from fire_backend.wire.names import FIRE_ENSEMBLE
from fire_backend.wire.token import pinned_token

ROOT = Path(__file__).resolve().parents[1]
FIRE = Path(sys.executable).with_name("fire")
ATTACKS = ("badnets", "blended")
OFFLINE_ROW = "fire-unpaired-projection"


def step(timings: dict[str, float], name: str, done: bool, command: list[str]) -> str:
    """Run ``command`` unless ``done``; record its wall time; return its stdout."""
    if done:
        print(f"[{name}] reused", flush=True)
        timings[name] = 0.0
        return ""
    print(f"[{name}] {' '.join(command)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    timings[name] = round(time.perf_counter() - start, 1)
    if proc.returncode != 0:
        raise SystemExit(f"[{name}] failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def shared_model_parser(description: str, work: str) -> argparse.ArgumentParser:
    """The options of a check on a shared model: attack, flagged and evaluation images, serving, folders."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attack", choices=ATTACKS, default="badnets", help="which shared model (badnets)")
    parser.add_argument("--flagged", type=int, default=20, help="flagged samples from the reserve (20)")
    parser.add_argument("--eval-images", type=int, default=2000, help="evaluation images (2000)")
    parser.add_argument("--batch", type=int, default=64, help="images per inference request (64)")
    parser.add_argument("--torch-threads", type=int, default=2, help="torch threads per served stage (2)")
    parser.add_argument("--shared", type=Path, default=shared_dir(ROOT),
                        help="the CIFAR-10 file and models (FIRE_SHARED_DIR, else shared/ in the project root)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / work,
                        help=f"where the record, checkpoint, results and repository go (runs/{work})")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line at the end")
    return parser


def imported_checkpoint(shared: Path, attack: str, work: Path, timings: dict[str, float]) -> Path:
    """``work/checkpoint``: the shared model of ``attack`` as a checkpoint (steps 1-2; reused when already there)."""
    cifar = shared / "data" / "cifar10.npz"
    weights = shared / "models" / f"cifar10_preactresnet18_{attack}.fp16.pt"
    maker = shared / "models" / "make_attack_result.py"
    missing = [str(p) for p in (cifar, weights, maker) if not p.is_file()]
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)} (set FIRE_SHARED_DIR or --shared; docs/data.md)")
    record, checkpoint = work / "record", work / "checkpoint"
    step(timings, "attack result", (record / "attack_result.pt").is_file(),
         [sys.executable, str(maker), "--weights", str(weights), "--attack", attack, "--data", str(cifar),
          "--out", str(record)])
    step(timings, "fire import", (checkpoint / "meta.json").is_file(),
         [str(FIRE), "import", "backdoorbench", str(record / "attack_result.pt"), "--data", f"cifar10:{cifar}",
          "--out", str(checkpoint)])
    return checkpoint


def figures(labels: np.ndarray, y: np.ndarray, poisoned_labels: np.ndarray, poisoned_y: np.ndarray,
            target: int) -> dict[str, float]:
    """CA, PA, ASR, and ``clean_as_target``: clean images of other classes predicted as the target, the share of
    ASR a model's plain errors account for with no trigger at all (its floor: 4% for a 65%-accurate model)."""
    others = y != target
    return {"ca": float((labels == y).mean()), "pa": float((poisoned_labels == poisoned_y).mean()),
            "asr": float((poisoned_labels == target).mean()),
            "clean_as_target": float((labels[others] == target).mean())}


def served_check(repository: Path, checkpoint: Path, eval_images: int, batch: int) -> dict:
    """CA/PA/ASR through the real tritonserver, defended and bypassed, on the evaluation images `fire eval` used."""
    _, meta = load_checkpoint(checkpoint)
    settings = ServingSettings.read(repository / ARTIFACTS_DIR)
    data = load_dataset(meta.dataset)
    # the same rule (and, recorded in the repository, the same reserve) as `fire eval --eval-images`
    evaluation = evaluation_set(data.x_test, data.y_test, resolve_attack(meta.attack), meta.target, eval_images)
    clean, poisoned = evaluation.x.numpy(), evaluation.poisoned.numpy()
    y, poisoned_y = evaluation.y.numpy(), evaluation.poisoned_y.numpy()
    token = secrets.token_urlsafe(16)
    start = time.perf_counter()
    with running_server(repository, extra_env=pinned_token(token)) as server:
        started = time.perf_counter() - start
        with FireClient(server.urls["grpc"], token=token) as client:
            defended = [client.infer_batches(x, batch) for x in (clean, poisoned)]
            bypassed = [client.infer_batches(x, batch, bypass=True) for x in (clean, poisoned)]
    return {
        "fire": figures(defended[0].labels, y, defended[1].labels, poisoned_y, meta.target),
        "bypassed": figures(bypassed[0].labels, y, bypassed[1].labels, poisoned_y, meta.target),
        "flagged_clean": float(defended[0].flagged.mean()), "flagged_poisoned": float(defended[1].flagged.mean()),
        "versions": sorted({int(v) for v in defended[1].versions}),
        "reserve": {"size": settings.reserve_size, "seed": settings.reserve_seed},
        "images": len(y), "poisoned_images": len(poisoned_y),
        "server_start_s": round(started, 1), "infer_s": round(time.perf_counter() - start - started, 1),
    }


def main() -> int:
    parser = shared_model_parser(__doc__, "real-data-check")
    parser.add_argument("--layer", default="layer4.0", help="the layer to repair at (layer4.0)")
    parser.add_argument("--tolerance", type=float, default=0.03, help="allowed |served PA - offline PA| (0.03)")
    args = parser.parse_args()

    work = args.work / args.attack
    eval_out, repository = work / f"eval-{args.layer}-{args.eval_images}", work / f"repository-{args.layer}"
    timings: dict[str, float] = {}
    begin = time.perf_counter()
    checkpoint = imported_checkpoint(args.shared, args.attack, work, timings)
    eval_file = eval_out / "eval.json"
    step(timings, "fire eval", False,
         [str(FIRE), "eval", "--checkpoint", str(checkpoint), "--layer", args.layer, "--flagged", str(args.flagged),
          "--eval-images", str(args.eval_images), "--out", str(eval_out)])
    report = json.loads(eval_file.read_text())
    rows = {row["method"]: row for row in report["rows"]}
    step(timings, "fire repo build", False,
         [str(FIRE), "repo", "build", "--checkpoint", str(checkpoint), "--layer", args.layer, "--flagged",
          str(args.flagged), "--torch-threads", str(args.torch_threads), "--allow-bypass", "--out", str(repository)])
    served = served_check(repository, checkpoint, args.eval_images, args.batch)
    timings["served check"] = served.pop("server_start_s") + served.pop("infer_s")
    offline = {k: rows[OFFLINE_ROW][k] for k in ("ca", "pa", "asr")}
    gap = served["fire"]["pa"] - offline["pa"]
    result = {
        "attack": args.attack, "layer": args.layer, "flagged": args.flagged, "defender": report["defender"],
        "offline": offline, "offline_undefended": {k: rows["undefended"][k] for k in ("ca", "pa", "asr")},
        "served": served, "pa_gap": gap, "within_tolerance": abs(gap) <= args.tolerance,
        "timings_s": timings, "total_s": round(time.perf_counter() - begin, 1),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
                   f"{os.getloadavg()[0]:.1f}",
    }
    print(f"\n{args.attack} at {args.layer}, {args.flagged} flagged; {served['images']} evaluation images "
          f"({served['poisoned_images']} poisoned), reserve {served['reserve']}")
    print(f"{'':34s} {'CA':>7s} {'PA':>7s} {'ASR':>7s}")
    for name, fig in (("offline undefended", result["offline_undefended"]), (f"offline {OFFLINE_ROW}", offline),
                      ("served bypassed", served["bypassed"]), (f"served {FIRE_ENSEMBLE}", served["fire"])):
        print(f"{name:34s} {fig['ca']:7.4f} {fig['pa']:7.4f} {fig['asr']:7.4f}")
    print(f"served PA - offline PA: {gap:+.4f} (tolerance {args.tolerance}); flagged: "
          f"{served['flagged_poisoned']:.3f} of poisoned, {served['flagged_clean']:.3f} of clean")
    print("timings (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()) + f"; total {result['total_s']}")
    if args.json:
        print(json.dumps(result))
    return 0 if result["within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
