"""Soak: steady mixed traffic against the FIRE ensemble, beside busy processes, with control pushes and large
observes spread over the run, under `fire serve`'s supervisor. Counts what must not happen:

* model loads after the start (tritonserver's log: every "loading:" line past the start) and the supervisor's
  reloads and restarts (its events): issue 24's target is 0 of each;
* tritonserver aborts (lock_exception, heap corruption, segfaults) in the log;
* memory growth per request: after a warm-up, the total RSS of tritonserver and its stubs stays within 5% of its
  first sample.

A large observe is one larger than a control request may carry (``MAX_CONTROL_REQUEST_BYTES``): 20,000 flagged
digits images (1.2 MiB), which the control client sends in requests within the bound. The repository is a one-layer
one (a several-layer repository keeps at most 256 flagged images in all, so it has no large observe to make).

    python benchmarks/soak.py [--minutes 10] [--pushes 100] [--observes 20] [--hogs 2] [--clients 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil

from fire_backend.data import load_dataset, resolve_attack, to_uint8
from fire_backend.data.reserve import flagged_samples
from fire_backend.demo import demo_checkpoint
from fire_backend.launcher.ports import free_ports
from fire_backend.launcher.server import ServerConfig, TritonServer
from fire_backend.launcher.supervisor import Supervisor
from fire_backend.repository.build import build_repository
from fire_backend.repository.layout import ARTIFACTS_DIR, ServingSettings
from fire_backend.wire.client import FireClient
from fire_backend.wire.control import ControlClient
from fire_backend.wire.names import MAX_CONTROL_REQUEST_BYTES
from fire_backend.wire.token import pinned_token

ABORTS = ("lock_exception", "malloc", "free()", "corrupted", "Signal (")


def tree_rss(pid: int) -> int:
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)] if p.is_running())


def one_layer_repository(work: Path) -> Path:
    repository = work / "repository"
    build_repository(demo_checkpoint(), repository, "block2", flagged=20)
    return repository


def large_observe_images() -> np.ndarray:
    data = load_dataset("digits")
    flagged = to_uint8(flagged_samples(data.x_test, data.y_test, resolve_attack("badnets"), 0, 20).poisoned)
    images = np.repeat(flagged, 1000, axis=0)
    assert images.nbytes > MAX_CONTROL_REQUEST_BYTES
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--pushes", type=int, default=100, help="control pushes, spread over the run")
    parser.add_argument("--observes", type=int, default=20, help="large observes, spread over the run")
    parser.add_argument("--hogs", type=int, default=2, help="busy processes beside the server (2: one per core)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the RSS reference sample")
    parser.add_argument("--repository", type=Path, default=None, help="a one-layer repository (default: built)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fire-soak-"))
    repository = args.repository or one_layer_repository(work)
    settings = ServingSettings.read(repository / ARTIFACTS_DIR)
    if len(settings.repair_layers) > 1:
        parser.error(f"{repository} repairs at several layers: pass a one-layer repository")
    token = secrets.token_urlsafe(16)
    rng = np.random.default_rng(0)
    images = rng.random((8, *settings.input_shape), dtype=np.float32)
    observed = large_observe_images()
    http, grpc, metrics = free_ports(3)
    events: list[str] = []
    supervisor = Supervisor(TritonServer(ServerConfig(repository, http_port=http, grpc_port=grpc,
                                                      metrics_port=metrics, extra_env=pinned_token(token))),
                            report=events.append)
    supervisor.start()
    server = supervisor.server
    log_start = server.log_path.stat().st_size
    stop_supervising = threading.Event()
    watcher = threading.Thread(target=supervisor.run, args=(stop_supervising,), daemon=True)
    watcher.start()
    hogs = [psutil.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
    stop = threading.Event()
    counts = [0] * args.clients
    failures: Counter = Counter()
    control_failures: list[str] = []

    def client_loop(k: int) -> None:
        with FireClient(server.urls["grpc"]) as client:
            while not stop.is_set():
                try:
                    client.infer(images[: 1 + k % 8])
                    counts[k] += 1
                except Exception as exc:  # counted, the soak goes on
                    failures[str(exc).splitlines()[0][:120]] += 1

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(args.clients)]
    for t in threads:
        t.start()
    duration = args.minutes * 60
    plan = sorted([(duration * (i + 0.5) / args.pushes, "push") for i in range(args.pushes)]
                  + [(duration * (i + 0.5) / args.observes, "observe") for i in range(args.observes)])
    samples = []
    done: Counter = Counter()
    observe_requests = 0
    start = time.monotonic()
    next_sample = start
    try:
        with ControlClient(server.urls["grpc"], token, timeout_s=120) as ctl:
            while time.monotonic() - start < duration or plan:  # a loaded machine may need longer for the plan
                now = time.monotonic()
                if now >= next_sample:
                    samples.append((now - start, tree_rss(server.pid), sum(counts), os.getloadavg()[0]))
                    print(f"t={now - start:6.0f}s  rss={samples[-1][1] / 2**20:8.1f} MiB  requests={sum(counts)}  "
                          f"pushes={done['push']}  observes={done['observe']}  load={samples[-1][3]:.1f}", flush=True)
                    next_sample = now + 30
                if plan and now - start >= plan[0][0]:
                    _, action = plan.pop(0)
                    try:
                        if action == "push":
                            beta = rng.standard_normal(settings.latent_dim).astype(np.float32) * 0.01
                            ctl.push([{"beta": beta.tolist(), "name": "soak"}])
                        else:
                            result = ctl.observe(observed, publish_every=len(observed), chunk=256)
                            observe_requests += result["requests"]
                        done[action] += 1
                    except Exception as exc:  # counted, the soak goes on
                        control_failures.append(f"{action}: {str(exc).splitlines()[0][:160]}")
                    continue
                time.sleep(0.2)
    finally:
        elapsed = time.monotonic() - start
        stop.set()
        for t in threads:
            t.join()
        for hog in hogs:
            hog.kill()
        stop_supervising.set()
        watcher.join(timeout=60)
        with open(server.log_path, "rb") as log:
            log.seek(log_start)
            since = log.read().decode(errors="replace")
        log_path = server.log_path
        supervisor.stop()
    loads = since.count("loading:")
    aborts = {marker: since.count(marker) for marker in ABORTS if marker in since}
    supervised = [e for e in events if "reloading" in e or "restart" in e]
    reference = next((s for s in samples if s[0] >= args.warmup), samples[0])
    last = samples[-1]
    growth = (last[1] - reference[1]) / reference[1]
    per_request = (last[1] - reference[1]) / max(1, last[2] - reference[2])
    load = [s[3] for s in samples]
    print(f"{elapsed / 60:.1f} min beside {args.hogs} busy processes (load {min(load):.1f}-{max(load):.1f}): "
          f"{sum(counts)} requests, {sum(failures.values())} failed; {done['push']} of {args.pushes} pushes, "
          f"{done['observe']} of {args.observes} large observes ({observed.nbytes / 2**20:.2f} MiB each, "
          f"{observe_requests} requests), {len(control_failures)} control failures")
    print(f"model loads after the start: {loads}; supervisor reloads/restarts: {len(supervised)}; aborts in the "
          f"log: {aborts or 0}; RSS {reference[1] / 2**20:.1f} -> {last[1] / 2**20:.1f} MiB ({growth:+.2%}, "
          f"{per_request:+.1f} bytes/request); log {log_path}")
    for line in control_failures[:5] + [f"{n} x {what}" for what, n in failures.most_common(5)] + supervised[:5]:
        print(f"  {line}")
    if args.json:
        print(json.dumps({"minutes": elapsed / 60, "hogs": args.hogs, "requests": sum(counts),
                          "failures": sum(failures.values()), "pushes": done["push"], "observes": done["observe"],
                          "observe_requests": observe_requests, "control_failures": control_failures,
                          "model_loads": loads, "supervisor_reloads_restarts": supervised, "aborts": aborts,
                          "rss_growth": growth, "load": [min(load), max(load)], "samples": samples}))


if __name__ == "__main__":
    main()
