"""File-store push cost against the history's length: is a push after 1,000 versions as cheap as one of the first 10?

Drives the control logic in-process (:class:`fire_backend.stub.controller.Controller`, as the control stage runs
it: credential, nonce record, live version, validation, commit) on a file store in a temporary directory, with a
latent of ``--dim`` values and no network (the clean-image guard, a constant cost per push, is left out: this
measures what grows with the store). The issue-25 target: push p50 after 1,000 versions within 1.5x of the first 10
(it was 43 ms -> 182 ms, through a server, when every push read the whole history several times).

    python benchmarks/store_push.py [--versions 1000] [--dim 2048] [--retain 100] [--json]
    PYTHONPATH=../main python benchmarks/store_push.py          # the same on another tree (before/after)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fire_backend.repository.layout import STORE_DIR, Limits, ServingSettings, save_centroid
from fire_backend.stores.files import DirectionStore
from fire_backend.stub.controller import Controller
from fire_backend.wire.auth import CONTROL, digest, sign

TOKEN = "benchmark-token"


def measure(versions: int, dim: int, retain: int, window: int = 10) -> dict:
    with tempfile.TemporaryDirectory(prefix="fire-store-push-") as tmp:
        artifacts = Path(tmp)
        # retain_versions is left out on a tree that predates it (a before/after run: PYTHONPATH=OLD_TREE)
        extra = {"retain_versions": retain} if "retain_versions" in ServingSettings.__dataclass_fields__ else {}
        ServingSettings(layer="block", input_shape=(1, 1, dim), latent_shape=(dim,), num_classes=10, arch="bench",
                        limits=Limits(), **extra).write(artifacts)
        save_centroid(artifacts, np.zeros(dim, np.float32), 100)
        DirectionStore(artifacts / STORE_DIR).initialize()
        controller = Controller(artifacts, TOKEN, lambda batch: torch.flatten(batch, 1))
        rng = np.random.default_rng(0)
        took = []
        for i in range(versions):
            beta = rng.standard_normal(dim).astype(np.float32)
            raw = json.dumps({"action": "push", "directions": [{"beta": beta.tolist(), "name": f"b{i}"}]}).encode()
            credential = sign(TOKEN, CONTROL, digest(raw, b""))
            start = time.perf_counter()
            answer = controller.handle(raw, credential, None)
            took.append((time.perf_counter() - start) * 1000.0)
            assert answer["version"] == i + 1
        root = artifacts / STORE_DIR
        files = list((root / "versions").glob("*.fire"))
        first, last = statistics.median(took[:window]), statistics.median(took[-window:])
        return {"versions": versions, "dim": dim, "retain": retain, "first_p50_ms": round(first, 2),
                "last_p50_ms": round(last, 2), "ratio": round(last / first, 3),
                "overall_p50_ms": round(statistics.median(took), 2),
                "version_files": len(files), "store_kib": sum(p.stat().st_size for p in root.rglob("*")
                                                               if p.is_file()) // 1024,
                "history_kib": (root / "history.jsonl").stat().st_size // 1024, "load": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", type=int, default=1000, help="pushes to make (1000)")
    parser.add_argument("--dim", type=int, default=2048, help="latent values per direction (2048)")
    parser.add_argument("--retain", type=int, default=100, help="versions whose files the store keeps (100)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    before = os.getloadavg()
    result = measure(args.versions, args.dim, args.retain)
    result["load_before"] = before
    if args.json:
        print(json.dumps(result))
        return
    print(f"load average before {before[0]:.2f}, after {result['load'][0]:.2f} (1 min)")
    print(f"{args.versions} pushes, {args.dim} values per direction, retain {args.retain}:")
    print(f"  push p50, first 10: {result['first_p50_ms']:.2f} ms; last 10: {result['last_p50_ms']:.2f} ms; "
          f"ratio {result['ratio']:.2f} (target <= 1.5)")
    print(f"  store: {result['version_files']} version files, {result['store_kib']} KiB "
          f"(history {result['history_kib']} KiB)")


if __name__ == "__main__":
    main()
