"""Reproduce what brought Triton 2.51 down under load (issue 24; docs/limits.md), with and without the project's
mitigations, on the real tritonserver, beside busy processes:

* ``stall``: a stub stopped (SIGSTOP) for ``--seconds`` under traffic, on a tiny 2-instance echo model whose every
  answer is checked against its request. ``--without-keeper`` turns the stub health keeper off
  (serving/stub_health.py): the server then aborts with ``lock_exception`` and answers some requests with others'
  answers.
* ``metrics-reload``: the same echo model reloaded ``--rounds`` times under traffic, each instance keeping one custom
  counter labelled by model and instance (``--metrics none|deleted|kept``: no metric; deleted at finalize, as the
  Python backend's examples do; kept for the process's life, as stub/metrics.py does).
* ``reload``: this project's digits repository, ``--model`` reloaded ``--rounds`` times under traffic.

    python benchmarks/triton_faults.py stall --seconds 10 [--without-keeper] [--hogs 2]
    python benchmarks/triton_faults.py metrics-reload --metrics deleted --rounds 20
    python benchmarks/triton_faults.py reload --model fire_ensemble --rounds 10
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import tritonclient.grpc as grpcclient

from fire_backend.demo import demo_checkpoint
from fire_backend.launcher.server import TritonServer, running_server
from fire_backend.launcher.stub_health import stub_args
from fire_backend.procfs import child_processes
from fire_backend.repository.build import build_repository
from fire_backend.wire.names import FIRE_ENSEMBLE, IMAGE, LABEL

ECHO_CONFIG = ('backend: "python" max_batch_size: 8 instance_group [ { kind: KIND_CPU count: 2 } ]\n'
               'input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
               'output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] } ]\n')
ECHO_MODEL = '''\
import atexit
import os

import triton_python_backend_utils as pb_utils

METRICS = {metrics!r}
KEPT = []


class TritonPythonModel:
    def initialize(self, args):
        self.counter = None
        if METRICS != "none":
            family = pb_utils.MetricFamily(name="echo_requests_total", description="requests",
                                           kind=pb_utils.MetricFamily.COUNTER)
            self.family = family
            self.counter = family.Metric(labels={{"model": args["model_name"],
                                                  "model_instance": args["model_instance_name"]}})
            if METRICS == "kept":
                KEPT.append((family, self.counter))
                atexit.register(os._exit, 0)

    def execute(self, requests):
        out = [pb_utils.InferenceResponse([pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X")
                                                           .as_numpy())]) for r in requests]
        if self.counter is not None:
            self.counter.increment(len(requests))
        return out

    def finalize(self):
        self.counter = self.family = None
'''
ABORTS = ("lock_exception", "malloc", "free()", "corrupted", "Signal (")


def echo_repository(root: Path, metrics: str = "none") -> Path:
    version = root / "models" / "echo" / "1"
    version.mkdir(parents=True)
    (version.parent / "config.pbtxt").write_text(ECHO_CONFIG)
    (version / "model.py").write_text(ECHO_MODEL.format(metrics=metrics))
    return root


class Traffic:
    """``clients`` threads sending requests until stopped; each outcome recorded as ok, failed or WRONG."""

    def __init__(self, server: TritonServer, clients: int, request: Callable[[grpcclient.InferenceServerClient, int],
                                                                            bool]) -> None:
        self.outcomes: list[tuple[float, float, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(server, k, request)) for k in range(clients)]

    def _loop(self, server: TritonServer, k: int, request) -> None:
        with grpcclient.InferenceServerClient(server.urls["grpc"]) as client:
            n = 0
            while not self._stop.is_set() and server.is_alive():
                n += 1
                began = time.monotonic()
                try:
                    outcome = "ok" if request(client, k * 1_000_000 + n) else "WRONG"
                except Exception:
                    outcome = "failed"
                self.outcomes.append((began, time.monotonic(), outcome))

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def counts(self, after: float = 0.0) -> Counter:
        return Counter(outcome for began, _, outcome in self.outcomes if began >= after)


def echo_request(client: grpcclient.InferenceServerClient, n: int) -> bool:
    x = np.array([[n, n % 7, 0.5, 2.0]], np.float32)
    tensor = grpcclient.InferInput("X", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return np.array_equal(client.infer("echo", [tensor], client_timeout=60).as_numpy("Y"), x)


def verdict(server: TritonServer, offset: int) -> str:
    with open(server.log_path, "rb") as log:
        log.seek(offset)
        text = log.read().decode(errors="replace")
    aborts = {marker: text.count(marker) for marker in ABORTS if marker in text}
    state = "up" if server.is_alive() else f"DOWN (exit {server.returncode})"
    return f"server {state}; aborts in the log: {aborts or 0}"


def stall(args: argparse.Namespace, work: Path) -> None:
    with running_server(echo_repository(work / "echo"), keep_stubs_healthy=not args.without_keeper) as server, \
            Traffic(server, 4, echo_request) as traffic:
        time.sleep(3)
        victim = next(s for s in map(stub_args, child_processes(server.pid)) if s and s.instance == "echo_0_0")
        os.kill(victim.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        time.sleep(args.seconds)
        os.kill(victim.pid, signal.SIGCONT)
        resumed = time.monotonic()
        time.sleep(5)
        longest = max((ended - began for began, ended, _ in traffic.outcomes), default=0.0)
        print(f"stub {victim.instance} stopped {args.seconds:g} s (keeper {'off' if args.without_keeper else 'on'}, "
              f"load {os.getloadavg()[0]:.1f}): {verdict(server, 0)}")
        print(f"  requests while stopped: {dict(traffic.counts(stopped) - traffic.counts(resumed))}; after: "
              f"{dict(traffic.counts(resumed + 1))}; all: {dict(traffic.counts())}; longest {longest:.1f} s")


def reloads(server: TritonServer, traffic: Traffic, model: str, version_dir: Path, rounds: int) -> None:
    for round_ in range(rounds):
        time.sleep(3)
        offset = server.log_path.stat().st_size
        os.utime(version_dir)
        began = time.monotonic()
        while server.is_alive() and time.monotonic() - began < 90:
            with open(server.log_path, "rb") as log:
                log.seek(offset)
                if f"successfully unloaded '{model}'".encode() in log.read():
                    break
            time.sleep(0.2)
        took = time.monotonic() - began
        done = server.is_alive() and took < 90
        print(f"  reload {round_ + 1}: {'done' if done else 'NOT DONE'} in {took:.1f} s; {dict(traffic.counts())}; "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        if not done:
            break


def metrics_reload(args: argparse.Namespace, work: Path) -> None:
    repository = echo_repository(work / "echo", args.metrics)
    with running_server(repository) as server, Traffic(server, 4, echo_request) as traffic:
        reloads(server, traffic, "echo", repository / "models" / "echo" / "1", args.rounds)
        print(f"metrics {args.metrics}: {verdict(server, 0)}; {dict(traffic.counts())}")


def project_reload(args: argparse.Namespace, work: Path) -> None:
    repository = work / "repository"
    build_repository(demo_checkpoint(), repository, flagged=20)
    images = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)

    def infer(client: grpcclient.InferenceServerClient, _: int) -> bool:
        tensor = grpcclient.InferInput(IMAGE, list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        return client.infer(FIRE_ENSEMBLE, [tensor], client_timeout=60).as_numpy(LABEL).shape[0] == 4

    with running_server(repository) as server, Traffic(server, 3, infer) as traffic:
        reloads(server, traffic, args.model, repository / "models" / args.model / "1", args.rounds)
        print(f"{args.model}: {verdict(server, 0)}; {dict(traffic.counts())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="fault", required=True)
    p = sub.add_parser("stall", help="a stub stopped under traffic")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--without-keeper", action="store_true", help="turn the stub health keeper off")
    p = sub.add_parser("metrics-reload", help="a model with custom metrics reloaded under traffic")
    p.add_argument("--metrics", choices=["none", "deleted", "kept"], default="deleted")
    p.add_argument("--rounds", type=int, default=20)
    p = sub.add_parser("reload", help="a model of the digits repository reloaded under traffic")
    p.add_argument("--model", default=FIRE_ENSEMBLE)
    p.add_argument("--rounds", type=int, default=10)
    for p in sub.choices.values():
        p.add_argument("--hogs", type=int, default=2, help="busy processes beside the server (2)")
    args = parser.parse_args()
    hogs = [psutil.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
    try:
        with tempfile.TemporaryDirectory(prefix="fire-faults-") as work:
            {"stall": stall, "metrics-reload": metrics_reload, "reload": project_reload}[args.fault](args, Path(work))
    finally:
        for hog in hogs:
            hog.kill()


if __name__ == "__main__":
    main()
