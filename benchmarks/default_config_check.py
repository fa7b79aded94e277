"""The default served configuration, learning online: issue 16's targets on a full-size backdoored CIFAR-10 model.

No layer and no attack is named anywhere: as an operator would,

1. ``make_attack_result.py`` + ``fire import backdoorbench`` (reused when --work has them, as real_data_check.py);
2. ``fire repo build`` with no --layer and no --flagged: the default layer pair, store at version 0
   (``--allow-bypass`` only so that this script can measure the undefended model through the same server);
3. ``fire data export --poisoned --part reserve --n 20``: the defender's flagged images from its reserve;
4. the real tritonserver on that repository; ``fire ctl observe flagged.npz`` learns every configured layer and
   ranks the layer subsets without labels (one version: ``--publish-every`` = the flagged count);
5. N evaluation images of the shuffled test split (never the reserve), clean and the non-target ones poisoned,
   through ``fire_ensemble`` over gRPC, and again with ``fire_bypass`` (the undefended model).

Prints CA/PA/ASR served and undefended against the targets (PA >= 0.95 x CA, ASR <= 2 %, CA drop <= 0.5 point),
the layers the ranking chose and its table; the exit status is 0 whatever the figures (a measurement, not a test).

    python benchmarks/default_config_check.py --attack badnets
    python benchmarks/default_config_check.py --attack blended --eval-images 2000 --json
    PYTHONPATH=benchmarks python benchmarks/default_config_check.py --checkpoint runs/c10-star  # fire train's
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import subprocess
import sys
import time
from pathlib import Path

from real_data_check import FIRE, figures, imported_checkpoint, shared_model_parser, step

from fire_backend.data import load_dataset, resolve_attack
from fire_backend.launcher.server import running_server
from fire_backend.offline.checkpoint import load_checkpoint
from fire_backend.offline.evaluation import evaluation_set
from fire_backend.wire.client import FireClient
from fire_backend.wire.token import TOKEN_ENV, TOKEN_FILE_ENV, pinned_token

#: issue 16's targets
PA_OVER_CA, MAX_ASR, MAX_CA_DROP = 0.95, 0.02, 0.005


def targets(fire: dict, undefended: dict) -> dict[str, bool]:
    return {"pa >= 0.95 x ca": fire["pa"] >= PA_OVER_CA * fire["ca"], "asr <= 2%": fire["asr"] <= MAX_ASR,
            "ca drop <= 0.5 pt": undefended["ca"] - fire["ca"] <= MAX_CA_DROP}


def ctl(url: str, token: str, *argv: str) -> dict:
    """One `fire ctl` command against the server, its --json answer."""
    env = {**os.environ, TOKEN_ENV: token, TOKEN_FILE_ENV: ""}
    proc = subprocess.run([str(FIRE), "ctl", "--url", url, "--json", *argv], capture_output=True, text=True,
                          env=env, check=False, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"fire ctl {' '.join(argv)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def served_learning(repository: Path, checkpoint: Path, flagged_file: Path, flagged: int, eval_images: int,
                    batch: int) -> dict:
    _, meta = load_checkpoint(checkpoint)
    data = load_dataset(meta.dataset)
    evaluation = evaluation_set(data.x_test, data.y_test, resolve_attack(meta.attack), meta.target, eval_images)
    clean, poisoned = evaluation.x.numpy(), evaluation.poisoned.numpy()
    y, poisoned_y = evaluation.y.numpy(), evaluation.poisoned_y.numpy()
    token = secrets.token_urlsafe(16)
    timings = {}
    start = time.perf_counter()
    with running_server(repository, extra_env=pinned_token(token)) as server:
        timings["server start"] = round(time.perf_counter() - start, 1)
        url = server.urls["grpc"]
        before = ctl(url, token, "status")
        start = time.perf_counter()
        observed = ctl(url, token, "observe", str(flagged_file), "--publish-every", str(flagged))
        timings["fire ctl observe"] = round(time.perf_counter() - start, 1)
        status = ctl(url, token, "status")
        time.sleep(0.5)  # every instance applies the committed version from its next batch
        start = time.perf_counter()
        with FireClient(url, token=token) as client:
            defended = [client.infer_batches(x, batch) for x in (clean, poisoned)]
            bypassed = [client.infer_batches(x, batch, bypass=True) for x in (clean, poisoned)]
        timings["inference"] = round(time.perf_counter() - start, 1)
    return {
        "fire": figures(defended[0].labels, y, defended[1].labels, poisoned_y, meta.target),
        "undefended": figures(bypassed[0].labels, y, bypassed[1].labels, poisoned_y, meta.target),
        "flagged_clean": float(defended[0].flagged.mean()), "flagged_poisoned": float(defended[1].flagged.mean()),
        "versions": sorted({int(v) for v in defended[1].versions}), "start_version": before["version"],
        "layers_chosen": observed["layers"], "target_found": observed["target"], "ranking": observed["ranking"],
        "layers": status["layers"], "estimation": status["estimation"],
        "images": len(y), "poisoned_images": len(poisoned_y), "timings_s": timings,
    }


def main() -> int:
    parser = shared_model_parser(__doc__, "default-check")
    parser.add_argument("--checkpoint", type=Path,
                        help="a fire checkpoint (`fire train`) instead of a shared model; its attack is the one "
                             "recorded in it (a custom trigger needs its module on PYTHONPATH)")
    args = parser.parse_args()

    timings: dict[str, float] = {}
    begin = time.perf_counter()
    if args.checkpoint:
        checkpoint = args.checkpoint
        args.attack = load_checkpoint(checkpoint)[1].attack
        work = args.work / checkpoint.name
    else:
        work = args.work / args.attack
        checkpoint = imported_checkpoint(args.shared, args.attack, work, timings)
    repository, flagged_file = work / "repository", work / f"flagged-{args.flagged}.npz"
    step(timings, "fire repo build", False,
         [str(FIRE), "repo", "build", "--checkpoint", str(checkpoint), "--allow-bypass", "--torch-threads",
          str(args.torch_threads), "--out", str(repository)])
    step(timings, "fire data export", False,
         [str(FIRE), "data", "export", "--checkpoint", str(checkpoint), "--poisoned", "--part", "reserve", "--n",
          str(args.flagged), "--out", str(flagged_file)])
    served = served_learning(repository, checkpoint, flagged_file, args.flagged, args.eval_images, args.batch)
    timings.update(served.pop("timings_s"))
    met = targets(served["fire"], served["undefended"])
    result = {"attack": args.attack, "flagged": args.flagged, "served": served, "targets_met": met,
              "timings_s": timings, "total_s": round(time.perf_counter() - begin, 1),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
                         f"{os.getloadavg()[0]:.1f}"}
    print(f"\n{args.attack}: the default configuration, {args.flagged} flagged reserve images observed online; "
          f"{served['images']} evaluation images ({served['poisoned_images']} poisoned)")
    print(f"ranking (label-free) chose {'+'.join(served['layers_chosen'])}; target found {served['target_found']}")
    for r in served["ranking"]:
        print(f"  {'+'.join(r['layers']):24s} flip {r['flip']:.2f} restore {r['restore']:.3f} change "
              f"{r['change']:.2f} clean_tv {r['clean_tv']:.4f} score {r['score']:.3f}")
    print(f"{'':24s} {'CA':>7s} {'PA':>7s} {'ASR':>7s}  clean images of other classes labelled target")
    for name in ("undefended", "fire"):
        fig = served[name]
        print(f"{'served ' + name:24s} {fig['ca']:7.4f} {fig['pa']:7.4f} {fig['asr']:7.4f}  "
              f"{fig['clean_as_target']:.4f}")
    print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in met.items()))
    print("timings (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()) + f"; total {result['total_s']}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
