"""FIRE's metrics module against a faithful double of pb_utils' metric API (tests/unit/pb_metrics_double.py).

The double behaves as the real Triton 2.51 did when measured (and kills the "server" where the real one dies);
tests/integration/test_metrics_endpoint.py runs the same module inside the real tritonserver.
"""

from __future__ import annotations

import gc
import math
import threading
import time

import numpy as np
import pytest
import torch
from observability import Exposition
from pb_metrics_double import PbMetrics, ServerAborted, TritonModelException

from fire_backend import metric_families as mf
from fire_backend.stub import metrics as m

SLOW = m.MetricsConfig(flush_interval_s=3600.0)  # only explicit flushes (and wake-ups) send anything
BATCH_LABELS = {"model": "fire_repair", "model_instance": "fire_repair_0_0"}


def scrape(pb: PbMetrics) -> Exposition:
    return Exposition(pb.exposition())


def expected_buckets(scores: np.ndarray, bounds=mf.SCORE_BUCKETS) -> dict[str, float]:
    """Prometheus' definition, computed independently: bucket le counts the scores <= le (NaN only in +Inf),
    compared as doubles as Triton would (a float32 0.2 is 0.2000000029... and not <= 0.2)."""
    scores = np.asarray(scores, dtype=np.float64)
    out = {m.le_label(b): float(np.sum(scores <= b)) for b in bounds}
    out["+Inf"] = float(len(scores))
    return out


def wait_for(condition, what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.fixture
def pb() -> PbMetrics:
    return PbMetrics()


@pytest.fixture
def batch(pb: PbMetrics):
    exporter = m.BatchMetrics(pb, "fire_repair", "fire_repair_0_0", config=SLOW)
    yield exporter
    exporter.close()


# -- the catalogue ------------------------------------------------------------------------------------------

def test_families_follow_prometheus_conventions() -> None:
    names = [f.name for f in mf.FAMILIES]
    assert len(names) == len(set(names))
    for family in mf.FAMILIES:
        m.check_name(family.name)
        assert family.name.startswith("fire_")
        assert family.kind in (mf.COUNTER, mf.GAUGE)
        histogram_part = family.name.startswith(mf.SCORE_HISTOGRAM + "_")
        assert (family.kind == mf.COUNTER and not histogram_part) == family.name.endswith("_total"), family.name
        for label in (*mf.BASE_LABELS, *family.labels):
            m.check_name(label, label=True)
            assert label not in ("instance", "job"), "Prometheus reserves these for the scrape target"
    assert {f.name for f in mf.FAMILIES} == mf.exported_names()


@pytest.mark.parametrize(("name", "label", "message"), [
    ("fire-x", False, "not a valid Prometheus metric name"),
    ("9fire", False, "not a valid Prometheus metric name"),
    ("__name", True, "reserved"),
    ("bad-label", True, "not a valid Prometheus label name"),
])
def test_bad_names_are_refused_before_triton_sees_them(name: str, label: bool, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        m.check_name(name, label=label)


@pytest.mark.parametrize(("bound", "text"), [(0.5, "0.5"), (1.0, "1"), (-0.25, "-0.25"), (-0.0, "0"),
                                            (2.0, "2"), (math.inf, "+Inf"), (0.1, "0.1")])
def test_le_labels_are_spelled_as_prometheus_does(bound: float, text: str) -> None:
    assert m.le_label(bound) == text


@pytest.mark.parametrize("kwargs", [{"flush_interval_s": 0}, {"flush_interval_s": math.nan},
                                    {"score_buckets": ()}, {"score_buckets": (0.5, 0.5)},
                                    {"score_buckets": (1.0, 0.0)}, {"score_buckets": (0.0, math.inf)}])
def test_bad_configs_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        m.MetricsConfig(**kwargs)


# -- serving: record_batch --------------------------------------------------------------------------------

def test_every_series_exists_at_zero_from_the_start(pb: PbMetrics, batch: m.BatchMetrics) -> None:
    page = scrape(pb)
    for family in (mf.REQUESTS_TOTAL, mf.SAMPLES_TOTAL, mf.FLAGGED_SAMPLES_TOTAL, mf.BYPASSED_REQUESTS_TOTAL,
                   mf.SCORE_COUNT, mf.SCORE_SUM, mf.APPLIED_VERSION):
        assert page.one(family.name, **BATCH_LABELS) == 0.0
    assert math.isnan(page.one(mf.APPLY_LAG_SECONDS.name, **BATCH_LABELS))
    assert [s.labels["le"] for s in page.select(mf.SCORE_BUCKET.name)] == [*map(m.le_label, mf.SCORE_BUCKETS), "+Inf"]
    assert {s.labels["kind"] for s in page.select(mf.STORE_ERRORS_TOTAL.name)} == set(mf.STORE_ERROR_KINDS)
    assert page.types[mf.SCORE_BUCKET.name] == "counter" and page.types[mf.SCORE_SUM.name] == "gauge"


def test_a_known_mix_comes_out_exactly(pb: PbMetrics, batch: m.BatchMetrics) -> None:
    rng = np.random.default_rng(0)
    batches = [rng.normal(0.0, 0.3, 7), rng.normal(1.0, 0.2, 5), np.array([0.5, 2.0, -0.5, 3.0, -1.0])]
    for index, scores in enumerate(batches):
        batch.record_batch(n_requests=index + 1, scores=scores, flagged=scores > 0.5, bypassed_requests=index % 2)
    batch.flush()
    everything = np.concatenate(batches)
    page = scrape(pb)
    assert page.one(mf.REQUESTS_TOTAL.name) == 6
    assert page.one(mf.SAMPLES_TOTAL.name) == len(everything)
    assert page.one(mf.FLAGGED_SAMPLES_TOTAL.name) == np.sum(everything > 0.5)
    assert page.one(mf.BYPASSED_REQUESTS_TOTAL.name) == 1
    assert {s.labels["le"]: s.value for s in page.select(mf.SCORE_BUCKET.name)} == expected_buckets(everything)
    assert page.one(mf.SCORE_COUNT.name) == len(everything)
    assert page.one(mf.SCORE_SUM.name) == pytest.approx(everything.sum())

    # Deltas add up across flushes; a second mix lands on top of the first.
    more = np.array([0.05, 0.95, 1.1])
    batch.record_batch(2, torch.from_numpy(more).float(), 2, 2)
    batch.flush()
    page = scrape(pb)
    assert page.one(mf.REQUESTS_TOTAL.name) == 8 and page.one(mf.BYPASSED_REQUESTS_TOTAL.name) == 3
    assert page.one(mf.FLAGGED_SAMPLES_TOTAL.name) == np.sum(everything > 0.5) + 2
    both = np.concatenate([everything, more.astype(np.float32)])
    assert {s.labels["le"]: s.value for s in page.select(mf.SCORE_BUCKET.name)} == expected_buckets(both)
    assert page.one(mf.SCORE_SUM.name) == pytest.approx(both.sum(), rel=1e-6)


def test_torch_tensors_of_any_float_dtype_and_bool_masks(pb: PbMetrics, batch: m.BatchMetrics) -> None:
    scores = torch.tensor([0.0, 0.45, 0.55, 1.0], dtype=torch.float16)
    batch.record_batch(1, scores, scores > 0.5)
    batch.flush()
    page = scrape(pb)
    assert page.one(mf.FLAGGED_SAMPLES_TOTAL.name) == 2
    assert {s.labels["le"]: s.value for s in page.select(mf.SCORE_BUCKET.name)} == \
        expected_buckets(scores.float().numpy())


def test_batches_of_different_shapes_and_kinds_between_two_flushes(pb: PbMetrics, batch: m.BatchMetrics) -> None:
    parts = [torch.tensor([[0.2], [0.9]]), torch.tensor([1.5]), np.array([-0.3, 0.6])]  # [N, 1], [N], numpy
    for part in parts:
        batch.record_batch(1, part, part > 0.5)
    batch.flush()
    everything = np.concatenate([np.asarray(p).reshape(-1).astype(np.float64) for p in parts])
    page = scrape(pb)
    assert page.one(mf.FLAGGED_SAMPLES_TOTAL.name) == 3
    assert {s.labels["le"]: s.value for s in page.select(mf.SCORE_BUCKET.name)} == expected_buckets(everything)


def test_non_finite_scores_never_poison_the_sum(pb: PbMetrics, batch: m.BatchMetrics) -> None:
    scores = np.array([np.nan, np.inf, -np.inf, 0.25])
    batch.record_batch(1, scores, 0)
    batch.flush()
    page = scrape(pb)
    buckets = {s.labels["le"]: s.value for s in page.select(mf.SCORE_BUCKET.name)}
    assert buckets["-0.5"] == 1 and buckets["0.3"] == 2 and buckets["2"] == 2 and buckets["+Inf"] == 4
    assert page.one(mf.SCORE_SUM.name) == 0.25 and page.one(mf.SCORE_COUNT.name) == 4


def test_negative_scores_lower_the_sum_without_a_negative_increment(pb: PbMetrics, batch: m.BatchMetrics) -> None:
    batch.record_batch(1, np.array([-0.4, -0.3]), 0)
    batch.flush()  # the double raises ServerAborted on a negative counter increment
    assert scrape(pb).one(mf.SCORE_SUM.name) == pytest.approx(-0.7)


@pytest.mark.parametrize(("args", "message"), [
    ((2, np.zeros(3), 0, 3), "do not add up"),
    ((0, np.zeros(3), 0, 0), "do not add up"),
    ((1, np.zeros(0), 0, 0), "do not add up"),
    ((1, np.zeros(3), 4, 0), "4 flagged of 3"),
    ((1, np.zeros(3), np.zeros(2, bool), 0), "2 flags for 3 scores"),
])
def test_inconsistent_batches_are_refused_and_change_nothing(pb, batch, args, message) -> None:
    with pytest.raises(ValueError, match=message):
        batch.record_batch(*args)
    batch.flush()
    assert scrape(pb).one(mf.REQUESTS_TOTAL.name) == 0


def test_record_batch_never_calls_triton_and_a_flush_is_few_calls(pb: PbMetrics, batch: m.BatchMetrics) -> None:
    before = pb.total_calls
    for _ in range(50):
        batch.record_batch(4, np.linspace(-1, 3, 64), 10, 1)
    assert pb.total_calls == before
    batch.flush()
    sent = pb.total_calls - before
    assert sent <= len(mf.SCORE_BUCKETS) + 1 + 7, sent
    batch.flush()
    assert pb.total_calls - before == sent, "an idle flush sends nothing"


def test_heavy_traffic_wakes_the_flusher_early(pb: PbMetrics, batch: m.BatchMetrics) -> None:
    for _ in range(m._FLUSH_EARLY_BATCHES):  # noqa: SLF001
        batch.record_batch(1, np.array([0.7]), 1)
    wait_for(lambda: scrape(pb).one(mf.REQUESTS_TOTAL.name) == m._FLUSH_EARLY_BATCHES, "no early flush")  # noqa: SLF001


def test_a_stuck_flusher_bounds_memory_and_loses_nothing(pb: PbMetrics, batch: m.BatchMetrics,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(m, "_MAX_PENDING_BATCHES", 100)
    monkeypatch.setattr(m, "_FLUSH_EARLY_BATCHES", 10**9)
    for i in range(1000):
        batch.record_batch(1, np.array([i % 3 * 0.5]), int(i % 3 == 2))
    assert len(batch._tally.batches) < 100  # noqa: SLF001 -- bounded memory is the point
    batch.flush()
    page = scrape(pb)
    assert page.one(mf.SAMPLES_TOTAL.name) == 1000 and page.one(mf.FLAGGED_SAMPLES_TOTAL.name) == 333
    buckets = {s.labels["le"]: s.value for s in page.select(mf.SCORE_BUCKET.name)}
    assert buckets["0"] == 334 and buckets["0.5"] == 667 and buckets["1"] == 1000


def test_layout_label_when_given(pb: PbMetrics) -> None:
    exporter = m.BatchMetrics(pb, "fire_ensemble", "fire_ensemble_0_0", layout="fused", config=SLOW)
    exporter.record_batch(1, np.array([1.0]), 1)
    exporter.flush()
    assert scrape(pb).one(mf.FLAGGED_SAMPLES_TOTAL.name, layout="fused", model="fire_ensemble") == 1
    exporter.close()


# -- versions and lag ---------------------------------------------------------------------------------------

def test_applied_version_and_lag(pb: PbMetrics, batch: m.BatchMetrics) -> None:
    batch.applied(3)  # the version loaded at start: no propagation, so no lag
    batch.flush()
    page = scrape(pb)
    assert page.one(mf.APPLIED_VERSION.name) == 3 and math.isnan(page.one(mf.APPLY_LAG_SECONDS.name))
    batch.applied(4, committed_at=time.time() - 2.5)
    batch.flush()
    page = scrape(pb)
    assert page.one(mf.APPLIED_VERSION.name) == 4
    assert 2.5 <= page.one(mf.APPLY_LAG_SECONDS.name) < 3.5
    batch.applied(5, committed_at=time.time() + 60)  # a writer's clock ahead of ours
    batch.flush()
    assert scrape(pb).one(mf.APPLY_LAG_SECONDS.name) == 0.0
    with pytest.raises(ValueError):
        batch.applied(-1)


def test_a_version_change_reaches_triton_without_waiting_for_the_interval(pb: PbMetrics, batch: m.BatchMetrics) -> None:
    batch.applied(7, committed_at=time.time())
    wait_for(lambda: scrape(pb).one(mf.APPLIED_VERSION.name) == 7, "the flusher was not woken")


def test_the_flusher_sends_on_its_own(pb: PbMetrics) -> None:
    exporter = m.BatchMetrics(pb, "fire_repair", "fire_repair_0_1", config=m.MetricsConfig(flush_interval_s=0.05))
    exporter.record_batch(3, np.array([0.1, 0.9]), 1)
    wait_for(lambda: scrape(pb).one(mf.REQUESTS_TOTAL.name) == 3, "nothing flushed")
    assert pb.calls["fire-metrics-fire_repair_0_1"] > 0, "the flusher thread, not the caller, talks to Triton"
    exporter.close()


def test_under_traffic_only_the_serving_thread_talks_to_triton(pb: PbMetrics) -> None:
    """Triton calls from the flusher thread during batches crashed tritonserver 2.51 under frequent version
    changes; while the stage serves, what is due goes out at the end of a batch, on the serving thread."""
    flusher, serving = "fire-metrics-fire_repair_0_2", threading.current_thread().name
    exporter = m.BatchMetrics(pb, "fire_repair", "fire_repair_0_2", config=m.MetricsConfig(flush_interval_s=0.05))
    time.sleep(0.2)  # the flusher's first flush, at start (all at 0: it may send nothing)
    from_flusher, from_serving = pb.calls[flusher], pb.calls[serving]
    batches, deadline = 0, time.monotonic() + 0.6
    while time.monotonic() < deadline:
        with exporter.serving():
            batches += 1
            exporter.record_batch(1, np.array([0.9]), 1)
            exporter.applied(batches, committed_at=time.time())  # wakes the flusher: it must still keep out
        time.sleep(0.01)  # well inside the interval: the stage is busy throughout
    assert pb.calls[flusher] == from_flusher, "the flusher thread called Triton while the stage was serving"
    assert pb.calls[serving] > from_serving
    page = scrape(pb)
    assert page.one(mf.REQUESTS_TOTAL.name) == batches and page.one(mf.APPLIED_VERSION.name) == batches
    exporter.record_batch(2, np.array([0.1]), 0)  # then idle: the flusher takes over
    wait_for(lambda: scrape(pb).one(mf.REQUESTS_TOTAL.name) == batches + 2, "the idle stage's metrics were not sent")
    assert pb.calls[flusher] > from_flusher
    exporter.close()


def test_store_errors_by_kind(pb: PbMetrics, batch: m.BatchMetrics) -> None:
    batch.store_error(mf.STORE_CHECKSUM)
    batch.store_error(mf.STORE_CHECKSUM)
    batch.store_error(mf.STORE_TORN_LINE)
    with pytest.raises(ValueError, match="kind must be one of"):
        batch.store_error("disk_on_fire")
    batch.flush()
    page = scrape(pb)
    assert page.one(mf.STORE_ERRORS_TOTAL.name, kind="checksum") == 2
    assert page.one(mf.STORE_ERRORS_TOTAL.name, kind="torn_line") == 1
    assert page.one(mf.STORE_ERRORS_TOTAL.name, kind="unreadable_pointer") == 0


# -- threads, lifetime ----------------------------------------------------------------------------------------

def in_threads(work, n: int) -> list[BaseException]:
    """Run ``work`` in ``n`` threads at once; what each raised (ServerAborted included)."""
    raised: list[BaseException] = []

    def guarded() -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 -- ServerAborted is a BaseException on purpose
            raised.append(exc)

    threads = [threading.Thread(target=guarded) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return raised


def test_the_double_kills_the_server_when_one_metric_is_shared_by_two_threads() -> None:
    """The hazard the module's IPC lock exists for is real in the double (else the next test proves nothing)."""
    pb = PbMetrics(latency_s=0.002)
    counter = pb.MetricFamily("x_total", "x", pb.MetricFamily.COUNTER).Metric(labels={"a": "b"})

    def hammer() -> None:
        for _ in range(50):
            counter.increment(1)

    raised = in_threads(hammer, 3)
    assert raised and all(isinstance(exc, ServerAborted) for exc in raised)


def test_flushes_from_two_threads_never_overlap_on_one_metric() -> None:
    pb = PbMetrics(latency_s=0.0001)
    exporter = m.BatchMetrics(pb, "fire_repair", "fire_repair_0_0", config=m.MetricsConfig(flush_interval_s=0.001))

    def serve() -> None:
        for _ in range(100):
            exporter.record_batch(2, np.array([0.2, 0.8]), 1, 1)
            exporter.flush()  # races the flusher thread on purpose

    assert in_threads(serve, 2) == []
    exporter.flush()
    page = scrape(pb)
    assert page.one(mf.REQUESTS_TOTAL.name) == 400 and page.one(mf.FLAGGED_SAMPLES_TOTAL.name) == 200
    exporter.close()


def test_close_keeps_every_series(pb: PbMetrics) -> None:
    exporter = m.BatchMetrics(pb, "fire_repair", "fire_repair_0_0", config=SLOW)
    before = [(sample.name, sample.labels) for sample in scrape(pb).samples]
    assert scrape(pb).select(mf.REQUESTS_TOTAL.name)
    exporter.close()
    gc.collect()
    assert [(sample.name, sample.labels) for sample in scrape(pb).samples] == before
    assert pb.warnings == []


def test_a_reloaded_instance_counts_on_after_its_predecessor_closes(pb: PbMetrics) -> None:
    """A reload: the new copy's instance (same model, same instance name, a stub of its own) creates its series
    while the old copy still runs, then the old copy finalizes. Deleting the old handles would free the series the
    new copy updates (Triton 2.51; the double raises ServerAborted): they are retained instead."""
    old = m.BatchMetrics(pb, "fire_repair", "fire_repair_0_0", config=SLOW)
    old.record_batch(2, np.array([1.0, 0.0]), 1)
    old.flush()
    new = m.BatchMetrics(pb, "fire_repair", "fire_repair_0_0", config=SLOW)
    old.close()
    del old
    gc.collect()
    new.record_batch(3, np.array([0.0, 0.0, 1.0]), 1)
    new.applied(4)
    new.flush()
    page = scrape(pb)
    assert page.one(mf.REQUESTS_TOTAL.name, model_instance="fire_repair_0_0") == 5
    assert page.one(mf.APPLIED_VERSION.name, model_instance="fire_repair_0_0") == 4
    new.close()


def test_two_instances_keep_their_own_series(pb: PbMetrics) -> None:
    a = m.BatchMetrics(pb, "fire_repair", "fire_repair_0_0", config=SLOW)
    b = m.BatchMetrics(pb, "fire_repair", "fire_repair_0_1", config=SLOW)
    a.record_batch(2, np.array([1.0, 1.0]), 2)
    b.record_batch(1, np.array([0.0]), 0)
    a.applied(2)
    b.applied(1)
    a.flush()
    b.flush()
    page = scrape(pb)
    assert page.total(mf.REQUESTS_TOTAL.name, model="fire_repair") == 3
    assert page.one(mf.APPLIED_VERSION.name, model_instance="fire_repair_0_0") == 2
    assert page.one(mf.APPLIED_VERSION.name, model_instance="fire_repair_0_1") == 1
    b.close()
    assert page.one(mf.REQUESTS_TOTAL.name, model_instance="fire_repair_0_0") == 2
    a.close()


def test_a_refused_call_is_logged_and_the_rest_still_goes_out(pb: PbMetrics, batch: m.BatchMetrics,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    requests = batch._series(mf.REQUESTS_TOTAL)  # noqa: SLF001

    def refuse(value: float) -> None:
        raise TritonModelException("Failed to increment metric value")

    monkeypatch.setattr(requests, "increment", refuse)
    batch.record_batch(1, np.array([0.9]), 1)
    batch.flush()
    assert scrape(pb).one(mf.FLAGGED_SAMPLES_TOTAL.name) == 1


# -- control --------------------------------------------------------------------------------------------------

ACTIONS = ("status", "push", "observe", "rollback", "history")


def test_control_actions_by_action_and_result(pb: PbMetrics) -> None:
    live = {"version": 0}
    exporter = m.ControlMetrics(pb, "fire_control", "fire_control_0_0", ACTIONS,
                                store_view=lambda: (live["version"], False), config=SLOW)
    page = scrape(pb)
    assert len(page.select(mf.CONTROL_ACTIONS_TOTAL.name)) == (len(ACTIONS) + 1) * len(mf.CONTROL_RESULTS)
    assert page.total(mf.CONTROL_ACTIONS_TOTAL.name) == 0
    exporter.control("push", mf.RESULT_OK)
    exporter.control("push", mf.RESULT_REFUSED_VALIDATION)
    exporter.control("status", mf.RESULT_REFUSED_AUTH)
    exporter.control("rm -rf /", mf.RESULT_REFUSED_VALIDATION)  # client-chosen text never becomes a label
    with pytest.raises(ValueError, match="result must be one of"):
        exporter.control("push", "maybe")
    live["version"] = 4
    exporter.flush()
    page = scrape(pb)
    assert page.one(mf.CONTROL_ACTIONS_TOTAL.name, action="push", result="ok") == 1
    assert page.one(mf.CONTROL_ACTIONS_TOTAL.name, action="push", result="refused_validation") == 1
    assert page.one(mf.CONTROL_ACTIONS_TOTAL.name, action="status", result="refused_auth") == 1
    assert page.one(mf.CONTROL_ACTIONS_TOTAL.name, action=mf.OTHER_ACTION, result="refused_validation") == 1
    assert page.total(mf.CONTROL_ACTIONS_TOTAL.name) == 4
    assert page.one(mf.LIVE_VERSION.name) == 4
    exporter.close()


def test_live_version_and_degraded_follow_the_store_and_survive_a_failing_read(pb: PbMetrics) -> None:
    reads = iter([(2, False), OSError("engine away"), (None, True), (3, False)])

    def read() -> tuple[int | None, bool]:
        value = next(reads)
        if isinstance(value, Exception):
            raise value
        return value

    exporter = m.ControlMetrics(pb, "fire_control", "fire_control_0_0", ACTIONS, store_view=read, config=SLOW)
    wait_for(lambda: scrape(pb).one(mf.LIVE_VERSION.name) == 2, "the first flush runs at start")
    assert scrape(pb).one(mf.STORE_DEGRADED.name) == 0
    exporter.flush()
    page = scrape(pb)
    assert page.one(mf.LIVE_VERSION.name) == 2, "a failed read keeps the last version"
    assert page.one(mf.STORE_DEGRADED.name) == 1, "and says the store is degraded"
    exporter.flush()
    page = scrape(pb)
    assert page.one(mf.LIVE_VERSION.name) == 2 and page.one(mf.STORE_DEGRADED.name) == 1  # a store that cannot say
    exporter.flush()
    page = scrape(pb)
    assert page.one(mf.LIVE_VERSION.name) == 3 and page.one(mf.STORE_DEGRADED.name) == 0  # recovered
    exporter.close()


def test_an_instance_says_whether_the_store_is_degraded_and_whether_it_is_unavailable(
        pb: PbMetrics, batch: m.BatchMetrics) -> None:
    batch.flush()
    assert scrape(pb).one(mf.STORE_DEGRADED.name) == 0 and scrape(pb).one(mf.REPAIR_UNAVAILABLE.name) == 0
    batch.store_state(True, True)
    batch.flush()
    assert scrape(pb).one(mf.STORE_DEGRADED.name) == 1 and scrape(pb).one(mf.REPAIR_UNAVAILABLE.name) == 1
    batch.store_state(True, False)
    batch.flush()
    assert scrape(pb).one(mf.STORE_DEGRADED.name) == 1 and scrape(pb).one(mf.REPAIR_UNAVAILABLE.name) == 0


def test_the_summary_shows_counters_that_moved_and_every_gauge(pb: PbMetrics, batch: m.BatchMetrics) -> None:
    batch.record_batch(2, np.array([0.1, 0.9, 0.8]), np.array([False, True, True]), 1)
    batch.applied(3)
    batch.flush()
    page = pb.exposition() + 'nv_inference_count{model="fire_ensemble",version="1"} 7\n'
    lines = mf.summary_lines(page)
    shown = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in lines}
    assert math.isnan(shown.pop(mf.APPLY_LAG_SECONDS.name))  # a gauge: shown even before any propagation
    assert shown == {mf.REQUESTS_TOTAL.name: 2, mf.SAMPLES_TOTAL.name: 3, mf.FLAGGED_SAMPLES_TOTAL.name: 2,
                     mf.BYPASSED_REQUESTS_TOTAL.name: 1, mf.APPLIED_VERSION.name: 3, mf.STORE_DEGRADED.name: 0,
                     mf.REPAIR_UNAVAILABLE.name: 0}
    assert len(lines) == 8  # no store error (all at 0), no bucket, no Triton metric, no HELP/TYPE line
