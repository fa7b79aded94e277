"""A faithful double of the Python backend's custom-metrics API (``pb_utils.MetricFamily``/``Metric``), Triton 2.51.

Used where the real tritonserver would make a test slow or could not show the failure: it behaves as measured
on the real server (see fire_backend/stub/metrics.py) -- including the misuses that kill tritonserver, which
here raise ``ServerAborted`` (a test never catches it, so such a misuse fails the test):

* a counter incremented by a negative value (real: the call fails, then tritonserver aborts);
* a label name starting with ``__`` (real: abort);
* one ``Metric`` object used by two threads at once (real: SIGSEGV); ``latency_s`` widens the window as the
  real ~35 us IPC round trip does.

Clean errors (``TritonModelException``), as the real API raises them: an invalid metric or label name,
``set`` on a counter, ``Metric`` of a HISTOGRAM family without buckets, buckets on a counter or gauge.
Identical labels in one family name are one series however many ``Metric`` objects (stubs) hold them. As in
Triton 2.51's core (``MetricFamily::Remove`` counts references per family object, the prometheus series is shared
by name and labels; triton-inference-server/server#8663), deleting a ``Metric`` frees the series once the deleting
stub's *own* family object holds no other reference to it, whoever else still holds it: the series leaves the
exposition, and any later call through another stub's ``Metric`` on it raises ``ServerAborted`` (real: a use after
free that corrupts the server's heap). Every call is counted in ``calls`` (by thread name).
"""

from __future__ import annotations

import math
import re
import threading
import time
import weakref
from collections import Counter
from typing import Any


class TritonModelException(Exception):
    """What pb_utils raises for a refused metric call (the server keeps running)."""


class ServerAborted(BaseException):
    """The real tritonserver would have died here (BaseException: no ``except Exception`` swallows it)."""


_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


class _Series:
    def __init__(self) -> None:
        self.value = 0.0
        #: id(MetricFamily object) -> Metric objects of that family object holding the series
        self.holders: Counter = Counter()
        self.freed = False


class PbMetrics:
    """Stands in for the ``triton_python_backend_utils`` module as far as metrics go; one per simulated server."""

    def __init__(self, latency_s: float = 0.0) -> None:
        self.latency_s = latency_s
        self.calls: Counter = Counter()
        #: family name -> (kind, help, {sorted label items: series})
        self.families: dict[str, tuple[int, str, dict[tuple[tuple[str, str], ...], _Series]]] = {}
        #: warnings the real server would log
        self.warnings: list[str] = []
        self._lock = threading.Lock()
        self.MetricFamily = _family_class(self)

    def call(self) -> None:
        with self._lock:
            self.calls[threading.current_thread().name] += 1

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    def exposition(self) -> str:
        """/metrics as Triton renders it: HELP and TYPE lines, labels sorted by name."""
        lines = []
        kinds = {0: "counter", 1: "gauge", 2: "histogram"}
        for name, (kind, help_, series) in self.families.items():
            if not series:
                continue
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kinds[kind]}"]
            for labels, one in series.items():
                text = ",".join(f'{k}="{v}"' for k, v in labels)
                lines.append(f"{name}{{{text}}} {_number(one.value)}")
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    if math.isnan(value):
        return "Nan"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if value == int(value) and abs(value) < 1e15 else repr(value)


def _family_class(server: PbMetrics) -> type:
    class Metric:
        def __init__(self, family: MetricFamily, labels: dict[str, str]) -> None:
            self._family = family
            self._key = tuple(sorted(labels.items()))
            self._busy = threading.Lock()
            series = family.series.setdefault(self._key, _Series())
            series.holders[id(family)] += 1
            self._series = series
            self.cleared = False

        def _enter(self) -> None:
            server.call()
            if not self._busy.acquire(blocking=False):
                raise ServerAborted("one Metric used by two threads at once (the real server segfaults)")
            if self.cleared:
                self._busy.release()
                raise TritonModelException("Invalid metric operation as the corresponding 'MetricFamily' has "
                                           "been deleted.")
            if self._series.freed:
                self._busy.release()
                raise ServerAborted("a series another stub's delete freed (server#8663; the real heap is corrupted)")
            time.sleep(server.latency_s)

        def increment(self, value: float) -> None:
            self._enter()
            try:
                if self._family.kind == MetricFamily.COUNTER and value < 0:
                    raise ServerAborted(f"negative counter increment {value} (the real server aborts)")
                if self._family.kind == MetricFamily.HISTOGRAM:
                    raise TritonModelException("TRITONSERVER_METRIC_KIND_HISTOGRAM does not support Increment")
                self._series.value += value
            finally:
                self._busy.release()

        def set(self, value: float) -> None:
            self._enter()
            try:
                if self._family.kind != MetricFamily.GAUGE:
                    raise TritonModelException("only a GAUGE supports Set")
                self._series.value = float(value)
            finally:
                self._busy.release()

        def value(self) -> float:
            self._enter()
            try:
                if self._family.kind == MetricFamily.HISTOGRAM:
                    raise TritonModelException("TRITONSERVER_METRIC_KIND_HISTOGRAM does not support Value")
                return self._series.value
            finally:
                self._busy.release()

        def clear(self) -> None:
            """What deleting the Metric (or its family) does on the server: one holder less."""
            if self.cleared:
                return
            server.call()
            self.cleared = True
            holders = self._series.holders
            holders[id(self._family)] -= 1
            if holders[id(self._family)] == 0:  # this family object's last reference: Triton 2.51 frees the series
                del holders[id(self._family)]
                self._series.freed = True
                if self._family.series.get(self._key) is self._series:
                    del self._family.series[self._key]

        def __del__(self) -> None:
            self.clear()

    class MetricFamily:
        COUNTER, GAUGE, HISTOGRAM = 0, 1, 2

        def __init__(self, name: str, description: str, kind: int) -> None:
            server.call()
            if not _NAME.fullmatch(name):
                raise TritonModelException("Error when creating MetricFamily: Invalid metric name")
            self.kind = kind
            entry = server.families.setdefault(name, (kind, description, {}))
            self.series = entry[2]
            self._children: list[Any] = []

        def Metric(self, labels: dict[str, str] | None = None, buckets: list[float] | None = None) -> Metric:  # noqa: N802
            server.call()
            labels = dict(labels or {})
            for key in labels:
                if key.startswith("__"):
                    raise ServerAborted(f"reserved label name {key!r} (the real server aborts)")
                if not _LABEL.fullmatch(key):
                    raise TritonModelException("Error when creating Metric: Invalid label name")
            if self.kind == self.HISTOGRAM and buckets is None:
                raise TritonModelException("Failed to create metric. Missing required buckets.")
            if self.kind != self.HISTOGRAM and buckets is not None:
                raise TritonModelException("Failed to create metric. Unexpected buckets found.")
            metric = Metric(self, labels)
            self._children.append(weakref.ref(metric))
            return metric

        def __del__(self) -> None:
            alive = [m for m in (ref() for ref in self._children) if m is not None and not m.cleared]
            if alive:
                server.warnings.append("MetricFamily was deleted before its child Metrics")
            for metric in alive:
                metric.clear()

    return MetricFamily
