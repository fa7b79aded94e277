"""Locust load test for a FIRE Triton server, with live defense accuracy.

    locust -f loadtest/locustfile.py --host grpc://127.0.0.1:8001 \\
        --clean-npz clean.npz --poisoned-npz poisoned.npz --poison-ratio 0.2 --target 0 --batch 8
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 16 -r 16 -t 60s --csv out/run
    locust -f loadtest/locustfile.py --host grpc://127.0.0.1:8001 --processes 2 ...     # distributed, 2 workers
    locust -f loadtest/locustfile.py,loadtest/stepload.py --host ... --step-users 4 --step-time 10 --step-count 4

Traffic: every request carries ``--batch`` images, all clean (``--clean-npz``, default: the embedded digits test
images) or all poisoned (``--poisoned-npz``, whose ``y`` are the true labels), poisoned with probability
``--poison-ratio`` (default 0.2, an 80/20 mix). Images are the .npz files ``fire data export`` writes.

Protocol: ``--host grpc://H:P`` runs ``FireGrpcUser`` (tritonclient gRPC, made gevent-cooperative with
``grpc.experimental.gevent.init_gevent()``), ``--host http://H:P`` runs ``FireHttpUser`` (tritonclient HTTP,
geventhttpclient); a bare ``H:P`` is gRPC unless ``--protocol http``. Users run closed-loop (no wait).

Statistics: each call is one Locust entry named after the model (request type grpc/http); a request of n images
is also logged n times under ``MODEL/per-sample`` with response time / n, so that row shows per-sample latency
and its requests/s are samples/s.

Defense accuracy (from the responses and the known labels): CA on clean traffic, PA and ASR (prediction ==
``--target`` over samples whose true label is not the target) on poisoned traffic, and the flagged rate of each.
Shown in the web UI (tab "FIRE defense", JSON at /fire/defense), logged at the end, written with ``--csv PREFIX``
to ``PREFIX_defense.csv`` and appended to the ``--html`` report. Workers send their counters to the master with
every stats report, so the numbers are aggregated in distributed runs (``--processes`` or master + workers).
"""

from __future__ import annotations

if __name__ == "__main__":
    # `python loadtest/locustfile.py ARGS` == `locust -f loadtest/locustfile.py ARGS`, except that --help also lists
    # the FIRE options: Locust answers --help before it imports any locustfile (locust issue #2917).
    import importlib.util
    import sys

    from locust.main import main as _locust_main

    if {"-h", "--help"} & set(sys.argv[1:]):
        _spec = importlib.util.spec_from_file_location("locustfile", __file__)
        _module = sys.modules["locustfile"] = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_module)  # registers the options
    sys.argv = ["locust", "-f", __file__, *sys.argv[1:]]
    sys.exit(_locust_main())

import csv
import html
import io
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from locust import User, constant, events, task
from locust.runners import MasterRunner, WorkerRunner

from fire_backend.client import (
    DEFAULT_MODEL,
    FireClient,
    FireClientError,
    InferResult,
    init_grpc_gevent,
    load_digits,
    load_npz,
    parse_url,
)

LOGGER = logging.getLogger("fire.loadtest")
TRAFFIC_KINDS = ("clean", "poisoned")
COUNTERS = ("requests", "samples", "correct", "non_target", "target_hits", "flagged", "flag_known")
CSV_COLUMNS = ("traffic", "requests", "samples", "ca_or_pa", "asr", "flagged_rate", *COUNTERS[2:])
REPORT_KEY = "fire_defense"
PER_SAMPLE_SUFFIX = "/per-sample"


# --------------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------------


def _add(group, *flags, web: bool = True, **kwargs):
    # Argument groups bypass LocustArgumentParser.add_argument, which tags the actions the web UI shows.
    action = group.add_argument(*flags, **kwargs)
    action.include_in_web_ui, action.is_secret, action.is_required, action.is_multiple = web, False, False, False
    return action


@events.init_command_line_parser.add_listener
def _add_options(parser, **_kw) -> None:
    group = parser.add_argument_group("FIRE traffic mix")
    _add(group, "--clean-npz", default="", metavar="FILE",
         help="clean images (.npz from `fire data export`); default: the embedded digits test images")
    _add(group, "--poisoned-npz", default="", metavar="FILE",
         help="poisoned images (.npz from `fire data export --poisoned`); its y are the true labels")
    _add(group, "--poison-ratio", type=float, default=0.2, metavar="R",
         help="fraction of requests that carry poisoned images (0.2: an 80/20 clean/poisoned mix)")
    _add(group, "--batch", type=int, default=1, metavar="N", help="images per request (1; at most 64)")
    group = parser.add_argument_group("FIRE attack and model")
    _add(group, "--target", type=int, default=0, metavar="T", help="attack target label, for ASR (0)")
    _add(group, "--model", default=DEFAULT_MODEL, metavar="NAME",
         help="fire_ensemble | undefended_ensemble | fire_monolithic (fire_ensemble)")
    _add(group, "--bypass", action="store_true", default=False,
         help="send fire_bypass=true: fire_ensemble skips the repair (measures the bare attack)")
    group = parser.add_argument_group("FIRE protocol")
    _add(group, "--protocol", choices=["auto", "grpc", "http"], default="auto",
         help="auto (default): from the --host scheme, grpc://H:P or http://H:P; a bare H:P is gRPC")
    _add(group, "--request-timeout", type=float, default=30.0, metavar="S", help="seconds per request (30)")
    _add(group, "--latency-file", default="", metavar="FILE", web=False,
         help="write each request's start time, latency (ms) and image count to this CSV at the end (workers "
         "append .PID); `fire bench` uses it for exact percentiles")
    group = parser.add_argument_group("FIRE step load (locust -f loadtest/locustfile.py,loadtest/stepload.py)")
    _add(group, "--step-users", type=int, default=4, metavar="N", web=False, help="users added per step (4)")
    _add(group, "--step-time", type=float, default=10.0, metavar="S", web=False, help="seconds per step (10)")
    _add(group, "--step-count", type=int, default=4, metavar="K", web=False,
         help="steps; the test stops after the last (4)")


def _options(environment):
    options = environment.parsed_options
    if options is None:  # Locust used as a library without a parser: defaults
        from locust.argument_parser import get_parser

        options = get_parser().parse_args([])
        environment.parsed_options = options
    return options


# --------------------------------------------------------------------------------------------------
# defense counters
# --------------------------------------------------------------------------------------------------


class DefenseStats:
    """Counters per traffic kind; greenlet-safe (no yields inside), lock for the web/report threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = self._empty()

    @staticmethod
    def _empty() -> dict[str, dict[str, int]]:
        return {kind: dict.fromkeys(COUNTERS, 0) for kind in TRAFFIC_KINDS}

    def record(self, kind: str, y: np.ndarray, result: InferResult, target: int) -> None:
        pred = result.labels
        non_target = y != target
        with self._lock:
            c = self._counts[kind]
            c["requests"] += 1
            c["samples"] += len(y)
            c["correct"] += int((pred == y).sum())
            c["non_target"] += int(non_target.sum())
            c["target_hits"] += int(((pred == target) & non_target).sum())
            if result.flagged is not None:
                c["flag_known"] += len(y)
                c["flagged"] += int(result.flagged.sum())

    def merge(self, counts: dict | None) -> None:
        if not counts:
            return
        with self._lock:
            for kind, values in counts.items():
                if kind in self._counts:
                    for key in COUNTERS:
                        self._counts[kind][key] += int(values.get(key, 0))

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {kind: dict(values) for kind, values in self._counts.items()}

    def pop(self) -> dict[str, dict[str, int]]:
        """Counts since the last pop (a worker's delta for the master), resetting them."""
        with self._lock:
            counts, self._counts = self._counts, self._empty()
        return counts

    def reset(self) -> None:
        self.pop()

    def rows(self) -> list[dict]:
        """One row per traffic kind: ca_or_pa (CA on clean, PA on poisoned), asr, flagged_rate (None if n/a)."""
        rows = []
        for kind, c in self.snapshot().items():
            rows.append({
                "traffic": kind,
                "requests": c["requests"],
                "samples": c["samples"],
                "ca_or_pa": c["correct"] / c["samples"] if c["samples"] else None,
                "asr": c["target_hits"] / c["non_target"] if c["non_target"] else None,
                "flagged_rate": c["flagged"] / c["flag_known"] if c["flag_known"] else None,
                **{k: c[k] for k in COUNTERS[2:]},
            })
        return rows


DEFENSE = DefenseStats()


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def defense_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([_fmt(row[c]) for c in CSV_COLUMNS])
    return out.getvalue()


def defense_table(rows: list[dict]) -> str:
    lines = [f"{'traffic':10s} {'requests':>9s} {'samples':>9s} {'CA/PA':>7s} {'ASR':>7s} {'flagged':>8s}"]
    for r in rows:
        lines.append(f"{r['traffic']:10s} {r['requests']:9d} {r['samples']:9d} {_fmt(r['ca_or_pa']):>7s} "
                     f"{_fmt(r['asr']):>7s} {_fmt(r['flagged_rate']):>8s}")
    return "\n".join(lines)


def defense_html(rows: list[dict]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in CSV_COLUMNS[:6])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r[c]))}</td>" for c in CSV_COLUMNS[:6]) + "</tr>" for r in rows
    )
    return ('<section id="fire-defense" style="font-family:sans-serif;margin:2em">'
            "<h2>FIRE defense</h2><p>CA on clean traffic, PA and ASR on poisoned traffic, flagged rate of each.</p>"
            f'<table border="1" cellpadding="4" style="border-collapse:collapse"><tr>{head}</tr>{body}</table>'
            "</section>")


# --------------------------------------------------------------------------------------------------
# traffic
# --------------------------------------------------------------------------------------------------


@dataclass
class Pool:
    kind: str
    x: np.ndarray  # float32 NCHW in [0, 1]
    y: np.ndarray


class Traffic:
    """The clean and poisoned pools of one process, and the mix."""

    def __init__(self, clean: Pool | None, poisoned: Pool | None, ratio: float) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"--poison-ratio must be in [0, 1], got {ratio}")
        if clean is None and poisoned is None:
            raise ValueError("no images: pass --clean-npz and/or --poisoned-npz")
        if poisoned is None and ratio > 0:
            LOGGER.warning("no --poisoned-npz: sending clean traffic only (PA/ASR need poisoned images)")
            ratio = 0.0
        if clean is None and ratio < 1:
            LOGGER.warning("no clean images: sending poisoned traffic only")
            ratio = 1.0
        self.clean, self.poisoned, self.ratio = clean, poisoned, ratio

    def draw(self, rng: np.random.Generator, batch: int) -> tuple[str, np.ndarray, np.ndarray]:
        pool = self.poisoned if rng.random() < self.ratio else self.clean
        idx = rng.integers(0, len(pool.y), size=batch)
        return pool.kind, pool.x[idx], pool.y[idx]


def _pool(kind: str, path: str) -> Pool | None:
    if path:
        images = load_npz(path)
    elif kind == "clean":
        images = load_digits()
    else:
        return None
    if images.y is None:
        raise ValueError(f"{path}: no labels 'y' (needed for CA/PA/ASR); write it with `fire data export`")
    return Pool(kind, images.model_input(), images.y)


_TRAFFIC: dict[tuple, Traffic] = {}
_TRAFFIC_LOCK = threading.Lock()  # a gevent lock once Locust has monkey-patched threading


def traffic_for(options) -> Traffic:
    """This process's traffic for the options, loaded once (test_start preloads it before users spawn)."""
    key = (options.clean_npz, options.poisoned_npz, options.poison_ratio)
    with _TRAFFIC_LOCK:
        if key not in _TRAFFIC:
            _TRAFFIC[key] = Traffic(_pool("clean", options.clean_npz), _pool("poisoned", options.poisoned_npz),
                                    options.poison_ratio)
        return _TRAFFIC[key]


def _preload_digits() -> None:
    # The default clean pool. Its first load ever imports scikit-learn (seconds, then cached on disk); done at
    # import, before --processes forks and before a worker connects, it cannot stall a running event loop
    # (a worker that misses heartbeats for ~3 s is dropped by the master).
    try:
        load_digits()
    except Exception as exc:  # only a convenience default: the error resurfaces if the pool is actually used
        LOGGER.debug("digits preload failed: %s", exc)


_preload_digits()


_GRPC_GEVENT = {"done": False}


def _ensure_grpc_gevent() -> None:
    # Per process, before its first channel (after --processes forks): without it a gRPC call blocks the hub,
    # serializing all users and starving Locust's own greenlets (heartbeats, stats reports).
    if not _GRPC_GEVENT["done"]:
        init_grpc_gevent()
        _GRPC_GEVENT["done"] = True


def host_protocol(host: str | None, protocol: str = "auto") -> str:
    """Which protocol --host/--protocol select ('grpc' for a bare HOST:PORT)."""
    scheme, sep, _ = (host or "").partition("://")
    if sep and scheme.lower() in ("grpc", "http"):
        return scheme.lower()
    return "grpc" if protocol in ("auto", "", None) else protocol


_LATENCIES: list[tuple[float, float, int]] = []


# --------------------------------------------------------------------------------------------------
# users
# --------------------------------------------------------------------------------------------------


class FireUser(User):
    """Sends inference requests to one model, closed loop; subclasses fix the protocol."""

    abstract = True
    protocol = "grpc"
    wait_time = constant(0)

    def on_start(self) -> None:
        options = _options(self.environment)
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


# --------------------------------------------------------------------------------------------------
# wiring: protocol choice, distributed aggregation, web UI, CSV and HTML report
# --------------------------------------------------------------------------------------------------

_STATE: dict = {"environment": None}


@events.init.add_listener
def _on_init(environment, web_ui=None, **_kw) -> None:
    _STATE["environment"] = environment
    options = _options(environment)
    runner = environment.runner
    user_classes = environment.user_classes
    if not isinstance(runner, WorkerRunner) and {FireGrpcUser, FireHttpUser} <= set(user_classes):
        # Both users available and none picked on the command line: the host scheme (or --protocol) decides.
        # Only master/local filter: the master dispatches users by class name, workers keep both.
        protocol = host_protocol(environment.host, options.protocol)
        if options.protocol not in ("auto", protocol):
            LOGGER.warning("--host %s is %s: ignoring --protocol %s", environment.host, protocol, options.protocol)
        wanted = FireGrpcUser if protocol == "grpc" else FireHttpUser
        user_classes[:] = [u for u in user_classes if u in (wanted,) or not issubclass(u, FireUser)]
    if isinstance(runner, WorkerRunner):
        environment.events.report_to_master.add_listener(_report_to_master)
    if isinstance(runner, MasterRunner):
        environment.events.worker_report.add_listener(_worker_report)
    if web_ui is not None:
        _extend_web_ui(environment, web_ui)
    _extend_html_report()


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
            traffic_for(_options(environment))
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
    options = _options(environment)
    if options.latency_file and _LATENCIES:
        path = Path(options.latency_file)
        if isinstance(environment.runner, WorkerRunner):
            path = path.with_name(f"{path.name}.{os.getpid()}")
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["start_time", "latency_ms", "samples"])
            writer.writerows((f"{s:.6f}", f"{ms:.4f}", n) for s, ms, n in _LATENCIES)
    if isinstance(environment.runner, WorkerRunner):
        return
    rows = DEFENSE.rows()
    LOGGER.info("FIRE defense (model %s%s):\n%s", options.model, ", bypass" if options.bypass else "",
                defense_table(rows))
    prefix = getattr(options, "csv_prefix", None)
    if prefix:
        path = Path(f"{prefix}_defense.csv")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(defense_csv(rows))


def _extend_web_ui(environment, web_ui) -> None:
    from flask import Response, jsonify, request

    key = "fire-defense"
    structure = [{"key": "traffic", "title": "Traffic"}, {"key": "requests", "title": "Requests"},
                 {"key": "samples", "title": "Samples"}, {"key": "ca_or_pa", "title": "CA (clean) / PA (poisoned)"},
                 {"key": "asr", "title": "ASR"}, {"key": "flagged_rate", "title": "Flagged rate"}]
    web_ui.template_args["extended_tabs"] = [{"title": "FIRE defense", "key": key}]
    web_ui.template_args["extended_tables"] = [{"key": key, "structure": structure}]
    web_ui.template_args["extended_csv_files"] = [{"href": "./fire/defense/csv", "title": "Download FIRE defense CSV"}]

    @web_ui.app.route("/fire/defense")
    def fire_defense_json():
        return jsonify({"rows": DEFENSE.rows(), "counts": DEFENSE.snapshot()})

    @web_ui.app.route("/fire/defense/csv")
    def fire_defense_csv():
        return Response(defense_csv(DEFENSE.rows()), mimetype="text/csv",
                        headers={"Content-Disposition": "attachment;filename=fire_defense.csv"})

    @web_ui.app.after_request
    def add_defense_to_stats(response):
        if not request.path.endswith("/stats/requests") or response.status_code != 200:
            return response
        try:
            payload = json.loads(response.get_data())
        except ValueError:
            return response
        rows = [{k: _fmt(v) for k, v in row.items()} for row in DEFENSE.rows()]
        payload["extended_stats"] = [{"key": key, "data": rows}]
        response.set_data(json.dumps(payload))
        return response


def _extend_html_report() -> None:
    """Append the defense table to the --html report and the web UI's report download (once per process)."""
    import locust.main
    import locust.web

    for module in (locust.main, locust.web):
        original = getattr(module, "get_html_report", None)
        if original is None or getattr(original, "_fire_defense", False):
            continue

        def with_defense(*args, _original=original, **kwargs):
            report = _original(*args, **kwargs)
            table = defense_html(DEFENSE.rows())
            return report.replace("</body>", table + "</body>", 1) if "</body>" in report else report + table

        with_defense._fire_defense = True
        module.get_html_report = with_defense
