"""FIRE's own Prometheus metrics, exported on Triton's /metrics through the Python backend's custom-metrics API.

Every ``pb_utils`` metric call is an IPC round trip from the stub to the server process. Measured on Triton
2.51 (CPU, 2 busy cores): ``increment``/``set``/``observe``/``value`` take 31-44 us each (outliers near 200 us
under contention), creating a ``Metric`` 0.1-0.8 ms. One score observed per sample would cost a stage as much
as its compute, so the serving path never calls Triton:

* ``record_batch`` (once per batch, on the execute thread) only adds integers and keeps a reference to the
  batch's score and flag tensors: 1.5-1.8 us measured inside the stub; no reduction, device sync or IPC.
* One flusher thread per stub reduces what accumulated (one ``torch.cat`` or ``np.concatenate``, bucket
  counts, sums) and sends the deltas every ``flush_interval_s`` (default 1 s): about 23 calls under steady
  traffic with the default buckets, none for what did not change; 2-3 ms for 500 batches measured inside the
  stub. A version change, a store error or a control action wakes it at once.

Also measured, and the reasons for the rules below: calls from a background thread work (also while the stub
is idle between batches); two threads calling the *same* ``Metric`` object at once crash tritonserver
(SIGSEGV), so every call goes through one lock; a negative counter increment aborts tritonserver, so only
positive finite deltas are sent; a label name starting with ``__`` aborts it too, so every name is checked
here; a HISTOGRAM needs ``buckets`` at ``Metric(labels=..., buckets=[...])`` and takes one value per
``observe`` -- it cannot take pre-binned counts.

Hence the score distribution is exported as the three series a Prometheus histogram consists of, built from
counters: ``fire_repair_score_bucket{le=...}`` (cumulative, ``+Inf`` included) and ``fire_repair_score_count``,
plus ``fire_repair_score_sum`` as a gauge (scores can be negative, so the running sum can fall, which a counter
may not). ``histogram_quantile()`` and Grafana heatmaps read them exactly as they read a histogram; the
trade-off is the ``# TYPE`` line (counter, not histogram) and that a scrape in the middle of a flush can see
some buckets already updated and others not (Prometheus' ``histogram_quantile`` tolerates that).

Every series carries ``model`` and ``model_instance`` (Triton's instance name): series with identical labels
from several stubs would be one shared server-side series, and gauges set by two instances would overwrite
each other. ``model_instance`` rather than ``instance``, which Prometheus reserves for the scrape target.

A stub never deletes its metrics: each family and series handle is kept for as long as the process lives
(``_RETAINED``), and the stub leaves without tearing its interpreter down
(:mod:`fire_backend.stub.triton_models`). Triton 2.51 shares one server-side series between the stubs that
create it with identical labels, and frees it when the first of them deletes its handle
(triton-inference-server/server#8663): after a reload, the old copy's finalize freed the series its successor
(same model, same instance name) still updates, and the server's heap was corrupted (measured: a 2-instance model
with one counter, reloaded under traffic, aborted or hung at the first reload; 20 of 20 reloads passed with the
handles kept; docs/limits.md). So a series stays on /metrics, at its last value, until the server stops, and a
reloaded instance goes on counting in the same series.

``pb_utils`` is handed in, like the stages: this module imports neither Triton nor torch.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fire_backend.metric_families import (
    APPLIED_VERSION,
    APPLY_LAG_SECONDS,
    BATCH_FAMILIES,
    BYPASSED_REQUESTS_TOTAL,
    CONTROL_ACTIONS_TOTAL,
    CONTROL_FAMILIES,
    CONTROL_RESULTS,
    COUNTER,
    FLAGGED_SAMPLES_TOTAL,
    GAUGE,
    INSTANCE_LABEL,
    LAYOUT_LABEL,
    LIVE_VERSION,
    MODEL_LABEL,
    OTHER_ACTION,
    REPAIR_UNAVAILABLE,
    REQUESTS_TOTAL,
    SAMPLES_TOTAL,
    SCORE_BUCKET,
    SCORE_BUCKETS,
    SCORE_COUNT,
    SCORE_SUM,
    STORE_DEGRADED,
    STORE_ERROR_KINDS,
    STORE_ERRORS_TOTAL,
    Family,
)

LOG = logging.getLogger("fire_backend.metrics")



_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
#: batches kept by reference that wake the flusher before its interval is up (heavy traffic)
_FLUSH_EARLY_BATCHES = 1024
#: batches kept by reference that are folded into bucket counts on the spot: bounds memory should the
#: flusher be stuck (a hung IPC call); never reached while it keeps up
_MAX_PENDING_BATCHES = 65536
#: every family and series handle this process created: never released while it lives (see the module docstring)
_RETAINED: list[Any] = []


@dataclass(frozen=True)
class MetricsConfig:
    """How often the flusher talks to Triton, and the score histogram's bucket bounds."""

    #: seconds between flushes; /metrics lags the traffic by at most this much
    flush_interval_s: float = 1.0
    #: upper bounds (``le``) of the score buckets, strictly increasing; ``+Inf`` is added
    score_buckets: tuple[float, ...] = SCORE_BUCKETS

    def __post_init__(self) -> None:
        if not (self.flush_interval_s > 0 and math.isfinite(self.flush_interval_s)):
            raise ValueError(f"flush_interval_s must be a positive number of seconds, got {self.flush_interval_s}")
        bounds = self.score_buckets
        increasing = all(a < b for a, b in zip(bounds, bounds[1:], strict=False))
        if not bounds or not increasing or not all(math.isfinite(b) for b in bounds):
            raise ValueError(f"score_buckets must be finite and strictly increasing, got {bounds}")


def check_name(name: str, *, label: bool = False) -> str:
    """``name`` if Prometheus (and Triton) accept it; ValueError otherwise.

    Checked here because Triton does not fail cleanly for every bad name: a label name starting with ``__``
    aborts the whole server.
    """
    what = "label" if label else "metric"
    if not (_LABEL_NAME if label else _METRIC_NAME).fullmatch(name):
        raise ValueError(f"{name!r} is not a valid Prometheus {what} name: letters, digits and '_' only, "
                         "not starting with a digit")
    if name.startswith("__"):
        raise ValueError(f"{name!r}: {what} names starting with '__' are reserved for Prometheus")
    return name


def le_label(bound: float) -> str:
    """How Prometheus spells a bucket bound: ``0.5``, ``1``, ``-0.25``, ``+Inf``."""
    if bound == math.inf:
        return "+Inf"
    text = repr(float(bound) + 0.0)  # + 0.0: -0.0 is 0
    return text[:-2] if text.endswith(".0") else text


def _flat(parts: list[Any]) -> np.ndarray:
    """The parts (numpy arrays or torch tensors, any device) as one flat numpy array.

    Torch tensors are joined by one ``torch.cat`` and copied to the host once: per-tensor conversion costs
    15-70x more (measured: 1000 batches, 37 ms against 1 ms). torch is found through ``sys.modules``: a tensor
    can only arrive if it is loaded, and this module stays importable without it.
    """
    torch = sys.modules.get("torch")
    if torch is not None and all(isinstance(p, torch.Tensor) for p in parts):
        try:
            joined = torch.cat(parts)
        except RuntimeError:  # parts of different rank
            joined = torch.cat([p.reshape(-1) for p in parts])
        return joined.detach().reshape(-1).cpu().numpy()
    return np.concatenate([np.asarray(p.detach().cpu() if hasattr(p, "detach") else p).reshape(-1) for p in parts])


class _Exporter:
    """The families and metrics of one stub, and the one thread that sends them to Triton.

    Subclasses keep what happened since the last flush under ``self._lock`` and turn it into Triton calls
    in ``_drain``. Every Triton call runs under ``self._ipc`` (one ``Metric`` used from two threads at once
    crashes tritonserver); all metrics are created up front, so every series exists (at 0) from the start
    and nothing is created on the serving path.
    """

    def __init__(self, pb_utils: Any, labels: Mapping[str, str], families: Sequence[Family],
                 config: MetricsConfig) -> None:
        for name, value in labels.items():
            check_name(name, label=True)
            if not isinstance(value, str) or not value:
                raise ValueError(f"label {name} needs a non-empty string value, got {value!r}")
        self.config = config
        self.labels = dict(labels)
        kinds = {COUNTER: pb_utils.MetricFamily.COUNTER, GAUGE: pb_utils.MetricFamily.GAUGE}
        self._families = {f.name: pb_utils.MetricFamily(name=check_name(f.name), description=f.help,
                                                         kind=kinds[f.kind]) for f in families}
        self._metrics: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
        self._lock = threading.Lock()
        self._ipc = threading.Lock()
        self._serving = False
        self._last_serving = -math.inf
        self._last_flush = -math.inf
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store_errors: Counter = Counter()
        for kind in STORE_ERROR_KINDS:
            self._create(STORE_ERRORS_TOTAL, kind=kind)
        _RETAINED.extend(self._families.values())

    def _create(self, family: Family, **extra: str) -> Any:
        """Create one series (at 0); only in constructors, before the flusher starts."""
        assert set(extra) == set(family.labels), (family.name, extra)
        labels = {**self.labels, **extra}
        metric = self._families[family.name].Metric(labels=labels)
        self._metrics[family.name, tuple(sorted(extra.items()))] = metric
        _RETAINED.append(metric)
        return metric

    def _series(self, family: Family, **extra: str) -> Any:
        return self._metrics[family.name, tuple(sorted(extra.items()))]

    def _start(self) -> None:
        """Start the flusher, once every series exists; its first flush runs at once."""
        self._thread = threading.Thread(target=self._run, name=f"fire-metrics-{self.labels[INSTANCE_LABEL]}",
                                        daemon=True)
        self._wake.set()
        self._thread.start()

    def store_error(self, kind: str) -> None:
        """The store refused something (one of STORE_ERROR_KINDS); counted, sent at once (wakes the flusher)."""
        if kind not in STORE_ERROR_KINDS:
            raise ValueError(f"store_error: kind must be one of {', '.join(STORE_ERROR_KINDS)}, got {kind!r}")
        with self._lock:
            self._store_errors[kind] += 1
        self._wake.set()

    @contextmanager
    def serving(self) -> Iterator[None]:
        """Around each ``execute`` of the stage: the flusher thread keeps out of Triton while batches are served.

        Under steady traffic the serving thread itself sends what is due at the end of a batch (at most once a
        ``flush_interval_s``, or at once after a version change, store error or control action); the flusher
        thread sends only while the stage has been idle for a whole interval. Metric calls from the flusher
        thread while batches were served crashed tritonserver 2.51 (heap corruption in ``libtriton_python.so``)
        under frequent version changes and load. The serving thread never waits for the flusher (a stub's
        background call may need the main thread to answer it): if the flusher is sending, the batch's figures
        go out with a later batch or flush. What is left is a request that arrives during an idle flush.
        """
        self._serving = True
        try:
            yield
        finally:
            self._last_serving = time.monotonic()
            self._serving = False
            due = self._wake.is_set() or self._last_serving - self._last_flush >= self.config.flush_interval_s
            if due and self._ipc.acquire(blocking=False):
                try:
                    self._send()
                finally:
                    self._ipc.release()

    def _run(self) -> None:
        interval = self.config.flush_interval_s
        while not self._stop.is_set():
            self._wake.wait(interval)
            idle = time.monotonic() - self._last_serving
            if self._serving or idle < interval:  # the serving thread sends; look again once it may be idle
                self._stop.wait(max(interval - idle, 0.01))
                continue
            if not self._stop.is_set():
                with self._ipc:
                    if not self._serving:  # a batch that began meanwhile sends at its end instead
                        self._send()

    def _drain(self) -> list[tuple[Any, str, float]]:
        """(metric, "increment" | "set", value) for what changed since the last flush (takes ``_lock``)."""
        raise NotImplementedError

    def _calls(self) -> list[tuple[Any, str, float]]:
        calls = self._drain()
        with self._lock:
            errors, self._store_errors = self._store_errors, Counter()
        return calls + [(self._series(STORE_ERRORS_TOTAL, kind=k), "increment", n) for k, n in errors.items()]

    def flush(self) -> None:
        """Send what accumulated now (the flusher does this when the stage is idle); never raises."""
        with self._ipc:
            self._send()

    def _send(self) -> None:
        """:meth:`flush`'s work; the caller holds ``_ipc``."""
        self._wake.clear()
        self._last_flush = time.monotonic()
        try:
            calls = self._calls()
        except Exception:  # a bad batch must not kill the flusher; it is dropped and logged
            LOG.exception("metrics: could not reduce the pending batch; dropped")
            return
        for metric, operation, value in calls:
            if operation == "increment" and not (value > 0 and math.isfinite(value)):
                continue  # zero: nothing to send; negative or NaN would break the counter (or the server)
            try:
                getattr(metric, operation)(value)
            except Exception as exc:  # Triton refused one call; the others still go out
                LOG.error("metrics: %s(%r) failed: %s", operation, value, exc)

    def close(self) -> None:
        """Stop the flusher. The handles stay retained (never deleted: see the module docstring); what accumulated
        since the last flush is not sent."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            if self._thread.is_alive():
                LOG.error("metrics: flusher did not stop; leaving its metrics in place")
                return
        with self._ipc:
            self._metrics.clear()
            self._families.clear()


@dataclass
class _BatchTally:
    """What the serving path recorded since the last flush."""

    requests: int = 0
    samples: int = 0
    bypassed: int = 0
    flagged: int = 0
    #: not yet reduced: (scores, flagged mask or None) of each batch, by reference
    batches: list[tuple[Any, Any]] = field(default_factory=list)
    #: per-bucket (not cumulative) counts of batches already reduced, + Inf last; sum of finite scores
    bucket_counts: np.ndarray | None = None
    score_sum: float = 0.0
    version: int | None = None
    lag_s: float | None = None
    #: (store degraded, instance unavailable) when it changed since the last flush
    store: tuple[bool, bool] | None = None

    def reduce(self, edges: np.ndarray) -> None:
        """Fold the kept batches into bucket counts, flagged count and score sum (numpy; off the hot path)."""
        if not self.batches:
            return
        scores = _flat([s for s, _ in self.batches]).astype(np.float64, copy=False)
        masks = [f for _, f in self.batches if f is not None]
        if masks:
            self.flagged += int(np.count_nonzero(_flat(masks)))
        # Prometheus' rule: a value v counts in every bucket with v <= le; NaN sorts last (into +Inf only).
        counts = np.bincount(np.searchsorted(edges, scores, side="left"), minlength=len(edges) + 1)
        self.bucket_counts = counts if self.bucket_counts is None else self.bucket_counts + counts
        finite = scores[np.isfinite(scores)]
        self.score_sum += float(finite.sum())
        self.batches = []


class BatchMetrics(_Exporter):
    """The serving stage's metrics (the repair stage, or whichever stage of a layout computes REPAIR_SCORE).

    In ``execute()``: after the FIRE repair of a batch, ``record_batch(...)`` once; where the stage starts
    applying a direction version (also the one it loads at start), ``applied(...)``; where the store refuses
    something, ``store_error(...)``. In ``finalize()``: ``close()``.
    """

    def __init__(self, pb_utils: Any, model: str, model_instance: str, *, layout: str | None = None,
                 config: MetricsConfig | None = None) -> None:
        labels = {MODEL_LABEL: model, INSTANCE_LABEL: model_instance}
        if layout is not None:
            labels[LAYOUT_LABEL] = layout
        super().__init__(pb_utils, labels, BATCH_FAMILIES, config or MetricsConfig())
        self._edges = np.asarray(self.config.score_buckets, dtype=np.float64)
        self._le = [le_label(b) for b in (*self.config.score_buckets, math.inf)]
        for family in (REQUESTS_TOTAL, SAMPLES_TOTAL, FLAGGED_SAMPLES_TOTAL, BYPASSED_REQUESTS_TOTAL, SCORE_COUNT,
                       SCORE_SUM, APPLIED_VERSION, STORE_DEGRADED, REPAIR_UNAVAILABLE):
            self._create(family)
        self._create(APPLY_LAG_SECONDS).set(math.nan)
        for le in self._le:
            self._create(SCORE_BUCKET, le=le)
        self._tally = _BatchTally()
        self._score_total = 0.0
        self._start()

    def record_batch(self, n_requests: int, scores: Any, flagged: Any, bypassed_requests: int = 0) -> None:
        """One scored batch: ``scores`` holds one REPAIR_SCORE per sample (numpy array or torch tensor, any
        device; first dimension = samples), ``flagged`` the FLAGGED mask (same length) or the count of flagged
        samples, and ``bypassed_requests`` how many of the ``n_requests`` asked for ``fire_bypass``.

        Cost: a few integer additions and two references kept until the next flush (do not modify the
        tensors in place afterwards). Nothing is reduced, synchronised or sent here.
        """
        n_samples = scores.shape[0]  # not len(): torch's __len__ is Python code
        if not 0 <= bypassed_requests <= n_requests or (n_requests == 0) != (n_samples == 0):
            raise ValueError(f"record_batch: {n_requests} requests, {bypassed_requests} bypassed, "
                             f"{n_samples} samples do not add up")
        counted = isinstance(flagged, (int, np.integer))
        if counted and not 0 <= flagged <= n_samples:
            raise ValueError(f"record_batch: {flagged} flagged of {n_samples} samples")
        if not counted and flagged.shape[0] != n_samples:
            raise ValueError(f"record_batch: {flagged.shape[0]} flags for {n_samples} scores")
        with self._lock:
            tally = self._tally
            tally.requests += n_requests
            tally.samples += n_samples
            tally.bypassed += bypassed_requests
            if counted:
                tally.flagged += int(flagged)
            tally.batches.append((scores, None if counted else flagged))
            pending = len(tally.batches)
            if pending >= _MAX_PENDING_BATCHES:
                tally.reduce(self._edges)
        if pending == _FLUSH_EARLY_BATCHES:
            self._wake.set()

    def applied(self, version: int, committed_at: float | None = None) -> None:
        """This instance now applies ``version``; ``committed_at`` (seconds since the epoch: the time of the
        history line that made it live) gives the propagation lag. Pass None for the version loaded at start,
        which was not a propagation. Sent at once (wakes the flusher)."""
        if version < 0:
            raise ValueError(f"applied: version must be >= 0, got {version}")
        lag = None if committed_at is None else max(0.0, time.time() - committed_at)  # clock skew: never < 0
        with self._lock:
            self._tally.version = int(version)
            if lag is not None:
                self._tally.lag_s = lag
        self._wake.set()

    def store_state(self, degraded: bool, unavailable: bool) -> None:
        """What this instance sees of the store: ``degraded`` (missing, unreadable, damaged, unreachable: it keeps
        its verified version) and ``unavailable`` (no verified version: it refuses requests). Sent at once."""
        with self._lock:
            self._tally.store = (bool(degraded), bool(unavailable))
        self._wake.set()

    def _drain(self) -> list[tuple[Any, str, float]]:
        with self._lock:
            tally, self._tally = self._tally, _BatchTally()
        tally.reduce(self._edges)
        calls: list[tuple[Any, str, float]] = [
            (self._series(REQUESTS_TOTAL), "increment", tally.requests),
            (self._series(SAMPLES_TOTAL), "increment", tally.samples),
            (self._series(FLAGGED_SAMPLES_TOTAL), "increment", tally.flagged),
            (self._series(BYPASSED_REQUESTS_TOTAL), "increment", tally.bypassed),
        ]
        if tally.bucket_counts is not None:
            cumulative = np.cumsum(tally.bucket_counts)
            calls += [(self._series(SCORE_BUCKET, le=le), "increment", float(n))
                      for le, n in zip(self._le, cumulative, strict=True)]
            calls.append((self._series(SCORE_COUNT), "increment", float(cumulative[-1])))
            if tally.score_sum:
                self._score_total += tally.score_sum
                calls.append((self._series(SCORE_SUM), "set", self._score_total))
        if tally.version is not None:
            calls.append((self._series(APPLIED_VERSION), "set", float(tally.version)))
        if tally.lag_s is not None:
            calls.append((self._series(APPLY_LAG_SECONDS), "set", tally.lag_s))
        if tally.store is not None:
            calls += [(self._series(STORE_DEGRADED), "set", float(tally.store[0])),
                      (self._series(REPAIR_UNAVAILABLE), "set", float(tally.store[1]))]
        return calls


class ControlMetrics(_Exporter):
    """The control stage's metrics: actions by result, the store's live version and whether it is degraded, store
    errors.

    ``actions`` are the controller's action names (one series per action and result, all created at 0);
    ``store_view``, when given, returns (the committed live version or None when the store cannot say, whether the
    store is degraded); the flusher reads it every ``flush_interval_s`` and after every action, so the gauges follow
    commits made through other servers sharing the store, and damage nobody is writing.
    """

    def __init__(self, pb_utils: Any, model: str, model_instance: str, actions: Sequence[str], *,
                 store_view: Callable[[], tuple[int | None, bool]] | None = None,
                 config: MetricsConfig | None = None) -> None:
        super().__init__(pb_utils, {MODEL_LABEL: model, INSTANCE_LABEL: model_instance}, CONTROL_FAMILIES,
                         config or MetricsConfig())
        self.actions = tuple(dict.fromkeys((*actions, OTHER_ACTION)))
        for action in self.actions:
            for result in CONTROL_RESULTS:
                self._create(CONTROL_ACTIONS_TOTAL, action=action, result=result)
        self._create(LIVE_VERSION)
        self._create(STORE_DEGRADED)
        self._store_view = store_view
        self._live_sent: int | None = None
        self._degraded_sent: bool | None = None
        self._actions: Counter = Counter()
        self._start()

    def control(self, action: str, result: str) -> None:
        """One control action ended with ``result`` (one of CONTROL_RESULTS); an action name the controller
        does not know counts as ``other``. Sent at once (wakes the flusher)."""
        if result not in CONTROL_RESULTS:
            raise ValueError(f"control: result must be one of {', '.join(CONTROL_RESULTS)}, got {result!r}")
        with self._lock:
            self._actions[action if action in self.actions else OTHER_ACTION, result] += 1
        self._wake.set()

    def _drain(self) -> list[tuple[Any, str, float]]:
        with self._lock:
            actions, self._actions = self._actions, Counter()
        calls: list[tuple[Any, str, float]] = [
            (self._series(CONTROL_ACTIONS_TOTAL, action=a, result=r), "increment", n) for (a, r), n in actions.items()
        ]
        if self._store_view is not None:
            try:
                live, degraded = self._store_view()
            except Exception as exc:  # e.g. an engine away: the store cannot be read, so it is degraded
                LOG.warning("metrics: could not read the store: %s", exc)
                live, degraded = None, True
            if live is not None and live != self._live_sent:  # unknown: keep the last value
                self._live_sent = live
                calls.append((self._series(LIVE_VERSION), "set", float(live)))
            if degraded != self._degraded_sent:
                self._degraded_sent = degraded
                calls.append((self._series(STORE_DEGRADED), "set", float(degraded)))
        return calls
