"""FIRE on networks it was not written for: train, bring in, serve and measure users' own networks (issue 22).

For each network of ``benchmarks/networks/`` (``FILE.py`` with a ``build`` factory): as a user would,

1. ``fire train --module benchmarks/networks/FILE.py:build``: backdoored on CIFAR-10 on the CPU (a seeded,
   class-stratified subset; BadNets, target 0 by default);
2. ``fire import model --module ... --weights model.pt``: the module-file form; for the networks named in
   ``--pt2`` also ``torch.export`` (eval mode, dynamic batch) + ``fire import model --exported``: the .pt2 form;
3. ``benchmarks/default_config_check.py --checkpoint``: the served default build, 20 flagged reserve images
   learned online through ``fire ctl observe``, N shuffled evaluation images through ``fire_ensemble``, against
   issue 16's targets (PA >= 0.95 x CA, ASR <= 2%, CA drop <= 0.5 point);
4. with ``--bench``: ``fire bench --checkpoint`` (fused vs monolithic throughput, every layout the network can be
   cut for).

Steps already done in --work are reused. Prints one table row per network and form; writes ``summary.json``. A
measurement: the exit status is 0 whatever the figures. Trainings run at the priority the script is started with
(``nice -n 10`` on a shared machine); its commands get ``OMP_WAIT_POLICY=PASSIVE`` unless it is set (on a busy
machine spinning OpenMP threads burned ten times the CPU time of a training step, measured).

    nice -n 10 python benchmarks/any_model.py --data cifar10:shared/data/cifar10.npz --work runs/any-model \
        --networks resmix --train-subset 10000 --epochs 6
    nice -n 10 python benchmarks/any_model.py --data cifar10:shared/data/cifar10.npz --work runs/any-model \
        --networks vgg_small,mobile_small,vit_small --train-subset 6000 --epochs 6
    python benchmarks/any_model.py --data cifar10:shared/data/cifar10.npz --work runs/any-model \
        --steps import,check,bench
    python benchmarks/any_model.py --data cifar10:../shared/data/cifar10.npz --work runs/any-model \
        --steps bench --bench-targets fused,monolithic     # the issue's ratio only, a third of the time
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIRE = Path(sys.executable).with_name("fire")
NETWORKS = ROOT / "benchmarks" / "networks"
DEFAULT_NETWORKS = ("resmix", "vgg_small", "mobile_small", "vit_small")
STEPS = ("train", "import", "check", "bench")


def run(command: list[str], log: Path) -> str:
    """Run ``command``, its output kept in ``log``; SystemExit with the tail when it fails."""
    print(f"$ {' '.join(command)}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
    proc = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    log.write_text(proc.stdout + proc.stderr)
    print(f"  ({time.perf_counter() - start:.0f} s, log {log})", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def export_program(checkpoint: Path, out: Path) -> None:
    """What a user runs to ship the trained network as a .pt2: eval mode, a dynamic batch dimension."""
    import torch

    from fire_backend.offline.checkpoint import load_checkpoint

    network, meta = load_checkpoint(checkpoint)
    example = (torch.rand(2, *meta.spec.input_shape),)
    program = torch.export.export(network.model.eval(), example, dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="cifar10:PATH (never downloaded)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "any-model", help="where everything goes")
    p.add_argument("--networks", default=",".join(DEFAULT_NETWORKS), help="files of benchmarks/networks/ (all)")
    p.add_argument("--pt2", default="resmix", help="networks also brought in as a torch.export program (resmix)")
    p.add_argument("--steps", default="train,import,check", help=f"of {','.join(STEPS)} (train,import,check)")
    p.add_argument("--attack", default="badnets")
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--eval-images", type=int, default=2000)
    p.add_argument("--bench-duration", type=float, default=15.0)
    p.add_argument("--bench-rounds", type=int, default=2)
    p.add_argument("--bench-targets", default="", help="fire bench --targets, e.g. fused,monolithic (all it serves)")
    args = p.parse_args()
    steps = set(args.steps.split(","))
    if steps - set(STEPS):
        raise SystemExit(f"--steps: unknown {sorted(steps - set(STEPS))}; steps are {', '.join(STEPS)}")
    summary_path = args.work / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    attack = ["--attack", args.attack, "--target", str(args.target)]
    for name in args.networks.split(","):
        work = args.work / name
        module = f"{NETWORKS / name}.py:build"
        trained = work / "trained"
        entry = summary.setdefault(name, {})
        if "train" in steps and not (trained / "meta.json").is_file():
            out = run([str(FIRE), "train", "--module", module, "--data", args.data, *attack, "--train-subset",
                       str(args.train_subset), "--epochs", str(args.epochs), "--out", str(trained), "--json"],
                      work / "train.log")
            entry["trained"] = last_json(out)
        forms = {"module": work / "module"}
        if name in args.pt2.split(","):
            forms["exported"] = work / "exported"
        if "import" in steps:
            if not (forms["module"] / "meta.json").is_file():
                run([str(FIRE), "import", "model", "--module", module, "--weights", str(trained / "model.pt"),
                     "--data", args.data, *attack, "--out", str(forms["module"])], work / "import-module.log")
            if "exported" in forms and not (forms["exported"] / "meta.json").is_file():
                program = work / f"{name}.pt2"
                export_program(trained, program)
                run([str(FIRE), "import", "model", "--exported", str(program), "--data", args.data, *attack,
                     "--out", str(forms["exported"])], work / "import-exported.log")
        for form, checkpoint in forms.items():
            if "check" in steps and form not in entry.get("check", {}):
                out = run([sys.executable, str(ROOT / "benchmarks" / "default_config_check.py"), "--checkpoint",
                           str(checkpoint), "--eval-images", str(args.eval_images), "--work", str(work / "check"),
                           "--json"], work / f"check-{form}.log")
                entry.setdefault("check", {})[form] = last_json(out)
            if "bench" in steps and form == "module":
                targets = ["--targets", args.bench_targets] if args.bench_targets else []
                out = run([str(FIRE), "bench", "--checkpoint", str(checkpoint), "--duration",
                           str(args.bench_duration), "--rounds", str(args.bench_rounds), *targets, "--out",
                           str(work / "bench"), "--json"], work / "bench.log")
                report = last_json(out)
                entry["bench"] = {"ratios": report["ratios"], "loadavg_1m": [report["settings"]["loadavg_1m_start"],
                                                                              report["settings"]["loadavg_1m_end"]]}
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{'network':14s} {'form':9s} {'undefended CA/ASR':>18s} {'served FIRE CA / PA / ASR':>26s} "
          f"{'layers':22s} targets")
    for name, entry in summary.items():
        for form, check in entry.get("check", {}).items():
            served = check["served"]
            und, fire = served["undefended"], served["fire"]
            met = ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in check["targets_met"].items())
            print(f"{name:14s} {form:9s} {und['ca']:8.4f} / {und['asr']:.3f} {fire['ca']:10.4f} / {fire['pa']:.4f} / "
                  f"{fire['asr']:.4f} {'+'.join(served['layers_chosen']):22s} {met}")
        if "bench" in entry:
            print(f"{name:14s} bench ratios {entry['bench']['ratios']} (load {entry['bench']['loadavg_1m']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
