"""Triton's own per-model counters (its Prometheus endpoint), and what a run did to them, stage by stage.

``fire bench`` reads the counters before and after each target's run; the difference says, for every model that
served the target, how many requests and inferences it ran in how many executions (the mean dynamic batch), and
how long they queued and computed. Triton adds, for every request, the duration of the execution it rode in
(``nv_inference_compute_*_duration_us``) and its own wait (``nv_inference_queue_duration_us``). Torch-free.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

COUNTERS = {
    "requests": "nv_inference_request_success",
    "inferences": "nv_inference_count",
    "executions": "nv_inference_exec_count",
    "queue_us": "nv_inference_queue_duration_us",
    "compute_input_us": "nv_inference_compute_input_duration_us",
    "compute_infer_us": "nv_inference_compute_infer_duration_us",
    "compute_output_us": "nv_inference_compute_output_duration_us",
}
_LINE = re.compile(r'^(?P<metric>nv_inference_\w+)\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)\s*$')
_MODEL = re.compile(r'model="(?P<model>[^"]+)"')

Counters = dict[str, dict[str, float]]  # model -> counter name -> value


def parse(text: str) -> Counters:
    """Prometheus text -> {model: {counter: value}} for the counters in :data:`COUNTERS` (summed over versions)."""
    wanted = {metric: key for key, metric in COUNTERS.items()}
    out: Counters = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if not match or match["metric"] not in wanted:
            continue
        model = _MODEL.search(match["labels"])
        if model is None:
            continue
        counters = out.setdefault(model["model"], dict.fromkeys(COUNTERS, 0.0))
        counters[wanted[match["metric"]]] += float(match["value"])
    return out


def fetch(url: str, timeout_s: float = 10.0) -> str:
    """The page of a metrics URL (``http://host:port/metrics``) as text; loopback, no proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout_s) as response:
        return response.read().decode()


def scrape(url: str, timeout_s: float = 10.0) -> Counters:
    """The counters now, from a metrics URL."""
    return parse(fetch(url, timeout_s))


@dataclass(frozen=True)
class StageFigures:
    """What one model did during a run (per request: the means over the run's requests)."""

    model: str
    requests: int
    inferences: int
    executions: int
    #: inferences per execution: the dynamic batch the stage ran
    mean_batch: float
    #: mean wait in the model's queue
    queue_ms: float
    #: mean duration of the execution a request rode in (input + infer + output)
    compute_ms: float
    #: compute_ms / mean_batch: the execution time each inference costs when batches are alike
    compute_ms_per_inference: float

    def to_dict(self) -> dict:
        return asdict(self)


def difference(before: Counters, after: Counters, models: Iterable[str]) -> list[StageFigures]:
    """Per model (in the order given), what happened between two scrapes; a model Triton did not report is
    left out."""
    figures = []
    for model in models:
        if model not in after:
            continue
        old: Mapping[str, float] = before.get(model, dict.fromkeys(COUNTERS, 0.0))
        d = {key: after[model][key] - old[key] for key in COUNTERS}
        requests, executions = int(d["requests"]), int(d["executions"])
        inferences = int(d["inferences"])
        compute_us = d["compute_input_us"] + d["compute_infer_us"] + d["compute_output_us"]
        mean_batch = inferences / executions if executions else 0.0
        compute_ms = compute_us / requests / 1000 if requests else 0.0
        figures.append(StageFigures(
            model=model, requests=requests, inferences=inferences, executions=executions, mean_batch=mean_batch,
            queue_ms=d["queue_us"] / requests / 1000 if requests else 0.0, compute_ms=compute_ms,
            compute_ms_per_inference=compute_ms / mean_batch if mean_batch else 0.0,
        ))
    return figures
