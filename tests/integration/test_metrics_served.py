"""FIRE's metrics from the wired stages, on the session's real tritonserver (every layout from one server).

The server is shared by the session, so every check compares two scrapes, before and after what the test did,
taken when the flusher has nothing left to send (tests/integration/test_metrics_endpoint.py checks the metrics
module itself with a probe model; these check that the serving and control stages feed it).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from helpers import DEFENDED, EVERY_LAYOUT, bypass_parameters
from observability import (
    Exposition,
    alert_rules,
    dashboard_queries,
    load_dashboard,
    promql_metric_names,
    scrape,
    wait_for,
)
from tritonclient.utils import InferenceServerException

from fire_backend import metric_families as mf
from fire_backend.repository.build import HEAD, REPAIR, stage_name
from fire_backend.stage_metrics import fetch
from fire_backend.stub import metrics as m
from fire_backend.stub.live_plan import WATCH_INTERVAL_S
from fire_backend.wire.control import ControlClient
from fire_backend.wire.errors import FireClientError
from fire_backend.wire.names import BYPASS_PARAMETER, FIRE_ENSEMBLE, FIRE_INLINE, FIRE_SEPARATE

pytestmark = pytest.mark.integration

#: the stage that computes REPAIR_SCORE for each defended model, and so exports its FIRE series
SCORING = {FIRE_ENSEMBLE: FIRE_ENSEMBLE, FIRE_INLINE: stage_name(FIRE_INLINE, HEAD),
           FIRE_SEPARATE: stage_name(FIRE_SEPARATE, REPAIR)}
LAYOUT = {FIRE_ENSEMBLE: EVERY_LAYOUT.layout, FIRE_INLINE: "inline", FIRE_SEPARATE: "separate"}
SCORING_INSTANCES = EVERY_LAYOUT.model_instances + EVERY_LAYOUT.head_instances + EVERY_LAYOUT.repair_instances
FLUSH_S = m.MetricsConfig().flush_interval_s
#: what the version gauge of every instance must reach after a push, with no traffic: an idle instance looks
#: every WATCH_INTERVAL_S (0.5 s), applying wakes its flusher at once (no wait for the 1 s interval), so the
#: design target is about 0.5 s; 1.5 s more for scheduling on a loaded 2-core machine
PROPAGATION_LIMIT_S = WATCH_INTERVAL_S + 1.5


def settled(served) -> Exposition:
    """A scrape after every flusher has sent what earlier tests left (the next flush is at most FLUSH_S away)."""
    time.sleep(FLUSH_S + 0.5)
    return scrape(served.server.urls["metrics"])


def send(client: grpcclient.InferenceServerClient, model: str, images: np.ndarray,
         parameters: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    tensor = grpcclient.InferInput("IMAGE", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    result = client.infer(model, [tensor], parameters=parameters)
    return result.as_numpy("REPAIR_SCORE").reshape(-1), result.as_numpy("FLAGGED").reshape(-1)


def test_fire_counters_equal_what_the_clients_saw(defended, badnets_eval) -> None:
    rng = np.random.default_rng(17)
    mix = []  # (model, images, bypass): clean, triggered, and triggered with a signed bypass, per layout
    for model in DEFENDED:
        for i in range(12):
            size = int(rng.integers(1, 5))
            pool = badnets_eval.clean if i % 3 == 0 else badnets_eval.poisoned
            start = int(rng.integers(0, len(pool) - size))
            mix.append((model, np.ascontiguousarray(pool[start:start + size]), i % 4 == 1))
    before = settled(defended)
    seen = {model: {"requests": 0, "samples": 0, "flagged": 0, "bypassed": 0, "scores": []} for model in DEFENDED}

    with grpcclient.InferenceServerClient(defended.grpc) as client:
        def one(item: tuple[str, np.ndarray, bool]) -> tuple[str, np.ndarray, np.ndarray, bool]:
            model, images, bypass = item
            return (model, *send(client, model, images, bypass_parameters(images, defended.token) if bypass
                                 else None), bypass)

        with ThreadPoolExecutor(4) as pool:  # concurrent clients: the dynamic batcher groups requests
            results = list(pool.map(one, mix))
        for model in DEFENDED:  # an unsigned bypass is refused before the repair: never counted
            with pytest.raises(InferenceServerException):
                send(client, model, badnets_eval.poisoned[:1], {BYPASS_PARAMETER: True})
    for model, scores, flagged, bypass in results:
        tally = seen[model]
        tally["requests"] += 1
        tally["samples"] += len(scores)
        tally["flagged"] += int(flagged.sum())
        tally["bypassed"] += bypass
        tally["scores"].append(scores)

    def delta(page: Exposition, family: mf.Family, model: str, **labels: str) -> float:
        mine = {"model": SCORING[model], "layout": LAYOUT[model], **labels}
        return page.total(family.name, **mine) - before.total(family.name, **mine)

    url = defended.server.urls["metrics"]
    wait_for(url, lambda p: all(delta(p, mf.REQUESTS_TOTAL, model) >= seen[model]["requests"] for model in DEFENDED),
             "the mix")
    page = settled(defended)  # whatever else would arrive (it must not) has arrived
    for model in DEFENDED:
        tally = seen[model]
        scores = np.concatenate(tally.pop("scores")).astype(np.float64)
        assert 0 < tally["flagged"] < tally["samples"], model  # the mix has both
        got = {"requests": delta(page, mf.REQUESTS_TOTAL, model), "samples": delta(page, mf.SAMPLES_TOTAL, model),
               "flagged": delta(page, mf.FLAGGED_SAMPLES_TOTAL, model),
               "bypassed": delta(page, mf.BYPASSED_REQUESTS_TOTAL, model)}
        assert got == tally, model
        for le in ("0", "0.5", "1", "+Inf"):
            expected = len(scores) if le == "+Inf" else int(np.sum(scores <= float(le)))
            assert delta(page, mf.SCORE_BUCKET, model, le=le) == expected, (model, le)
        assert delta(page, mf.SCORE_SUM, model) == pytest.approx(scores.sum(), abs=1e-3)
    # What `fire demo` prints at its end: each scoring stage's traffic is among the lines.
    lines = mf.summary_lines(fetch(url))
    for model in DEFENDED:
        assert any(line.startswith(f"{mf.REQUESTS_TOTAL.name}{{") and f'model="{SCORING[model]}"' in line
                   for line in lines), model


def test_the_dashboard_and_alerts_query_what_the_wired_stages_export(defended) -> None:
    page = settled(defended)
    names = page.names()
    assert mf.exported_names() <= names, sorted(mf.exported_names() - names)
    for model, stage in SCORING.items():  # each layout's scoring stage exports every serving family
        exported = {s.name for s in page.samples if s.labels.get("model") == stage}
        assert {f.name for f in mf.BATCH_FAMILIES} <= exported, model
    recorded = {rule["record"] for rule in alert_rules() if "record" in rule}
    queries = dashboard_queries(load_dashboard()) + [rule["expr"] for rule in alert_rules()]
    missing = {q: sorted(promql_metric_names(q) - names - recorded) for q in queries}
    assert {q: n for q, n in missing.items() if n} == {}


def test_the_version_gauge_follows_a_push_without_traffic(defended) -> None:
    url = defended.server.urls["metrics"]
    settled(defended)
    with ControlClient(defended.grpc, defended.token) as ctl:
        dim = ctl.status()["latent_shape"]
        beta = np.random.default_rng(3).standard_normal(int(np.prod(dim))) * 0.01
        began = time.monotonic()
        pushed = ctl.push([{"beta": beta.astype(np.float32).tolist(), "name": "metrics-test"}])["version"]
        page = wait_for(url, lambda p: [s.value for s in p.select(mf.APPLIED_VERSION.name)] == [pushed] *
                        SCORING_INSTANCES, "every instance on the pushed version", timeout_s=30, every_s=0.02)
        followed = time.monotonic() - began
        print(f"version gauge of {SCORING_INSTANCES} idle instances followed the push in {followed:.3f} s "
              f"(limit {PROPAGATION_LIMIT_S} s)")
        assert followed <= PROPAGATION_LIMIT_S
        # The control stage reads the store's live version every flush (1 s).
        wait_for(url, lambda p: p.one(mf.LIVE_VERSION.name) == pushed, "the live version", timeout_s=FLUSH_S + 5)
        lags = [s.value for s in page.select(mf.APPLY_LAG_SECONDS.name)]
        assert len(lags) == SCORING_INSTANCES and all(0 <= lag <= PROPAGATION_LIMIT_S for lag in lags), lags

        status = ctl.status()  # what `fire ctl status` prints
    assert len(status["instances"]) == SCORING_INSTANCES and status["gone"] == []
    for instance in status["instances"]:
        assert instance["version"] == pushed and instance["behind_s"] is None, instance
        assert 0 <= instance["lag_s"] <= PROPAGATION_LIMIT_S, instance


def test_control_actions_are_counted_by_result(defended) -> None:
    url = defended.server.urls["metrics"]
    before = settled(defended)
    with ControlClient(defended.grpc, "not-the-token") as wrong, pytest.raises(FireClientError, match="permission"):
        wrong.push([{"beta": [1.0]}])
    with ControlClient(defended.grpc, defended.token) as ctl:
        with pytest.raises(FireClientError, match="never committed"):
            ctl.rollback(10**6)
        ctl.status()

    def grew(page: Exposition, action: str, result: str) -> float:
        labels = {"action": action, "result": result}
        name = mf.CONTROL_ACTIONS_TOTAL.name
        return page.total(name, **labels) - before.total(name, **labels)

    wait_for(url, lambda p: grew(p, "status", mf.RESULT_OK) >= 1, "the status action")
    page = settled(defended)
    counted = {(s.labels["action"], s.labels["result"]): grew(page, s.labels["action"], s.labels["result"])
               for s in page.select(mf.CONTROL_ACTIONS_TOTAL.name)}
    assert {key: n for key, n in counted.items() if n} == {
        ("push", mf.RESULT_REFUSED_AUTH): 1, ("rollback", mf.RESULT_REFUSED_VALIDATION): 1, ("status", mf.RESULT_OK): 1}
