"""The served check of one checkpoint, on a GPU (benchmarks/gpu/run.sh runs it; it also runs on a CPU).

Builds a repository with every layout and the baselines (``--gpu``: KIND_GPU instances), serves it, and through the
real server: CA/PA/ASR of every layout and baseline with no direction; ``fire_control`` observes 20 flagged
reserve images; CA/PA/ASR again, the version each layout serves, a signed bypass against the undefended answer;
a push and a rollback; Triton's per-model counters over the whole check. Writes ``check.json`` into ``--out``.

    python benchmarks/gpu/check.py --checkpoint runs/digits --out results/digits [--gpu] [--eval 400]
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from pathlib import Path

import numpy as np

from fire_backend import stage_metrics
from fire_backend.bench import bench_layouts, bench_targets, machine_info
from fire_backend.data import load_dataset
from fire_backend.data.export import export_images
from fire_backend.launcher.server import running_server
from fire_backend.offline.checkpoint import load_checkpoint
from fire_backend.repository.build import RepositoryOptions, build_repository
from fire_backend.wire.client import FireClient
from fire_backend.wire.control import ControlClient
from fire_backend.wire.names import FIRE_ENSEMBLE, UNDEFENDED_ENSEMBLE
from fire_backend.wire.token import pinned_token

FLAGGED = 20


def figures(client: FireClient, model: str, clean, poisoned, target: int, bypass: bool = False) -> dict:
    clean_out = client.infer_batches(clean.x, 64, model, bypass)
    poison_out = client.infer_batches(poisoned.x, 64, model, bypass)
    out = {"ca": float((clean_out.labels == clean.y).mean()), "pa": float((poison_out.labels == poisoned.y).mean()),
           "asr": float((poison_out.labels == target).mean())}
    if poison_out.versions is not None:
        out["versions"] = sorted({int(v) for v in np.concatenate([clean_out.versions, poison_out.versions])})
        out["poisoned_flagged"] = float(poison_out.flagged.mean())
        out["clean_flagged"] = float(clean_out.flagged.mean())
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--eval", type=int, default=400, help="evaluation images, clean and poisoned each (400)")
    args = p.parse_args()
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    _, meta = load_checkpoint(args.checkpoint)
    repository = args.out / "repository"
    options = RepositoryOptions(compare_layouts=("inline", "separate"), baselines=True, allow_bypass=True,
                                gpu=args.gpu)
    settings = build_repository(args.checkpoint, repository, options=options)
    data = load_dataset(meta.dataset)
    clean = export_images(data, meta.attack, meta.target, n=args.eval)
    poisoned = export_images(data, meta.attack, meta.target, poisoned=True, n=args.eval)
    flagged = export_images(data, meta.attack, meta.target, poisoned=True, n=FLAGGED, part="reserve")
    cut = not settings.cut_reason
    targets = bench_targets(bench_layouts(len(settings.repair_layers), cut), cut)
    token = secrets.token_urlsafe(16)
    report: dict = {"checkpoint": str(args.checkpoint), "arch": settings.arch, "layer": settings.layer,
                    "gpu": args.gpu, "eval_images": len(clean), "flagged": len(flagged)}
    with running_server(repository, extra_env=pinned_token(token)) as server:
        report["startup_s"] = server.startup_s
        before_all = stage_metrics.scrape(server.urls["metrics"])
        with FireClient(server.urls["grpc"], token=token) as client, \
                ControlClient(server.urls["grpc"], token) as ctl:
            report["tritonserver"] = client.server_metadata().get("version")
            report["before"] = {t.name: figures(client, t.model, clean, poisoned, meta.target) for t in targets}
            observed = ctl.observe(flagged.x)
            time.sleep(0.2)
            report["observe"] = {k: observed[k] for k in ("version", "poisoned_count", "clean_count")}
            report["after"] = {t.name: figures(client, t.model, clean, poisoned, meta.target) for t in targets}
            report["bypass_equals_undefended"] = bool(np.array_equal(
                client.infer_batches(poisoned.x, 64, FIRE_ENSEMBLE, bypass=True).labels,
                client.infer_batches(poisoned.x, 64, UNDEFENDED_ENSEMBLE).labels))
            status = ctl.status()
            report["instances"] = status["instances"]
            pushed = ctl.push([{"beta": np.random.default_rng(0).standard_normal(settings.latent_dim).tolist()}])
            time.sleep(0.2)
            served = client.infer(clean.x[:4]).versions.tolist()
            ctl.rollback(observed["version"])
            time.sleep(0.2)
            report["push_rollback"] = {"pushed": pushed["version"], "served_after_push": served,
                                       "served_after_rollback": client.infer(clean.x[:4]).versions.tolist()}
        after_all = stage_metrics.scrape(server.urls["metrics"])
        report["stages"] = {t.name: [s.to_dict() for s in stage_metrics.difference(before_all, after_all, t.stages)]
                            for t in targets}
    report["machine"] = machine_info(report.get("tritonserver"))
    report["elapsed_s"] = time.time() - started
    ok = (all(report["after"][t.name]["versions"] == [observed["version"]] for t in targets[:3])
          and report["bypass_equals_undefended"]
          and report["push_rollback"]["served_after_push"] == [pushed["version"]] * 4
          and report["push_rollback"]["served_after_rollback"] == [observed["version"]] * 4)
    report["ok"] = ok
    (args.out / "check.json").write_text(json.dumps(report, indent=2) + "\n")
    for phase in ("before", "after"):
        for name, f in report[phase].items():
            print(f"{phase:6s} {name:11s} CA {f['ca']:.3f} PA {f['pa']:.3f} ASR {f['asr']:.3f} {f.get('versions', '')}")
    print(f"check {'passed' if ok else 'FAILED'} in {report['elapsed_s']:.0f} s on {report['machine'].get('gpu')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
