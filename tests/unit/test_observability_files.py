"""docs/deploy's Grafana dashboard, Prometheus configs and alert rules: well formed, and querying only metrics the
server exports (FIRE's families, Triton's own nv_* metrics, the rules' recorded series).

promtool, where installed (Debian: ``apt-get install prometheus``), also checks the configs and runs the alert
rules' unit tests (fire-alerts.test.yml); tests/integration/test_metrics_endpoint.py checks the names against a
real /metrics and evaluates every query in a real Prometheus.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from observability import (
    ALERTS,
    DEPLOY,
    TRITON_METRICS,
    alert_rules,
    dashboard_queries,
    load_dashboard,
    promql_metric_names,
)

from fire_backend import metric_families as mf
from fire_backend.wire.names import DEFAULT_METRICS_PORT

ROOT = Path(__file__).resolve().parents[2]
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
PANEL_TYPES = {"row", "timeseries", "heatmap", "stat", "bargauge", "table", "gauge"}
PROMTOOL = shutil.which("promtool")


def recorded() -> set[str]:
    return {rule["record"] for rule in alert_rules() if "record" in rule}


# -- the PromQL name extraction itself ---------------------------------------------------------------------------

@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (model) (rate(fire_samples_total{model=~"$model"}[$__rate_interval]))', {"fire_samples_total"}),
    ("sum(rate(a_total[5m])) by (job) / ignoring(le) b offset 5m", {"a_total", "b"}),
    ("histogram_quantile(0.9, sum by (le) (rate(x_bucket[1m]))) > bool 1e3", {"x_bucket"}),
    ("x != on (job, instance) group_left () max by (job, instance) (y)", {"x", "y"}),
    ('count(up{job="a:b", x="rate(no_metric[5m])"}) or vector(0)', {"up"}),
    ("fire:flagged_ratio:rate5m > 0.05 and on (job) fire:samples:rate5m > 0.2", {"fire:flagged_ratio:rate5m",
                                                                                 "fire:samples:rate5m"}),
    ("label_values(fire_requests_total, model)", {"fire_requests_total"}),
])
def test_promql_metric_names(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names


# -- Grafana dashboard -------------------------------------------------------------------------------------------

def panels(dashboard: dict) -> list[dict]:
    out, stack = [], list(dashboard["panels"])
    while stack:
        panel = stack.pop(0)
        out.append(panel)
        stack += panel.get("panels", [])
    return out


def test_dashboard_has_grafanas_essentials() -> None:
    dashboard = load_dashboard()
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["title"] and re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", dashboard["uid"])
    assert dashboard["id"] is None, "an exported dashboard carries no database id"
    # The datasource placeholder that Grafana's import asks to bind, and nothing hard-wired.
    assert [(i["name"], i["type"], i["pluginId"]) for i in dashboard["__inputs"]] == \
        [("DS_PROMETHEUS", "datasource", "prometheus")]
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"] == DATASOURCE


def test_every_panel_is_placed_typed_and_queries_the_placeholder_datasource() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(load_dashboard()):
        assert panel["type"] in PANEL_TYPES and panel["title"], panel
        pos = panel["gridPos"]
        assert all(isinstance(pos[k], int) for k in "xywh") and pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[x, y]!r}"
                cells[x, y] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["description"], panel["title"]
        targets = panel["targets"]
        assert targets, panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["datasource"] == DATASOURCE and target["expr"].strip(), panel["title"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    used = set().union(*map(promql_metric_names, dashboard_queries(load_dashboard())))
    assert {mf.FLAGGED_SAMPLES_TOTAL.name, mf.SAMPLES_TOTAL.name, mf.SCORE_BUCKET.name, mf.APPLIED_VERSION.name,
            mf.LIVE_VERSION.name, mf.APPLY_LAG_SECONDS.name, mf.CONTROL_ACTIONS_TOTAL.name} <= used
    assert {"nv_inference_request_duration_us", "nv_inference_queue_duration_us",
            "nv_inference_compute_infer_duration_us"} <= used
    heatmaps = [p for p in panels(load_dashboard()) if p["type"] == "heatmap"]
    assert heatmaps and all(t.get("format") == "heatmap" for p in heatmaps for t in p["targets"])


def test_every_dashboard_query_names_only_exported_metrics() -> None:
    exported = mf.exported_names() | TRITON_METRICS
    for query in dashboard_queries(load_dashboard()):
        names = promql_metric_names(query)
        assert names, f"no metric in {query!r}"
        assert names <= exported, f"{query!r} queries {sorted(names - exported)}, which the server does not export"


# -- alert rules and scrape configs ------------------------------------------------------------------------------

def test_alert_rules_name_only_exported_or_recorded_metrics() -> None:
    known = mf.exported_names() | TRITON_METRICS | recorded()
    for rule in alert_rules():
        names = promql_metric_names(rule["expr"])
        assert names and names <= known, f"{rule.get('alert') or rule['record']}: {sorted(names - known)}"


def test_the_two_alerts_the_operator_guide_explains() -> None:
    alerts = {rule["alert"]: rule for rule in alert_rules() if "alert" in rule}
    assert {"FireFlaggedRateSpike", "FireInstanceBehindLiveVersion"} <= set(alerts)
    guide = (ROOT / "docs" / "operator-guide.md").read_text()
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("page", "warning"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert name in guide, f"docs/operator-guide.md does not explain {name}"
    for family in mf.FAMILIES:
        assert f"`{family.name}" in guide, f"docs/operator-guide.md does not explain {family.name}"


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus-kubernetes.yml"])
def test_scrape_configs_load_the_rules_and_scrape_the_metrics_port(name: str) -> None:
    config = yaml.safe_load((DEPLOY / name).read_text())
    assert [DEPLOY / f for f in config["rule_files"]] == [ALERTS]
    jobs = config["scrape_configs"]
    assert [job["job_name"] for job in jobs] == ["fire"], "the rules group by job: one job per deployment"
    if name == "prometheus.yml":
        assert jobs[0]["static_configs"][0]["targets"] == [f"127.0.0.1:{DEFAULT_METRICS_PORT}"]
    else:
        pod = next(d for d in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()) if d["kind"] == "Deployment")
        meta = pod["spec"]["template"]["metadata"]
        keep = {r["source_labels"][0]: r["regex"] for r in jobs[0]["relabel_configs"] if r.get("action") == "keep"}
        assert keep["__meta_kubernetes_pod_label_app"] == meta["labels"]["app"]
        scrape = keep["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]
        assert meta["annotations"]["prometheus.io/scrape"] == scrape
        assert meta["annotations"]["prometheus.io/port"] == str(DEFAULT_METRICS_PORT)


# -- promtool, where installed -----------------------------------------------------------------------------------

@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus)")
@pytest.mark.parametrize("args", [["check", "config", "prometheus.yml"], ["check", "rules", "fire-alerts.yml"],
                                  ["test", "rules", "fire-alerts.test.yml"]], ids=" ".join)
def test_promtool(args: list[str]) -> None:
    proc = subprocess.run([PROMTOOL, *args], cwd=DEPLOY, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
