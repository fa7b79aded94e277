"""Live defense accuracy under load: CA on clean traffic, PA and ASR on poisoned traffic, flagged rates.

Counted from the responses and the known labels, per traffic kind, twice: since the start (or Locust's reset),
and over a sliding window of the last ``WINDOW_S`` seconds, so that a change of the served model (say, after
``fire ctl observe``) shows at once in the current figures while the cumulative ones lag behind.

The window is the one Locust uses for its own "current" figures (RPS, percentiles): 10 s. Counts are kept in
one bucket per wall-clock second, the way Locust keeps requests per second; the window is the ``WINDOW_S``
buckets that end at the newest one (which may still be filling: the figures are ratios, so a partial second
does not bias them). It ends at the newest traffic rather than at "now" so that, as with Locust's current RPS,
the figures of a stopped test stay readable. Workers ship their buckets to the master inside Locust's own
stats reports, so distributed figures are those of all workers together.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np

from fire_backend.wire.client import InferResult

TRAFFIC_KINDS = ("clean", "poisoned")
COUNTERS = ("requests", "samples", "correct", "non_target", "target_hits", "flagged", "flag_known")
#: seconds of the sliding window of the "current" figures (Locust's own current window)
WINDOW_S = 10
#: seconds between two points of the over-time history (the web UI's refresh period)
HISTORY_INTERVAL_S = 2.0
#: history points kept (12 hours at one point every 2 s); older points are dropped first
HISTORY_POINTS = 21600
#: the rates of one set of counts, keyed as in the rows
RATES = ("ca_or_pa", "asr", "flagged_rate")
#: a row: traffic, cumulative counts and rates, the same rates over the window, then the raw cumulative counts
ROW_KEYS = ("traffic", "requests", "samples", *RATES, "window_samples", *(f"{r}_current" for r in RATES),
            *COUNTERS[2:])

Counts = dict[str, dict[str, int]]  # traffic kind -> counter -> value


def empty_counts() -> Counts:
    return {kind: dict.fromkeys(COUNTERS, 0) for kind in TRAFFIC_KINDS}


def add_counts(into: Counts, counts: Counts) -> None:
    """Add ``counts`` into ``into``; unknown traffic kinds and counters are ignored (a newer worker's extras)."""
    for kind, values in counts.items():
        if kind in into:
            for key in COUNTERS:
                into[kind][key] += int(values.get(key, 0))


def rates(c: dict[str, int]) -> dict[str, float | None]:
    """ca_or_pa (CA on clean, PA on poisoned), asr, flagged_rate; None where the denominator is 0 (no data)."""
    return {
        "ca_or_pa": c["correct"] / c["samples"] if c["samples"] else None,
        "asr": c["target_hits"] / c["non_target"] if c["non_target"] else None,
        "flagged_rate": c["flagged"] / c["flag_known"] if c["flag_known"] else None,
    }


class DefenseStats:
    """Cumulative counts, per-second buckets for the window, and the over-time history of the rows.

    Greenlet-safe (nothing inside yields), with a lock for the web UI and the report handlers. On a worker, only
    ``record`` and ``pop`` are used: ``pop`` hands over the buckets since the last report and starts afresh.
    """

    def __init__(self, window_s: int = WINDOW_S, history_points: int = HISTORY_POINTS) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        self._totals = empty_counts()
        self._seconds: dict[int, Counts] = {}
        self._history: deque[tuple[float, list[dict]]] = deque(maxlen=history_points)

    def record(self, kind: str, y: np.ndarray, result: InferResult, target: int, at: float | None = None) -> None:
        """Count one answered request of true labels ``y`` at time ``at`` (default: now)."""
        pred = result.labels
        non_target = y != target
        counts = dict.fromkeys(COUNTERS, 0)
        counts.update(requests=1, samples=len(y), correct=int((pred == y).sum()), non_target=int(non_target.sum()),
                      target_hits=int(((pred == target) & non_target).sum()))
        if result.flagged is not None:
            counts.update(flag_known=len(y), flagged=int(result.flagged.sum()))
        with self._lock:
            add_counts(self._totals, {kind: counts})
            self._add_second(int(time.time() if at is None else at), {kind: counts})

    def merge(self, report: dict | None) -> None:
        """Add a worker's ``pop()``: its totals, and its per-second counts to the window."""
        if not report:
            return
        with self._lock:
            add_counts(self._totals, report.get("totals") or {})
            for second, counts in (report.get("seconds") or {}).items():
                self._add_second(int(second), counts)

    def _add_second(self, second: int, counts: Counts) -> None:
        # Buckets that left the window are dropped; a late one (a slow worker's) only counts in the totals.
        newest = max(second, *self._seconds) if self._seconds else second
        if second > newest - self.window_s:
            add_counts(self._seconds.setdefault(second, empty_counts()), counts)
        for old in [s for s in self._seconds if s <= newest - self.window_s]:
            del self._seconds[old]

    def pop(self) -> dict:
        """Totals and per-second counts since the last pop (a worker's report to the master), starting afresh."""
        with self._lock:
            report = {"totals": self._totals, "seconds": self._seconds}
            self._totals, self._seconds = empty_counts(), {}
        return report

    def reset(self) -> None:
        """Back to nothing, history included (as Locust's reset clears its own stats and chart history)."""
        with self._lock:
            self._totals, self._seconds = empty_counts(), {}
            self._history.clear()

    def snapshot(self) -> Counts:
        """Cumulative counts."""
        with self._lock:
            return {kind: dict(values) for kind, values in self._totals.items()}

    def window(self) -> Counts:
        """Counts of the last ``window_s`` buckets, ending at the newest one."""
        with self._lock:
            total = empty_counts()
            if self._seconds:
                newest = max(self._seconds)
                for second, counts in self._seconds.items():
                    if second > newest - self.window_s:
                        add_counts(total, counts)
            return total

    def rows(self) -> list[dict]:
        """One row per traffic kind with ``ROW_KEYS``: cumulative counts and rates, then the window's."""
        totals, current = self.snapshot(), self.window()
        rows = []
        for kind in TRAFFIC_KINDS:
            c, w = totals[kind], current[kind]
            rows.append({
                "traffic": kind, "requests": c["requests"], "samples": c["samples"], **rates(c),
                "window_samples": w["samples"], **{f"{k}_current": v for k, v in rates(w).items()},
                **{k: c[k] for k in COUNTERS[2:]},
            })
        return rows

    def add_history_point(self, at: float | None = None) -> None:
        """Append the current rows to the over-time history (once per ``HISTORY_INTERVAL_S`` while running)."""
        point = (time.time() if at is None else at, self.rows())
        with self._lock:
            self._history.append(point)

    def history(self) -> list[tuple[float, list[dict]]]:
        with self._lock:
            return list(self._history)
