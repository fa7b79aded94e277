"""Per-sample latency and throughput, derived from Locust's own entry for each model.

Every request of a run carries ``--batch`` images (the master sends its options to the workers), so a sample's
latency is its request's latency divided by the batch, and each request stands for ``batch`` samples with that
latency: per-sample percentiles are exactly the request percentiles divided by the batch, and samples/s is
requests/s times the batch. Deriving them from Locust's entry, rather than logging each sample as a request
event of its own, keeps Locust's totals (the Aggregated row, the header's RPS) counting each request once, and
the per-sample figures follow everything Locust does with its entry: worker reports, RESET, its current window.

For exact per-request latencies (not Locust's two-significant-digit histogram) use ``--latency-file``, as
``fire bench`` does.
"""

from __future__ import annotations

from typing import Any

#: a row per Locust entry: its name and type, the batch, then per-sample figures (latencies in ms)
ROW_KEYS = ("name", "type", "batch", "requests", "failures", "samples", "samples_per_s_current", "samples_per_s",
            "p50_ms", "p95_ms", "p99_ms", "avg_ms", "min_ms", "max_ms")


def per_sample_row(entry: Any, batch: int) -> dict:
    """The per-sample row of one ``locust.stats.StatsEntry`` of requests of ``batch`` images each."""
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    answered = entry.num_requests - entry.num_none_requests
    per = 1.0 / batch
    return {
        "name": entry.name, "type": entry.method, "batch": batch, "requests": entry.num_requests,
        "failures": entry.num_failures, "samples": entry.num_requests * batch,
        "samples_per_s_current": entry.current_rps * batch, "samples_per_s": entry.total_rps * batch,
        "p50_ms": entry.median_response_time * per if answered else None,
        "p95_ms": entry.get_response_time_percentile(0.95) * per if answered else None,
        "p99_ms": entry.get_response_time_percentile(0.99) * per if answered else None,
        "avg_ms": entry.avg_response_time * per if answered else None,
        "min_ms": (entry.min_response_time or 0) * per if answered else None,
        "max_ms": entry.max_response_time * per if answered else None,
    }


def per_sample_rows(stats: Any, batch: int) -> list[dict]:
    """One row per entry of a ``locust.stats.RequestStats`` (Locust's Aggregated row left out), sorted by name."""
    return [per_sample_row(stats.entries[key], batch) for key in sorted(stats.entries)]
