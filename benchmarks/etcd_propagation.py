"""Propagation: a push through one replica -> served by every replica, with the store on etcd or on a shared file
store, measured the way a client sees it (an answer whose DIRECTION_VERSION names the new version).

Starts a real etcd (Debian's etcd-server) and N real tritonservers on loopback, on the digits demo model (fused,
one instance per server), pushes a direction every ``--interval`` seconds through the replicas in turn, and prints
push -> acknowledged and push -> served percentiles per store, with the machine's load. ``--load K``: K closed-loop
clients per replica send 8-image requests meanwhile. The issue-18 target: push -> served on all three <= 100 ms p99.

    python benchmarks/etcd_propagation.py [--replicas 3] [--pushes 100] [--stores etcd file] [--load 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from fire_backend.demo import demo_repository
from fire_backend.launcher.server import running_server
from fire_backend.repository.build import RepositoryOptions, rebuild_repository
from fire_backend.repository.layout import ARTIFACTS_DIR, ServingSettings
from fire_backend.stores.backends import STORE_URL_ENV
from fire_backend.stores.etcd.local import LocalEtcd
from fire_backend.wire.client import FireClient
from fire_backend.wire.control import ControlClient
from fire_backend.wire.propagation import percentile, push_and_wait
from fire_backend.wire.token import pinned_token


def measure(repository: Path, store_url: str, replicas: int, pushes: int, interval: float, load: int) -> dict:
    settings = ServingSettings.read(repository / ARTIFACTS_DIR)
    image = np.zeros((1, *settings.input_shape), np.float32)
    batch = np.random.default_rng(0).random((8, *settings.input_shape), dtype=np.float32)
    beta = np.random.default_rng(1).standard_normal(settings.latent_dim)
    beta = (beta / np.linalg.norm(beta)).tolist()
    token = secrets.token_urlsafe(16)
    env = {**pinned_token(token), **({STORE_URL_ENV: store_url} if store_url else {})}
    stop = threading.Event()
    with ExitStack() as stack:
        servers = [stack.enter_context(running_server(repository, extra_env=env)) for _ in range(replicas)]
        clients = [FireClient(s.urls["grpc"], timeout_s=30) for s in servers]
        controls = [ControlClient(s.urls["grpc"], token, timeout_s=30) for s in servers]

        def background(url: str) -> None:
            with FireClient(url, timeout_s=30) as client:
                while not stop.is_set():
                    client.infer(batch)

        loaders = [threading.Thread(target=background, args=(s.urls["grpc"],), daemon=True)
                   for s in servers for _ in range(load)]
        for t in loaders:
            t.start()
        try:
            with ThreadPoolExecutor(replicas) as pool:
                push_and_wait(controls[0], [{"beta": beta, "name": "warm"}], clients, pool, image)
                runs = []
                for k in range(pushes):
                    directions = [{"beta": beta, "alpha": float(k % 2), "name": f"p{k}"}]
                    runs.append(push_and_wait(controls[k % replicas], directions, clients, pool, image))
                    time.sleep(interval)
        finally:
            stop.set()
            for t in loaders:
                t.join(30)
    served = [s for run in runs for s in run.served_s]
    acks = [run.ack_s for run in runs]
    after_ack = [s - run.ack_s for run in runs for s in run.served_s]
    ms = {f"served_p{q}_ms": round(1e3 * percentile(served, q), 1) for q in (50, 95, 99)}
    return {**ms, "ack_p50_ms": round(1e3 * percentile(acks, 50), 1),
            "after_ack_p99_ms": round(1e3 * percentile(after_ack, 99), 1), "samples": len(served)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--pushes", type=int, default=100)
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between pushes (0.05)")
    parser.add_argument("--load", type=int, default=0, help="closed-loop 8-image clients per replica (0)")
    parser.add_argument("--stores", nargs="+", choices=("etcd", "file"), default=["etcd", "file"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fire-propagation-") as tmp:
        results = {}
        for store in args.stores:
            # A fresh repository per store (one instance per server: three servers share 2 cores here).
            repository = Path(tmp) / f"repo-{store}"
            rebuild_repository(demo_repository(), repository, RepositoryOptions(model_instances=1))
            engine = None
            if store == "etcd":
                engine = LocalEtcd(Path(tmp) / "etcd" / "data")
                engine.start()
            try:
                url = engine.url("/fire/bench") if engine else ""
                results[store] = measure(repository, url, args.replicas, args.pushes, args.interval, args.load)
            finally:
                if engine:
                    engine.stop(kill=True)
        machine = {"cores": os.cpu_count(), "loadavg_1m_after": round(os.getloadavg()[0], 2),
                   "replicas": args.replicas, "pushes": args.pushes, "load_clients_per_replica": args.load}
    if args.json:
        print(json.dumps({"machine": machine, "results": results}, indent=2))
        return
    print(f"{args.replicas} replicas, {args.pushes} pushes {args.interval * 1e3:.0f} ms apart, {args.load} load "
          f"client(s) per replica, {machine['cores']} cores, load average after {machine['loadavg_1m_after']}")
    for store, r in results.items():
        print(f"  {store:5s} push -> served p50 {r['served_p50_ms']} / p95 {r['served_p95_ms']} / p99 "
              f"{r['served_p99_ms']} ms; push -> ack p50 {r['ack_p50_ms']} ms; ack -> served p99 "
              f"{r['after_ack_p99_ms']} ms ({r['samples']} samples)")
    if {"etcd", "file"} <= set(results):
        print(f"  etcd / file p99: {results['etcd']['served_p99_ms'] / results['file']['served_p99_ms']:.2f}")


if __name__ == "__main__":
    main()
