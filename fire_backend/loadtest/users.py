"""Locust users for a FIRE server, and the event wiring that puts defense accuracy next to latency.

Traffic: every request carries ``--batch`` images, all clean (``--clean-npz``, default: the embedded digits test
images) or all poisoned (``--poisoned-npz``, whose ``y`` are the true labels), poisoned with probability
``--poison-ratio`` (default 0.2, an 80/20 mix).

Protocol: ``--host grpc://H:P`` runs ``FireGrpcUser`` (tritonclient gRPC, made gevent-cooperative),
``--host http://H:P`` runs ``FireHttpUser`` (tritonclient HTTP over geventhttpclient); a bare ``H:P`` is gRPC
unless ``--protocol http``. Users run closed loop (no wait).

Statistics: each call is one Locust entry named after the model; a request of n images is also logged n times
under ``MODEL/per-sample`` with response time / n, so that row shows per-sample latency and its requests/s are
samples/s. Defense accuracy: see ``fire_backend.loadtest.defense``.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from pathlib import Path

import numpy as np
from locust import User, constant, events, task
from locust.runners import MasterRunner, WorkerRunner

from fire_backend.loadtest import PER_SAMPLE_SUFFIX
from fire_backend.loadtest.defense import (
    DEFENSE_CSV_SUFFIX,
    REPORT_KEY,
    DefenseStats,
    defense_csv,
    defense_table,
    extend_html_report,
    extend_web_ui,
)
from fire_backend.loadtest.options import add_options, parsed_options
from fire_backend.loadtest.traffic import host_protocol, traffic_for
from fire_backend.wire.client import FireClient, init_grpc_gevent
from fire_backend.wire.endpoints import parse_url
from fire_backend.wire.errors import FireClientError
from fire_backend.wire.images import load_digits

LOGGER = logging.getLogger("fire.loadtest")

DEFENSE = DefenseStats()
#: (start time, latency ms, images) per request, for --latency-file
_LATENCIES: list[tuple[float, float, int]] = []
_STATE: dict = {"environment": None, "grpc_gevent": False}

events.init_command_line_parser.add_listener(add_options)


def _preload_digits() -> None:
    # The default clean pool. Its first load ever imports scikit-learn (seconds, then cached on disk); done at
    # import, before --processes forks and before a worker connects, it cannot stall a running event loop
    # (a worker that misses heartbeats for ~3 s is dropped by the master).
    try:
        load_digits()
    except Exception as exc:  # only a convenience default: the error resurfaces if the pool is actually used
        LOGGER.debug("digits preload failed: %s", exc)


_preload_digits()


def _ensure_grpc_gevent() -> None:
    # Per process, before its first channel (after --processes forks): without it a gRPC call blocks the hub,
    # serializing all users and starving Locust's own greenlets (heartbeats, stats reports).
    if not _STATE["grpc_gevent"]:
        init_grpc_gevent()
        _STATE["grpc_gevent"] = True


class FireUser(User):
    """Sends inference requests to one model, closed loop; subclasses fix the protocol."""

    abstract = True
    protocol = "grpc"
    wait_time = constant(0)

    def on_start(self) -> None:
        options = parsed_options(self.environment)
        if options.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {options.batch}")
        endpoint = parse_url(self.host or "127.0.0.1", self.protocol)
        if self.protocol == "grpc":
            _ensure_grpc_gevent()
        self.model, self.batch, self.bypass = options.model, options.batch, bool(options.bypass)
        self.target = int(options.target)
        self.traffic = traffic_for(options)
        self.rng = np.random.default_rng()
        self.record_latency = bool(options.latency_file)
        self.client = FireClient(endpoint.url, timeout_s=options.request_timeout)
        self.client.model_info(self.model)  # config lookup outside the timed calls; fails fast on a bad model

    def on_stop(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()

    @task
    def infer(self) -> None:
        kind, x, y = self.traffic.draw(self.rng, self.batch)
        n = len(y)
        start_time = time.time()
        t0 = time.perf_counter()
        result, error = None, None
        try:
            result = self.client.infer(x, self.model, self.bypass)
        except FireClientError as exc:
            error = exc
        elapsed_ms = (time.perf_counter() - t0) * 1000.0
        fire = self.environment.events.request.fire
        url = self.client.url
        context = {"traffic": kind, "samples": n}
        fire(request_type=self.protocol, name=self.model, response_time=elapsed_ms, response_length=n,
             response=result, context=context, exception=error, start_time=start_time, url=url)
        per_sample = elapsed_ms / n
        for _ in range(n):
            fire(request_type=self.protocol, name=self.model + PER_SAMPLE_SUFFIX, response_time=per_sample,
                 response_length=1, response=None, context=context, exception=error, start_time=start_time,
                 url=url)
        if result is not None:
            DEFENSE.record(kind, y, result, self.target)
            if self.record_latency:
                _LATENCIES.append((start_time, elapsed_ms, n))


class FireGrpcUser(FireUser):
    """tritonclient gRPC under gevent (grpc.experimental.gevent)."""

    protocol = "grpc"


class FireHttpUser(FireUser):
    """tritonclient HTTP (geventhttpclient)."""

    protocol = "http"


@events.init.add_listener
def _on_init(environment, web_ui=None, **_kw) -> None:
    _STATE["environment"] = environment
    options = parsed_options(environment)
    runner = environment.runner
    user_classes = environment.user_classes
    if not isinstance(runner, WorkerRunner) and {FireGrpcUser, FireHttpUser} <= set(user_classes):
        # Both users available and none picked on the command line: the host scheme (or --protocol) decides.
        # Only master/local filter: the master dispatches users by class name, workers keep both.
        protocol = host_protocol(environment.host, options.protocol)
        if options.protocol not in ("auto", protocol):
            LOGGER.warning("--host %s is %s: ignoring --protocol %s", environment.host, protocol, options.protocol)
        wanted = FireGrpcUser if protocol == "grpc" else FireHttpUser
        user_classes[:] = [u for u in user_classes if u is wanted or not issubclass(u, FireUser)]
    if isinstance(runner, WorkerRunner):
        environment.events.report_to_master.add_listener(_report_to_master)
    if isinstance(runner, MasterRunner):
        environment.events.worker_report.add_listener(_worker_report)
    if web_ui is not None:
        extend_web_ui(web_ui, DEFENSE)
    extend_html_report(DEFENSE)


def _report_to_master(client_id, data, **_kw) -> None:
    data[REPORT_KEY] = DEFENSE.pop()


def _worker_report(client_id, data, **_kw) -> None:
    DEFENSE.merge(data.get(REPORT_KEY))


@events.test_start.add_listener
def _on_test_start(environment, **_kw) -> None:
    DEFENSE.reset()
    _LATENCIES.clear()
    if not isinstance(environment.runner, MasterRunner):
        # Load the images before users spawn (workers have the master's options by now): loading the embedded
        # digits imports scikit-learn, seconds that would otherwise stall the first users mid-test.
        try:
            traffic_for(parsed_options(environment))
        except (OSError, ValueError) as exc:
            LOGGER.error("cannot load the traffic images: %s", exc)


@events.reset_stats.add_listener
def _on_reset_stats(**_kw) -> None:
    DEFENSE.reset()


@events.quit.add_listener
def _on_quit(**_kw) -> None:
    # After runner.quit(): the workers' final reports are in (as for Locust's own final stats).
    environment = _STATE["environment"]
    if environment is None:
        return
    options = parsed_options(environment)
    if options.latency_file and _LATENCIES:
        _write_latencies(Path(options.latency_file), isinstance(environment.runner, WorkerRunner))
    if isinstance(environment.runner, WorkerRunner):
        return
    rows = DEFENSE.rows()
    LOGGER.info("FIRE defense (model %s%s):\n%s", options.model, ", bypass" if options.bypass else "",
                defense_table(rows))
    prefix = getattr(options, "csv_prefix", None)
    if prefix:
        path = Path(f"{prefix}{DEFENSE_CSV_SUFFIX}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(defense_csv(rows))


def _write_latencies(path: Path, worker: bool) -> None:
    if worker:  # several processes share the option: one file each
        path = path.with_name(f"{path.name}.{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["start_time", "latency_ms", "samples"])
        writer.writerows((f"{s:.6f}", f"{ms:.4f}", n) for s, ms, n in _LATENCIES)
