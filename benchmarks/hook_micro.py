"""What the in-process repair costs a stage, without Triton: CPU time of one ``execute`` per batch.

Drives the real stage classes in this process through the test double of ``triton_python_backend_utils``
(tests/unit/pb_double.py), so the difference between a repairing stage and its undefended twin is our own work
per batch (the plan check, the repair hooks, three more small outputs, request parameters), not IPC. CPU time of
this process (``time.process_time``) rather than wall time, so other load on a shared machine disturbs it little;
interleaved, median of ``--rounds``.

    python benchmarks/hook_micro.py --repository bench-results/repository [--batches 1,16] [--rounds 7]
    python benchmarks/hook_micro.py --repository two-layers --versus one-layer   # what the second layer costs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "unit"), str(ROOT / "tests")]  # pb_double, test_stages and what they import

import pb_double as pb  # noqa: E402
from test_stages import stage_args  # noqa: E402

from fire_backend.repository.build import HEAD, stage_name  # noqa: E402
from fire_backend.repository.layout import ARTIFACTS_DIR, ServingSettings  # noqa: E402
from fire_backend.stub import stages  # noqa: E402
from fire_backend.wire.names import FIRE_ENSEMBLE, FIRE_INLINE, FIRE_MONOLITHIC, UNDEFENDED_ENSEMBLE  # noqa: E402

#: (repairing stage, its undefended twin) as a bench repository names them
PAIRS = {
    "fused vs monolithic": ((stages.FusedStage, FIRE_ENSEMBLE), (stages.MonolithicStage, FIRE_MONOLITHIC)),
    "inline head vs plain head": ((stages.InlineHeadStage, stage_name(FIRE_INLINE, HEAD)),
                                  (stages.HeadStage, stage_name(UNDEFENDED_ENSEMBLE, HEAD))),
}


def cpu_ms(stage, requests, reps: int) -> float:
    start = time.process_time()
    for _ in range(reps):
        stage.execute(requests)
    return (time.process_time() - start) / reps * 1000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, required=True,
                   help="a repository built by `fire bench` (or `fire repo build --baselines`: the fused pair only)")
    p.add_argument("--versus", type=Path, help="another repository of the same network (other repair layers): "
                                               "compare the two fused stages instead")
    p.add_argument("--batches", default="1,16", help="requests of one image per batch (1,16)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seconds", type=float, default=0.5, help="CPU seconds per measurement, about (0.5)")
    args = p.parse_args()
    torch.set_num_threads(1)
    settings = ServingSettings.read(args.repository / ARTIFACTS_DIR)
    print(f"{settings.arch}, repaired at {', '.join(settings.repair_layers)}; CPU ms per execute (median of "
          f"{args.rounds} interleaved rounds), one torch thread")
    pairs = {label: [(cls, args.repository, model) for cls, model in pair] for label, pair in PAIRS.items()}
    if args.versus:  # the same network repaired at other layers: what the layers themselves cost
        other = ServingSettings.read(args.versus / ARTIFACTS_DIR)
        pairs = {f"fused {'+'.join(settings.repair_layers)} vs {'+'.join(other.repair_layers)}": [
            (stages.FusedStage, args.repository, FIRE_ENSEMBLE), (stages.FusedStage, args.versus, FIRE_ENSEMBLE)]}
    for label, pair in pairs.items():
        missing = [model for _, repo, model in pair if not (repo / "models" / model).is_dir()]
        if missing:  # `fire repo build --baselines` writes the fused pair only
            print(f"  {label:26s} not measured: the repository has no {', '.join(missing)}")
            continue
        built = [cls(stage_args(repo, model), pb) for cls, repo, model in pair]
        for batch in (int(b) for b in args.batches.split(",")):
            x = np.random.default_rng(0).random((1, *settings.input_shape), dtype=np.float32)
            requests = [pb.image_request(x) for _ in range(batch)]
            reps = max(3, int(args.seconds / max(cpu_ms(built[1], requests, 3) / 1000, 1e-5)))
            times: list[list[float]] = [[], []]
            for _ in range(args.rounds):
                for i, stage in enumerate(built):
                    times[i].append(cpu_ms(stage, requests, reps))
            defended, plain = (statistics.median(t) for t in times)
            print(f"  {label:26s} batch {batch:3d}: {defended:8.3f} vs {plain:8.3f} ms: +{defended - plain:6.3f} ms "
                  f"({100 * (defended / plain - 1):+5.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
