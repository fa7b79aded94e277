"""The FIRE tabs in Locust's web UI, their endpoints, and the FIRE sections of the ``--html`` report.

Locust (2.47) lets a locustfile add tabs that show a table (``extended_tabs``/``extended_tables``, filled from
``extended_stats`` in the ``/stats/requests`` poll), download links (``extended_csv_files``) and Flask routes. Its
Charts tab is a fixed list (RPS, response times, users) with no hook, and an extended tab renders only a table;
so the FIRE defense tab gets its over-time chart from a small script added to the index page: right below the
tab's table it shows ``/fire/defense/chart.svg`` (drawn by ``report.chart_svg``, as in the HTML report) and
refreshes it at the UI's own poll period while the tab is open.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from fire_backend.loadtest import report
from fire_backend.loadtest.defense import HISTORY_INTERVAL_S, WINDOW_S, DefenseStats

RowsFn = Callable[[], list[dict]]
CHART_ID = "fire-defense-chart"
CHART_SCRIPT = f"""
<div id="{CHART_ID}" hidden style="margin:24px 0">
  <img alt="FIRE defense over time" src="./fire/defense/chart.svg" style="max-width:100%;border:1px solid #ccc">
</div>
<script>
(() => {{
  // Locust's React UI renders the tab's table; the chart goes right after it (React leaves a node it did not
  // create alone, and a re-rendered tab gets it back on the next tick), and refreshes while the tab is open.
  const box = document.getElementById("{CHART_ID}"), img = box.querySelector("img");
  let last = 0;
  setInterval(() => {{
    const open = new URLSearchParams(window.location.search).get("tab") === "{report.DEFENSE.key}";
    const table = open && document.querySelector("main table");
    if (!table) {{ box.hidden = true; return; }}
    const anchor = table.closest("[class*=MuiTableContainer]") || table;
    if (anchor.nextSibling !== box) anchor.after(box);
    box.hidden = false;
    if (Date.now() - last >= {int(HISTORY_INTERVAL_S * 1000)}) {{
      last = Date.now();
      img.src = "./fire/defense/chart.svg?t=" + last;
    }}
  }}, 250);
}})();
</script>
"""


def _structure(table: report.Table) -> list[dict]:
    return [{"key": c.key, "title": c.title} for c in table.columns]


def extend_web_ui(web_ui, stats: DefenseStats, per_sample_rows: RowsFn) -> None:
    """The "FIRE defense" and "FIRE per-sample" tabs, their CSV downloads, JSON and the chart."""
    from flask import Response, jsonify, request

    tables = (report.DEFENSE, report.PER_SAMPLE)
    web_ui.template_args["extended_tabs"] = [{"title": t.title, "key": t.key} for t in tables]
    web_ui.template_args["extended_tables"] = [{"key": t.key, "structure": _structure(t)} for t in tables]
    web_ui.template_args["extended_csv_files"] = [
        {"href": "./fire/defense/csv", "title": "Download FIRE defense CSV"},
        {"href": "./fire/defense/history/csv", "title": "Download FIRE defense history CSV"},
        {"href": "./fire/per-sample/csv", "title": "Download FIRE per-sample CSV"},
    ]

    def csv_response(text: str, filename: str) -> Response:
        return Response(text, mimetype="text/csv", headers={"Content-Disposition": f"attachment;filename={filename}"})

    @web_ui.app.route("/fire/defense")
    def fire_defense_json():
        return jsonify({"window_s": WINDOW_S, "rows": stats.rows(), "counts": stats.snapshot(),
                        "per_sample": per_sample_rows()})

    @web_ui.app.route("/fire/defense/history")
    def fire_defense_history_json():
        return jsonify({"window_s": WINDOW_S, "history": [{"time": at, "rows": rows} for at, rows in stats.history()]})

    @web_ui.app.route("/fire/defense/csv")
    def fire_defense_csv():
        return csv_response(report.to_csv(report.DEFENSE, stats.rows()), "fire_defense.csv")

    @web_ui.app.route("/fire/defense/history/csv")
    def fire_defense_history_csv():
        return csv_response(report.history_csv(stats.history()), "fire_defense_history.csv")

    @web_ui.app.route("/fire/per-sample/csv")
    def fire_per_sample_csv():
        return csv_response(report.to_csv(report.PER_SAMPLE, per_sample_rows()), "fire_per_sample.csv")

    @web_ui.app.route("/fire/defense/chart.svg")
    def fire_defense_chart():
        return Response(report.chart_svg(stats.history()), mimetype="image/svg+xml",
                        headers={"Cache-Control": "no-store"})

    @web_ui.app.after_request
    def add_fire_figures(response):
        if response.status_code != 200:
            return response
        if request.endpoint == "locust.request_stats":
            # The UI polls /stats/requests (cached by Locust for 2 s); the extended tables are filled from its
            # "extended_stats", computed afresh here on every poll.
            try:
                payload = json.loads(response.get_data())
            except ValueError:
                return response
            payload["extended_stats"] = [
                {"key": report.DEFENSE.key, "data": report.DEFENSE.formatted(stats.rows())},
                {"key": report.PER_SAMPLE.key, "data": report.PER_SAMPLE.formatted(per_sample_rows())},
            ]
            response.set_data(json.dumps(payload))
        elif request.endpoint == "locust.index" and response.mimetype == "text/html":
            page = response.get_data(as_text=True)
            if CHART_ID not in page:
                response.set_data(before_body_end(page, CHART_SCRIPT))
        return response


def before_body_end(page: str, fragment: str) -> str:
    """``fragment`` just before the page's closing body tag: the last one, as an inlined script may hold others."""
    head, tag, tail = page.rpartition("</body>")
    return f"{head}{fragment}{tag}{tail}" if tag else page + fragment


def report_sections(stats: DefenseStats, per_sample_rows: RowsFn) -> str:
    """The FIRE part of the HTML report: both tables and the chart."""
    return (f'<section id="fire" style="font-family:sans-serif;margin:2em">'
            f"{report.to_html(report.DEFENSE, stats.rows())}"
            f'<p>{report.chart_svg(stats.history())}</p>'
            f"{report.to_html(report.PER_SAMPLE, per_sample_rows())}</section>")


def extend_html_report(stats: DefenseStats, per_sample_rows: RowsFn) -> None:
    """Append the FIRE sections to the --html report and the web UI's report download (once per process)."""
    import locust.main
    import locust.web

    for module in (locust.main, locust.web):
        original = getattr(module, "get_html_report", None)
        if original is None or getattr(original, "_fire_sections", False):
            continue

        def with_fire(*args, _original=original, **kwargs) -> str:
            return before_body_end(_original(*args, **kwargs), report_sections(stats, per_sample_rows))

        with_fire._fire_sections = True
        module.get_html_report = with_fire
