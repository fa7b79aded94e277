"""FIRE's metrics module inside the real tritonserver: a throwaway Python model in a temporary repository uses
fire_backend.stub.metrics as a stage will, clients send a known mix, and the real /metrics is scraped.

The model stands in for a repair stage (scores arrive as its input; FLAGGED = score > 0.5) and, driven by request
parameters, for the rare events (a version applied, a control action, a store error, a new live version). Where
``prometheus`` is installed, a real Prometheus scrapes the server and evaluates every dashboard query and rule.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import observability
import pytest
import tritonclient.grpc as grpcclient
from observability import ALERTS, Exposition, alert_rules, dashboard_queries, load_dashboard, promql_metric_names

from fire_backend import metric_families as mf
from fire_backend.launcher.ports import free_port
from fire_backend.launcher.server import TritonServer, running_server
from fire_backend.repository.layout import models_dir
from fire_backend.stub import metrics as m
from fire_backend.wire.names import BYPASS_PARAMETER

pytestmark = pytest.mark.integration

MODEL = "metrics_probe"
FLUSH_S = 0.3
ACTIONS = ("status", "push")
CONFIG = f"""
name: "{MODEL}"
backend: "python"
max_batch_size: 8
dynamic_batching {{ max_queue_delay_microseconds: 5000 }}
input [ {{ name: "SCORES" data_type: TYPE_FP32 dims: [ -1 ] }} ]
output [ {{ name: "FLAGGED" data_type: TYPE_BOOL dims: [ -1 ] }} ]
instance_group [ {{ count: 2 kind: KIND_CPU }} ]
"""
MODEL_PY = f'''
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from fire_backend.stub.metrics import BatchMetrics, ControlMetrics, MetricsConfig


class TritonPythonModel:
    def initialize(self, args):
        config = MetricsConfig(flush_interval_s={FLUSH_S})
        name, instance = args["model_name"], args["model_instance_name"]
        self.live = 0
        self.batch = BatchMetrics(pb_utils, name, instance, layout="probe", config=config)
        self.batch.applied(1)
        self.control = ControlMetrics(pb_utils, name, instance, {ACTIONS!r}, store_view=lambda: (self.live, False),
                                      config=config)

    def execute(self, requests):
        responses, scores, flags, bypassed = [], [], [], 0
        for request in requests:
            params = json.loads(request.parameters() or "{{}}")
            score = pb_utils.get_input_tensor_by_name(request, "SCORES").as_numpy().reshape(-1)
            flagged = score > 0.5
            scores.append(score)
            flags.append(flagged)
            bypassed += bool(params.get("{BYPASS_PARAMETER}"))
            if "applied" in params:
                self.batch.applied(int(params["applied"]), float(params["committed_at"]))
            if "control" in params:
                self.control.control(params["control"], params["result"])
            if "store_error" in params:
                self.batch.store_error(params["store_error"])
            if "live" in params:
                self.live = int(params["live"])
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("FLAGGED", flagged[None, :])]))
        self.batch.record_batch(len(requests), np.concatenate(scores), np.concatenate(flags), bypassed)
        return responses

    def finalize(self):
        self.batch.close()
        self.control.close()
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    repository = tmp_path_factory.mktemp("metrics-probe") / "repository"
    model = models_dir(repository) / MODEL
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(CONFIG)
    (model / "1" / "model.py").write_text(MODEL_PY)
    with running_server(repository, startup_timeout_s=120) as running:
        yield running


def scrape(server: TritonServer) -> Exposition:
    return observability.scrape(server.urls["metrics"])


def wait_for(server: TritonServer, condition: Callable[[Exposition], bool], what: str,
             timeout_s: float = 15.0) -> Exposition:
    return observability.wait_for(server.urls["metrics"], condition, what, timeout_s)


def send(client: grpcclient.InferenceServerClient, scores: np.ndarray, **params: object) -> np.ndarray:
    tensor = grpcclient.InferInput("SCORES", [1, len(scores)], "FP32")
    tensor.set_data_from_numpy(scores.astype(np.float32)[None, :])
    result = client.infer(MODEL, [tensor], parameters=params or None)
    return result.as_numpy("FLAGGED").reshape(-1)


@pytest.fixture(scope="module")
def client(server: TritonServer) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(server.urls["grpc"]) as connection:
        yield connection


def test_every_series_is_there_from_the_start(server: TritonServer) -> None:
    page = wait_for(server, lambda p: p.total(mf.APPLIED_VERSION.name, model=MODEL) == 2, "the start-up version")
    for instance in ("metrics_probe_0_0", "metrics_probe_0_1"):
        assert page.one(mf.APPLIED_VERSION.name, model_instance=instance, layout="probe") == 1
        assert math.isnan(page.one(mf.APPLY_LAG_SECONDS.name, model_instance=instance))
        assert len(page.select(mf.SCORE_BUCKET.name, model_instance=instance)) == len(mf.SCORE_BUCKETS) + 1
    assert page.types[mf.SCORE_BUCKET.name] == "counter" and page.types[mf.SCORE_SUM.name] == "gauge"
    assert mf.exported_names() <= page.names()


def test_fire_counters_equal_what_the_clients_saw(server: TritonServer, client) -> None:
    before = scrape(server)
    rng = np.random.default_rng(17)
    mix = []
    for i in range(48):
        size = int(rng.integers(1, 4))
        triggered = i % 3 == 0
        scores = rng.normal(1.0 if triggered else 0.0, 0.2, size).astype(np.float32)
        mix.append((scores, i % 5 == 0))
    # Edge cases: exactly on bucket bounds (le is inclusive), far outside them, NaN.
    mix += [(np.array([0.5, 1.0, 0.0], np.float32), False), (np.array([-3.0, 9.0, np.nan], np.float32), True)]

    def one(item: tuple[np.ndarray, bool]) -> np.ndarray:
        scores, bypass = item
        return send(client, scores, **({BYPASS_PARAMETER: True} if bypass else {}))

    with ThreadPoolExecutor(6) as pool:  # concurrent clients: the dynamic batcher groups requests
        flagged = list(pool.map(one, mix))

    sent = np.concatenate([scores for scores, _ in mix]).astype(np.float64)
    seen = {"requests": len(mix), "samples": len(sent), "flagged": int(sum(f.sum() for f in flagged)),
            "bypassed": sum(bypass for _, bypass in mix)}

    def delta(page: Exposition, name: str, **labels: str) -> float:
        return page.total(name, model=MODEL, **labels) - before.total(name, model=MODEL, **labels)

    wait_for(server, lambda p: delta(p, mf.REQUESTS_TOTAL.name) >= seen["requests"], "the mix")
    time.sleep(2 * FLUSH_S)  # whatever else would arrive (it must not) has arrived
    page = scrape(server)
    got = {"requests": delta(page, mf.REQUESTS_TOTAL.name), "samples": delta(page, mf.SAMPLES_TOTAL.name),
           "flagged": delta(page, mf.FLAGGED_SAMPLES_TOTAL.name),
           "bypassed": delta(page, mf.BYPASSED_REQUESTS_TOTAL.name)}
    assert got == seen
    for bound in (*mf.SCORE_BUCKETS, math.inf):
        le = m.le_label(bound)
        expected = len(sent) if bound == math.inf else int(np.sum(sent <= bound))
        assert delta(page, mf.SCORE_BUCKET.name, le=le) == expected, le
    assert delta(page, mf.SCORE_COUNT.name) == len(sent)
    finite = sent[np.isfinite(sent)]
    assert delta(page, mf.SCORE_SUM.name) == pytest.approx(finite.sum(), abs=1e-3)


def test_versions_lag_control_actions_and_store_errors(server: TritonServer, client) -> None:
    before = scrape(server)
    committed = time.time() - 1.5
    send(client, np.array([0.1]), applied=5, committed_at=str(committed))
    send(client, np.array([0.1]), control="push", result=mf.RESULT_REFUSED_AUTH)
    send(client, np.array([0.1]), control="drop table", result=mf.RESULT_REFUSED_VALIDATION)
    send(client, np.array([0.1]), store_error=mf.STORE_CHECKSUM)
    send(client, np.array([0.1]), live=7)

    def grew(page: Exposition, name: str, **labels: str) -> float:
        return page.total(name, **labels) - before.total(name, **labels)

    page = wait_for(server, lambda p: 5 in {s.value for s in p.select(mf.APPLIED_VERSION.name, model=MODEL)}
                    and grew(p, mf.STORE_ERRORS_TOTAL.name, kind="checksum") == 1
                    and grew(p, mf.CONTROL_ACTIONS_TOTAL.name) == 2
                    and 7 in {s.value for s in p.select(mf.LIVE_VERSION.name, model=MODEL)}, "the events")
    moved = [s for s in page.select(mf.APPLIED_VERSION.name, model=MODEL) if s.value == 5]
    assert len(moved) == 1, "one instance applied version 5"
    lag = page.one(mf.APPLY_LAG_SECONDS.name, model_instance=moved[0].labels[mf.INSTANCE_LABEL])
    assert 1.5 <= lag < 1.5 + 10
    assert grew(page, mf.CONTROL_ACTIONS_TOTAL.name, action="push", result="refused_auth") == 1
    assert grew(page, mf.CONTROL_ACTIONS_TOTAL.name, action=mf.OTHER_ACTION, result="refused_validation") == 1
    assert not page.select(mf.CONTROL_ACTIONS_TOTAL.name, action="drop table")


def test_dashboard_and_alerts_query_only_metrics_this_server_exports(server: TritonServer, client) -> None:
    send(client, np.array([0.2, 0.9]))
    names = wait_for(server, lambda p: "nv_inference_request_success" in p.names(), "Triton's metrics").names()
    recorded = {rule["record"] for rule in alert_rules() if "record" in rule}
    queries = dashboard_queries(load_dashboard()) + [rule["expr"] for rule in alert_rules()]
    missing = {q: promql_metric_names(q) - names - recorded for q in queries}
    assert {q: sorted(n) for q, n in missing.items() if n} == {}


# -- a real Prometheus ------------------------------------------------------------------------------------------

PROMETHEUS = shutil.which("prometheus")


def prometheus_get(base: str, path: str, **query: str) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(query)}" if query else f"{base}{path}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (Debian: apt-get install prometheus)")
def test_prometheus_evaluates_every_dashboard_query_and_rule(server: TritonServer, client, tmp_path: Path) -> None:
    target = server.urls["metrics"].removeprefix("http://").removesuffix("/metrics")
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(ALERTS)],
              "scrape_configs": [{"job_name": "fire", "static_configs": [{"targets": [target]}]}]}
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            send(client, np.array([0.1, 0.7], np.float32))
            stop.wait(0.05)

    feeder = threading.Thread(target=traffic)
    feeder.start()
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:  # ready, and enough scrapes for rate() over the panels' window
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            try:
                up = prometheus_get(base, "/api/v1/query", query='sum_over_time(up{job="fire"}[1m]) >= 6')
                if up["data"]["result"]:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Prometheus did not scrape the server"
            time.sleep(0.5)
        empty = []
        for query in dashboard_queries(load_dashboard()):
            promql = query.replace("$__rate_interval", "5s").replace("$model", ".+")
            if promql.startswith("label_values("):
                promql = promql.removeprefix("label_values(").rsplit(",", 1)[0]
            answer = prometheus_get(base, "/api/v1/query", query=promql)
            assert answer["status"] == "success", (query, answer)
            if not answer["data"]["result"]:
                empty.append(query)
        assert empty == [], "queries with no data although the server has traffic"
        deadline = time.monotonic() + 10
        while True:
            groups = prometheus_get(base, "/api/v1/rules")["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            evaluated = rules and not any(rule["lastEvaluation"].startswith("0001") for rule in rules)
            if evaluated or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert len(rules) == len(alert_rules())
        assert {rule["name"]: rule["health"] for rule in rules} == {rule["name"]: "ok" for rule in rules}
    finally:
        stop.set()
        feeder.join()
        process.terminate()
        process.wait(timeout=30)
