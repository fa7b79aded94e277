"""How the FIRE figures look wherever Locust shows its own: console table, CSV, HTML, and the over-time chart.

Two tables, each defined once here and used by the web UI tabs, the ``--csv`` files, the ``--html`` report and the
end-of-run log: the defense table (``defense.DefenseStats.rows``) and the per-sample table
(``per_sample.per_sample_rows``). The chart is an SVG drawn from the defense history, the same picture in the web
UI's FIRE defense tab and in the HTML report.
"""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from fire_backend.loadtest import defense, per_sample

RATE = ".4f"
MS = ".3f"
PER_S = ".1f"


class Column(NamedTuple):
    key: str
    title: str
    fmt: str = RATE  # format of a float value; ints print as they are, None as an empty cell


@dataclass(frozen=True)
class Table:
    key: str  # web UI tab key and HTML id
    title: str
    caption: str
    columns: tuple[Column, ...]  # shown in the web UI, the HTML report and the log
    csv_keys: tuple[str, ...]  # every key, in CSV order

    def fmt(self, key: str, value) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            spec = next((c.fmt for c in self.columns if c.key == key), RATE)
            return format(value, spec)
        return str(value)

    def formatted(self, rows: Sequence[dict]) -> list[dict[str, str]]:
        return [{key: self.fmt(key, row.get(key)) for key in self.csv_keys} for row in rows]


_NOW = f"last {defense.WINDOW_S} s"
DEFENSE = Table(
    key="fire-defense", title="FIRE defense",
    caption=f"CA on clean traffic, PA and ASR on poisoned traffic, flagged rate of each: over the {_NOW} "
            "(current) and since the start or the last reset (total).",
    columns=(Column("traffic", "Traffic"), Column("requests", "Requests"), Column("samples", "Samples"),
             Column("ca_or_pa_current", f"CA/PA ({_NOW})"), Column("ca_or_pa", "CA/PA (total)"),
             Column("asr_current", f"ASR ({_NOW})"), Column("asr", "ASR (total)"),
             Column("flagged_rate_current", f"Flagged ({_NOW})"), Column("flagged_rate", "Flagged (total)")),
    csv_keys=defense.ROW_KEYS,
)
PER_SAMPLE = Table(
    key="fire-per-sample", title="FIRE per-sample",
    caption="Per-sample latency (request latency / images per request) and samples/s, from Locust's entry of each "
            "model; current samples/s over Locust's current window.",
    columns=(Column("name", "Name"), Column("batch", "Batch"), Column("samples", "Samples"),
             Column("samples_per_s_current", "Current samples/s", PER_S),
             Column("samples_per_s", "Samples/s (total)", PER_S), Column("p50_ms", "Median (ms)", MS),
             Column("p95_ms", "95%ile (ms)", MS), Column("p99_ms", "99%ile (ms)", MS),
             Column("avg_ms", "Average (ms)", MS), Column("min_ms", "Min (ms)", MS), Column("max_ms", "Max (ms)", MS)),
    csv_keys=per_sample.ROW_KEYS,
)
HISTORY_KEYS = ("timestamp", *defense.ROW_KEYS)


def to_csv(table: Table, rows: Sequence[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=table.csv_keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(table.formatted(rows))
    return out.getvalue()


def history_csv(history: Sequence[tuple[float, list[dict]]]) -> str:
    """The defense rows over time, like Locust's ``_stats_history.csv``: a Unix timestamp, then a defense row."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=HISTORY_KEYS, lineterminator="\n")
    writer.writeheader()
    for at, rows in history:
        for row in DEFENSE.formatted(rows):
            writer.writerow({"timestamp": f"{at:.3f}", **row})
    return out.getvalue()


def to_text(table: Table, rows: Sequence[dict]) -> str:
    cells = [[c.title for c in table.columns]]
    cells += [[table.fmt(c.key, row.get(c.key)) for c in table.columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(table.columns))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(line, widths, strict=True))) for line in cells)


def to_html(table: Table, rows: Sequence[dict]) -> str:
    head = "".join(f"<th>{html.escape(c.title)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(table.fmt(c.key, row.get(c.key)))}</td>"
                                    for c in table.columns) + "</tr>" for row in rows)
    return (f'<h2>{html.escape(table.title)}</h2><p>{html.escape(table.caption)}</p>'
            f'<table id="{table.key}" border="1" cellpadding="4" style="border-collapse:collapse">'
            f"<tr>{head}</tr>{body}</table>")


class ChartLine(NamedTuple):
    traffic: str
    key: str
    label: str
    color: str
    dashed: bool = False


CHART_LINES = (
    ChartLine("poisoned", "ca_or_pa_current", f"PA ({_NOW})", "#2e7d32"),
    ChartLine("poisoned", "ca_or_pa", "PA (total)", "#2e7d32", dashed=True),
    ChartLine("poisoned", "asr_current", f"ASR ({_NOW})", "#c62828"),
    ChartLine("poisoned", "flagged_rate_current", f"flagged poisoned ({_NOW})", "#ef6c00"),
    ChartLine("clean", "flagged_rate_current", f"flagged clean ({_NOW})", "#8e24aa"),
    ChartLine("clean", "ca_or_pa_current", f"CA ({_NOW})", "#1565c0"),
)
CHART_W, CHART_H = 960, 340
_LEFT, _RIGHT, _TOP, _BOTTOM = 48, 16, 64, 36


def chart_svg(history: Sequence[tuple[float, list[dict]]]) -> str:
    """PA, ASR and flagged rates over time (seconds since the first point) as a self-contained SVG."""
    width, height = CHART_W - _LEFT - _RIGHT, CHART_H - _TOP - _BOTTOM
    t0 = history[0][0] if history else 0.0
    span = max(history[-1][0] - t0, 1.0) if history else 1.0

    def x(at: float) -> float:
        return _LEFT + (at - t0) / span * width

    def y(value: float) -> float:  # a little room above 1 and below 0, so that lines there stay visible
        return _TOP + (1.02 - value) / 1.04 * height

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{CHART_W}" height="{CHART_H}" '
             f'viewBox="0 0 {CHART_W} {CHART_H}" font-family="sans-serif" font-size="12">',
             f'<rect width="{CHART_W}" height="{CHART_H}" fill="white"/>',
             f'<text x="{_LEFT}" y="18" font-size="14" font-weight="bold">FIRE defense over time</text>']
    for i, line in enumerate(CHART_LINES):  # legend, two rows
        lx, ly = _LEFT + (i % 3) * 290, 36 + (i // 3) * 16
        dash = ' stroke-dasharray="6 4"' if line.dashed else ""
        parts.append(f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 22}" y2="{ly - 4}" stroke="{line.color}" '
                     f'stroke-width="2"{dash}/><text x="{lx + 28}" y="{ly}">{html.escape(line.label)}</text>')
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{_LEFT}" y1="{y(tick):.1f}" x2="{_LEFT + width}" y2="{y(tick):.1f}" stroke="#ddd"/>'
                     f'<text x="{_LEFT - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>')
    digits = 0 if span >= 10 else 1
    for i in range(6):
        at = t0 + span * i / 5
        parts.append(f'<text x="{x(at):.1f}" y="{_TOP + height + 16}" text-anchor="middle">'
                     f"{at - t0:.{digits}f} s</text>")
    if not history:
        parts.append(f'<text x="{_LEFT + width / 2}" y="{_TOP + height / 2}" text-anchor="middle" fill="#888">'
                     "no traffic yet</text>")
    for line in CHART_LINES:
        path = []
        for at, rows in history:
            value = next((r.get(line.key) for r in rows if r["traffic"] == line.traffic), None)
            if value is None:  # no traffic of this kind: a gap, not a zero
                path.append(None)
                continue
            path.append(f"{x(at):.1f},{y(value):.1f}")
        d = _path(path)
        if d:
            dash = ' stroke-dasharray="6 4"' if line.dashed else ""
            parts.append(f'<path d="{d}" fill="none" stroke="{line.color}" stroke-width="2" '
                         f'stroke-linecap="round"{dash}>'
                         f"<title>{html.escape(line.label)}</title></path>")
    parts.append("</svg>")
    return "".join(parts)


def _path(points: Sequence[str | None]) -> str:
    """SVG path data through the points; None breaks the line. A lone point is drawn as a dot (M then L to it)."""
    out, pen_down = [], False
    for point in points:
        if point is None:
            pen_down = False
            continue
        out.append(f"L{point}" if pen_down else f"M{point} L{point}")
        pen_down = True
    return " ".join(out)
