"""What the observability tests share: Triton's /metrics text scraped and parsed, and the metric names that the
dashboard and the alert rules in docs/deploy query."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


class Exposition:
    """The samples and ``# TYPE`` lines of one scrape."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.samples: list[Sample] = []
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(maxsplit=3)
                self.types[name] = kind
            elif line and not line.startswith("#"):
                match = _SAMPLE.fullmatch(line)
                if match is None:
                    raise ValueError(f"not a sample line: {line!r}")
                labels = dict(_LABEL.findall(match.group(2) or ""))
                self.samples.append(Sample(match.group(1), labels, float(match.group(3))))

    def names(self) -> set[str]:
        return {s.name for s in self.samples}

    def select(self, name: str, **labels: str) -> list[Sample]:
        """The samples of ``name`` whose labels include ``labels``."""
        return [s for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]

    def total(self, name: str, **labels: str) -> float:
        """Sum over the matching samples (e.g. a counter over every instance of a model)."""
        return sum(s.value for s in self.select(name, **labels))

    def one(self, name: str, **labels: str) -> float:
        found = self.select(name, **labels)
        if len(found) != 1:
            raise AssertionError(f"{len(found)} samples of {name}{labels}, expected exactly one")
        return found[0].value


# -- what dashboards and alert rules query --------------------------------------------------------------------

def scrape(url: str) -> Exposition:
    """One scrape of a /metrics URL (no proxy: the servers listen on loopback)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        return Exposition(response.read().decode())


def wait_for(url: str, condition: Callable[[Exposition], bool], what: str, timeout_s: float = 15.0,
             every_s: float = 0.1) -> Exposition:
    """Scrape until ``condition`` holds; the page where it did. AssertionError naming ``what`` at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        page = scrape(url)
        if condition(page):
            return page
        assert time.monotonic() < deadline, f"{what}: not on /metrics after {timeout_s:.0f} s"
        time.sleep(every_s)


DEPLOY = Path(__file__).resolve().parents[1] / "docs" / "deploy"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
ALERTS = DEPLOY / "fire-alerts.yml"

#: Triton 2.51's own metrics that docs/deploy queries (a CPU server; tests/integration/test_metrics_endpoint.py
#: checks each against the real /metrics)
TRITON_METRICS = frozenset({
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count", "nv_inference_exec_count",
    "nv_inference_request_duration_us", "nv_inference_queue_duration_us", "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us", "nv_inference_compute_output_duration_us",
    "nv_inference_pending_request_count",
})

_STRING = re.compile(r""""(?:[^"\\\\]|\\\\.)*"|'(?:[^'\\\\]|\\\\.)*'""")
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan"}
_LABEL_VALUES = re.compile(r"label_values\(\s*(.*?)\s*,\s*[A-Za-z_][A-Za-z0-9_]*\s*\)")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana's ``$variables`` allowed).

    Strings, label matchers, ranges and label lists (``by (...)``, ``on (...)``) are removed first; what is left
    that is neither a function or aggregation (followed by ``(``) nor a keyword is a metric name.
    """
    values = _LABEL_VALUES.fullmatch(expr.strip())
    if values:  # a Grafana variable query: label_values(METRIC_SELECTOR, label)
        expr = values.group(1)
    text = _STRING.sub('""', expr)
    text = _GRAFANA_VARIABLE.sub("1", text)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = _LABEL_LIST.sub("", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        if text[match.end():].lstrip().startswith("(") or match.group(0).lower() in _KEYWORDS:
            continue
        names.add(match.group(0))
    return names


def dashboard_queries(dashboard: dict) -> list[str]:
    """Every PromQL query of a Grafana dashboard: panel targets (rows' nested panels too) and variables."""
    queries = []
    panels = list(dashboard.get("panels", []))
    while panels:
        panel = panels.pop()
        panels += panel.get("panels", [])
        queries += [t["expr"] for t in panel.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())
