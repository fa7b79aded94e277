"""Live defense accuracy under load: CA on clean traffic, PA and ASR on poisoned traffic, flagged rates.

Counted from the responses and the known labels, per traffic kind, and shown wherever Locust shows its own
numbers: the web UI (a tab, ``/fire/defense``), the ``--csv`` files (``PREFIX_defense.csv``) and the ``--html``
report. Workers ship their counts inside Locust's own stats reports, so distributed totals match Locust's.
"""

from __future__ import annotations

import csv
import html
import io
import json
import threading

import numpy as np

from fire_backend.wire.client import InferResult

TRAFFIC_KINDS = ("clean", "poisoned")
COUNTERS = ("requests", "samples", "correct", "non_target", "target_hits", "flagged", "flag_known")
#: the documented PREFIX_defense.csv columns, then the raw counts they come from
CSV_COLUMNS = ("traffic", "requests", "samples", "ca_or_pa", "asr", "flagged_rate", *COUNTERS[2:])
#: key of the worker -> master report entry
REPORT_KEY = "fire_defense"
#: ``--csv PREFIX`` writes the table to PREFIX + this
DEFENSE_CSV_SUFFIX = "_defense.csv"
WEB_UI_KEY = "fire-defense"


class DefenseStats:
    """Counters per traffic kind; greenlet-safe (no yields inside), with a lock for the web and report threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = self._empty()

    @staticmethod
    def _empty() -> dict[str, dict[str, int]]:
        return {kind: dict.fromkeys(COUNTERS, 0) for kind in TRAFFIC_KINDS}

    def record(self, kind: str, y: np.ndarray, result: InferResult, target: int) -> None:
        pred = result.labels
        non_target = y != target
        with self._lock:
            c = self._counts[kind]
            c["requests"] += 1
            c["samples"] += len(y)
            c["correct"] += int((pred == y).sum())
            c["non_target"] += int(non_target.sum())
            c["target_hits"] += int(((pred == target) & non_target).sum())
            if result.flagged is not None:
                c["flag_known"] += len(y)
                c["flagged"] += int(result.flagged.sum())

    def merge(self, counts: dict | None) -> None:
        """Add a worker's counts (its ``pop()``); unknown kinds and keys are ignored."""
        if not counts:
            return
        with self._lock:
            for kind, values in counts.items():
                if kind in self._counts:
                    for key in COUNTERS:
                        self._counts[kind][key] += int(values.get(key, 0))

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {kind: dict(values) for kind, values in self._counts.items()}

    def pop(self) -> dict[str, dict[str, int]]:
        """Counts since the last pop (a worker's delta for the master), resetting them."""
        with self._lock:
            counts, self._counts = self._counts, self._empty()
        return counts

    def reset(self) -> None:
        self.pop()

    def rows(self) -> list[dict]:
        """One row per traffic kind: ca_or_pa (CA on clean, PA on poisoned), asr, flagged_rate (None if n/a)."""
        rows = []
        for kind, c in self.snapshot().items():
            rows.append({
                "traffic": kind,
                "requests": c["requests"],
                "samples": c["samples"],
                "ca_or_pa": c["correct"] / c["samples"] if c["samples"] else None,
                "asr": c["target_hits"] / c["non_target"] if c["non_target"] else None,
                "flagged_rate": c["flagged"] / c["flag_known"] if c["flag_known"] else None,
                **{k: c[k] for k in COUNTERS[2:]},
            })
        return rows


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def defense_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([_fmt(row[c]) for c in CSV_COLUMNS])
    return out.getvalue()


def defense_table(rows: list[dict]) -> str:
    lines = [f"{'traffic':10s} {'requests':>9s} {'samples':>9s} {'CA/PA':>7s} {'ASR':>7s} {'flagged':>8s}"]
    for r in rows:
        lines.append(f"{r['traffic']:10s} {r['requests']:9d} {r['samples']:9d} {_fmt(r['ca_or_pa']):>7s} "
                     f"{_fmt(r['asr']):>7s} {_fmt(r['flagged_rate']):>8s}")
    return "\n".join(lines)


def defense_html(rows: list[dict]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in CSV_COLUMNS[:6])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r[c]))}</td>" for c in CSV_COLUMNS[:6]) + "</tr>" for r in rows
    )
    return (f'<section id="{WEB_UI_KEY}" style="font-family:sans-serif;margin:2em">'
            "<h2>FIRE defense</h2><p>CA on clean traffic, PA and ASR on poisoned traffic, flagged rate of each.</p>"
            f'<table border="1" cellpadding="4" style="border-collapse:collapse"><tr>{head}</tr>{body}</table>'
            "</section>")


def extend_web_ui(web_ui, stats: DefenseStats) -> None:
    """A "FIRE defense" tab in Locust's web UI, live with the request stats, plus JSON and CSV endpoints."""
    from flask import Response, jsonify, request

    structure = [{"key": "traffic", "title": "Traffic"}, {"key": "requests", "title": "Requests"},
                 {"key": "samples", "title": "Samples"}, {"key": "ca_or_pa", "title": "CA (clean) / PA (poisoned)"},
                 {"key": "asr", "title": "ASR"}, {"key": "flagged_rate", "title": "Flagged rate"}]
    web_ui.template_args["extended_tabs"] = [{"title": "FIRE defense", "key": WEB_UI_KEY}]
    web_ui.template_args["extended_tables"] = [{"key": WEB_UI_KEY, "structure": structure}]
    web_ui.template_args["extended_csv_files"] = [{"href": "./fire/defense/csv", "title": "Download FIRE defense CSV"}]

    @web_ui.app.route("/fire/defense")
    def fire_defense_json():
        return jsonify({"rows": stats.rows(), "counts": stats.snapshot()})

    @web_ui.app.route("/fire/defense/csv")
    def fire_defense_csv():
        return Response(defense_csv(stats.rows()), mimetype="text/csv",
                        headers={"Content-Disposition": "attachment;filename=fire_defense.csv"})

    @web_ui.app.after_request
    def add_defense_to_stats(response):
        # The UI polls /stats/requests; extended tables are filled from its "extended_stats".
        if not request.path.endswith("/stats/requests") or response.status_code != 200:
            return response
        try:
            payload = json.loads(response.get_data())
        except ValueError:
            return response
        rows = [{k: _fmt(v) for k, v in row.items()} for row in stats.rows()]
        payload["extended_stats"] = [{"key": WEB_UI_KEY, "data": rows}]
        response.set_data(json.dumps(payload))
        return response


def extend_html_report(stats: DefenseStats) -> None:
    """Append the defense table to the --html report and the web UI's report download (once per process)."""
    import locust.main
    import locust.web

    for module in (locust.main, locust.web):
        original = getattr(module, "get_html_report", None)
        if original is None or getattr(original, "_fire_defense", False):
            continue

        def with_defense(*args, _original=original, **kwargs):
            report = _original(*args, **kwargs)
            table = defense_html(stats.rows())
            return report.replace("</body>", table + "</body>", 1) if "</body>" in report else report + table

        with_defense._fire_defense = True
        module.get_html_report = with_defense
