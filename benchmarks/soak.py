"""Soak: steady mixed traffic against the FIRE ensemble while sampling the RSS of the server and stubs.

Checks that memory does not grow per request: after a warm-up, the total RSS of tritonserver and all
Python-backend stubs must stay within 5% of its first sample. Also pushes a direction every minute,
so version switches are part of the soak.

    python benchmarks/soak.py [--minutes 10] [--clients 8] [--repository REPO] [--json]
"""

from __future__ import annotations

import argparse
import json
import secrets
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from fire_backend.demo import demo_repository
from fire_backend.serving.artifacts import ARTIFACTS_DIR, ServingSettings
from fire_backend.serving.server import running_server
from fire_backend.wire.client import FireClient
from fire_backend.wire.control import ControlClient
from fire_backend.wire.token import pinned_token


def tree_rss(pid: int) -> int:
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)] if p.is_running())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the reference sample")
    parser.add_argument("--repository", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    repository = args.repository or demo_repository()
    settings = ServingSettings.read(repository / ARTIFACTS_DIR)
    token = secrets.token_urlsafe(16)
    rng = np.random.default_rng(0)
    images = rng.random((8, *settings.input_shape), dtype=np.float32)
    with running_server(repository, extra_env=pinned_token(token)) as server:
        stop = threading.Event()
        counts = [0] * args.clients
        failures = [0]

        def client_loop(k: int) -> None:
            with FireClient(server.urls["grpc"]) as client:
                while not stop.is_set():
                    try:
                        client.infer(images[: 1 + k % 8])
                        counts[k] += 1
                    except Exception:
                        failures[0] += 1

        threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        samples = []
        start = time.monotonic()
        next_push = start
        with ControlClient(server.urls["grpc"], token) as ctl:
            while time.monotonic() - start < args.minutes * 60:
                now = time.monotonic()
                if now >= next_push:
                    beta = rng.standard_normal(settings.latent_dim).astype(np.float32) * 0.01
                    ctl.push([{"beta": beta.tolist(), "name": "soak"}])
                    next_push = now + 60
                samples.append((now - start, tree_rss(server.pid), sum(counts)))
                print(f"t={now - start:6.0f}s  rss={samples[-1][1] / 2**20:8.1f} MiB  requests={sum(counts)}",
                      flush=True)
                time.sleep(30)
        stop.set()
        for t in threads:
            t.join()
    reference = next((s for s in samples if s[0] >= args.warmup), samples[0])
    last = samples[-1]
    growth = (last[1] - reference[1]) / reference[1]
    per_request = (last[1] - reference[1]) / max(1, last[2] - reference[2])
    verdict = "flat" if abs(growth) <= 0.05 else "GROWING"
    print(f"RSS after warm-up {reference[1] / 2**20:.1f} MiB -> end {last[1] / 2**20:.1f} MiB: {growth:+.2%} "
          f"over {last[2] - reference[2]} requests ({per_request:+.1f} bytes/request), "
          f"failures {failures[0]}: {verdict}")
    if args.json:
        print(json.dumps({"samples": samples, "growth": growth, "failures": failures[0], "verdict": verdict}))


if __name__ == "__main__":
    main()
