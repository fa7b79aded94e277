"""Locust users for a FIRE server, and the event wiring that puts defense accuracy next to latency.

Traffic: every request carries ``--batch`` images, all clean (``--clean-npz``, default: the embedded digits test
images) or all poisoned (``--poisoned-npz``, whose ``y`` are the true labels), poisoned with probability
``--poison-ratio`` (default 0.2, an 80/20 mix).

Protocol: ``--host grpc://H:P`` runs ``FireGrpcUser`` (tritonclient gRPC, made gevent-cooperative),
``--host http://H:P`` runs ``FireHttpUser`` (tritonclient HTTP over geventhttpclient); a bare ``H:P`` is gRPC
unless ``--protocol http``. Users run closed loop (no wait). Each request asks for LABEL and FLAGGED only (what the
defense counters read), as an application asks for what it uses: the server builds no other output.

Statistics: each call is one Locust entry named after the model, so Locust's totals (the Aggregated row, the
header's RPS) count requests. Per-sample latency and samples/s are derived from that entry (``per_sample``) and
shown in their own tab, CSV and report section. Defense accuracy: see ``fire_backend.loadtest.defense``; where it
is shown: ``fire_backend.loadtest.webui`` and ``report``.
"""

from __future__ import annotations

import csv
import logging
import os
import signal
import time
from pathlib import Path

import gevent
import numpy as np
from locust import User, constant, events, task
from locust.runners import STATE_RUNNING, STATE_SPAWNING, MasterRunner, WorkerRunner

from fire_backend.loadtest import DEFENSE_CSV_SUFFIX, DEFENSE_HISTORY_CSV_SUFFIX, PER_SAMPLE_CSV_SUFFIX, report
from fire_backend.loadtest.defense import HISTORY_INTERVAL_S, DefenseStats
from fire_backend.loadtest.options import add_options, parsed_options
from fire_backend.loadtest.per_sample import per_sample_rows
from fire_backend.loadtest.traffic import host_protocol, traffic_for
from fire_backend.loadtest.webui import extend_html_report, extend_web_ui
from fire_backend.wire.client import FireClient, init_grpc_gevent
from fire_backend.wire.endpoints import parse_url
from fire_backend.wire.errors import FireClientError
from fire_backend.wire.images import load_digits
from fire_backend.wire.names import FLAGGED, LABEL

LOGGER = logging.getLogger("fire.loadtest")
#: key of the worker -> master report entry
REPORT_KEY = "fire_defense"
#: seconds a Locust process may spend shutting down (its time limit, SIGTERM, SIGINT) before it is ended anyway:
#: whatever the server does, no client call may keep it alive (one request's --request-timeout is 30 s)
SHUTDOWN_GRACE_S = 45.0

DEFENSE = DefenseStats()
#: the outputs a user asks for: what DEFENSE counts (the label, and the flag where the model has one), as an
#: application asks for what it uses; the server builds no others (fire bench compares layouts on this)
REQUESTED_OUTPUTS = (LABEL, FLAGGED)
#: (start time, latency ms, images) per request, for --latency-file
_LATENCIES: list[tuple[float, float, int]] = []
_STATE: dict = {"environment": None, "grpc_gevent": False, "final_per_sample": None}

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
        try:
            self.client.model_info(self.model)  # config lookup outside the timed calls; fails fast on a bad model
        except BaseException:
            # Closed here, in the event loop: a gRPC channel left to the garbage collector is closed from __del__
            # at some later point, where under gevent it can block the process for ever (it ignored SIGTERM).
            self.client.close()
            raise

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
            result = self.client.infer(x, self.model, self.bypass, outputs=REQUESTED_OUTPUTS)
        except FireClientError as exc:
            error = exc
        elapsed_ms = (time.perf_counter() - t0) * 1000.0
        self.environment.events.request.fire(
            request_type=self.protocol, name=self.model, response_time=elapsed_ms, response_length=n,
            response=result, context={"traffic": kind, "samples": n}, exception=error, start_time=start_time,
            url=self.client.url)
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
    if not isinstance(runner, WorkerRunner):
        gevent.spawn(_record_history, runner)
    if web_ui is not None:
        extend_web_ui(web_ui, DEFENSE, _per_sample_rows)
    extend_html_report(DEFENSE, _per_sample_rows)
    _keep_per_sample_through_json()


def _per_sample_rows() -> list[dict]:
    environment = _STATE["environment"]
    if environment is None or environment.runner is None:
        return []
    return per_sample_rows(environment.runner.stats, parsed_options(environment).batch)


def _keep_per_sample_through_json() -> None:
    """Locust's --json/--json-file output serializes its entries the way a worker report does, which also resets
    them, right before the quit event: take the final per-sample rows just before (once per process)."""
    import locust.stats

    for name in ("save_stats_json", "print_stats_json"):
        original = getattr(locust.stats, name)
        if getattr(original, "_fire_per_sample", False):
            continue

        def keeping_per_sample(*args, _original=original, **kwargs):
            _STATE["final_per_sample"] = _per_sample_rows()
            return _original(*args, **kwargs)

        keeping_per_sample._fire_per_sample = True
        setattr(locust.stats, name, keeping_per_sample)


def _record_history(runner) -> None:
    # The over-time chart's points: the defense rows every HISTORY_INTERVAL_S while a test runs (on the master
    # or the only process; Locust keeps its own chart history the same way).
    while True:
        gevent.sleep(HISTORY_INTERVAL_S)
        if runner.state in (STATE_SPAWNING, STATE_RUNNING):
            DEFENSE.add_history_point()


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
    # The web UI's RESET (/stats/reset). On a master this is enough: workers ship only what they counted since
    # their last report, exactly as they do for Locust's own stats, so both restart from the same reports.
    DEFENSE.reset()


@events.spawning_complete.add_listener
def _on_spawning_complete(**_kw) -> None:
    # --reset-stats: Locust resets its stats once all users are running, without firing reset_stats.
    environment = _STATE["environment"]
    if environment is not None and environment.reset_stats:
        DEFENSE.reset()


@events.quitting.add_listener
def _arm_shutdown_watchdog(**_kw) -> None:
    """Locust is shutting down: end the process after SHUTDOWN_GRACE_S whatever still holds it. A gRPC channel
    closed by the garbage collector under gevent blocked a stopping Locust for ever, deaf to SIGTERM and SIGINT, in
    C code that keeps the interpreter lock, so no Python thread or handler can help: the kernel's default action
    for SIGALRM ends the process."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(int(SHUTDOWN_GRACE_S))


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
    DEFENSE.add_history_point()  # the final figures, after the workers' last reports
    rows = DEFENSE.rows()
    per_sample = _STATE["final_per_sample"] if _STATE["final_per_sample"] is not None else _per_sample_rows()
    LOGGER.info("FIRE defense (model %s%s):\n%s\nFIRE per-sample:\n%s", options.model,
                ", bypass" if options.bypass else "", report.to_text(report.DEFENSE, rows),
                report.to_text(report.PER_SAMPLE, per_sample))
    prefix = getattr(options, "csv_prefix", None)
    if prefix:
        files = {DEFENSE_CSV_SUFFIX: report.to_csv(report.DEFENSE, rows),
                 DEFENSE_HISTORY_CSV_SUFFIX: report.history_csv(DEFENSE.history()),
                 PER_SAMPLE_CSV_SUFFIX: report.to_csv(report.PER_SAMPLE, per_sample)}
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        for suffix, text in files.items():
            Path(f"{prefix}{suffix}").write_text(text)


def _write_latencies(path: Path, worker: bool) -> None:
    if worker:  # several processes share the option: one file each
        path = path.with_name(f"{path.name}.{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["start_time", "latency_ms", "samples"])
        writer.writerows((f"{s:.6f}", f"{ms:.4f}", n) for s, ms, n in _LATENCIES)
