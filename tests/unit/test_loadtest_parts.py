"""fire_backend.loadtest without a server: defense counters and their window, per-sample figures, reports, the
traffic mix, options, and Locust's --help.

Importing locust monkey-patches the process for gevent, so everything that needs locust itself runs in a
subprocess; the modules imported here (defense, traffic, options, locust_help) do not import it.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest

from fire_backend.loadtest.defense import RATES, ROW_KEYS, TRAFFIC_KINDS, WINDOW_S, DefenseStats
from fire_backend.loadtest.locust_help import locust_arguments
from fire_backend.loadtest.options import GROUPS, add_options
from fire_backend.loadtest.per_sample import ROW_KEYS as PER_SAMPLE_KEYS
from fire_backend.loadtest.per_sample import per_sample_row
from fire_backend.loadtest.report import CHART_LINES, DEFENSE, HISTORY_KEYS, PER_SAMPLE, chart_svg, history_csv, to_csv
from fire_backend.loadtest.traffic import Pool, Traffic, host_protocol
from fire_backend.loadtest.webui import before_body_end
from fire_backend.wire.client import InferResult

ROOT = Path(__file__).resolve().parents[2]
LOCUST = Path(sys.executable).with_name("locust")  # the console script, as users type it
#: what `locust -f loadtest/locustfile.py --help` must list: mix, attack and protocol options
FIRE_OPTIONS = ("--clean-npz", "--poisoned-npz", "--poison-ratio", "--batch", "--target", "--model", "--bypass",
                "--protocol", "--request-timeout", "--step-users")


def result(labels, flagged=None) -> InferResult:
    return InferResult(labels=np.asarray(labels), flagged=None if flagged is None else np.asarray(flagged, bool))


# --------------------------------------------------------------------------------------------------
# defense counters, the sliding window and the history
# --------------------------------------------------------------------------------------------------


def by_kind(rows: list[dict]) -> dict[str, dict]:
    return {r["traffic"]: r for r in rows}


def test_defense_rates_follow_their_definitions():
    stats = DefenseStats()
    # clean: 3 of 4 right, 1 flagged
    stats.record("clean", np.array([1, 2, 3, 0]), result([1, 2, 0, 0], [0, 1, 0, 0]), target=0)
    # poisoned, true labels 0 (target), 5, 6, 7: one repaired (5), two hijacked to the target (6, 7)
    stats.record("poisoned", np.array([0, 5, 6, 7]), result([0, 5, 0, 0], [1, 1, 1, 0]), target=0)
    rows = by_kind(stats.rows())
    assert rows["clean"]["ca_or_pa"] == 0.75 and rows["clean"]["flagged_rate"] == 0.25
    poisoned = rows["poisoned"]
    assert poisoned["ca_or_pa"] == 0.5  # label 0 and label 5 right
    assert poisoned["asr"] == pytest.approx(2 / 3)  # over the three samples whose true label is not the target
    assert poisoned["flagged_rate"] == 0.75
    assert poisoned["requests"] == 1 and poisoned["samples"] == 4
    # all of it within the window: the current figures are the same
    assert [poisoned[f"{k}_current"] for k in RATES] == [poisoned[k] for k in RATES]
    assert tuple(poisoned) == ROW_KEYS


def test_models_without_flags_report_no_flagged_rate():
    stats = DefenseStats()
    stats.record("clean", np.array([1, 2]), result([1, 2]), target=0)
    rows = by_kind(stats.rows())
    assert rows["clean"]["flagged_rate"] is None and rows["clean"]["ca_or_pa"] == 1.0
    poisoned = rows["poisoned"]
    assert poisoned["ca_or_pa"] is None and poisoned["asr"] is None  # no traffic: no rate, not zero
    assert poisoned["ca_or_pa_current"] is None and poisoned["window_samples"] == 0


def poisoned_at(stats: DefenseStats, at: float, repaired: bool, n: int = 1) -> None:
    """n poisoned requests of one image (true label 3, target 0) at time ``at``, repaired or hijacked."""
    for _ in range(n):
        stats.record("poisoned", np.array([3]), result([3 if repaired else 0], [1]), target=0, at=at)


def test_the_window_is_the_last_10_seconds_of_traffic():
    assert WINDOW_S == 10
    stats = DefenseStats()
    for second in range(1000, 1020):  # 20 s: hijacked for 12 s, then repaired for 8 s (after an observe)
        poisoned_at(stats, second + 0.5, repaired=second >= 1012, n=3)
    poisoned = by_kind(stats.rows())["poisoned"]
    # window = seconds 1010..1019: 2 hijacked + 8 repaired seconds; total = 8 repaired of 20
    assert poisoned["window_samples"] == 30
    assert poisoned["ca_or_pa_current"] == pytest.approx(0.8) and poisoned["asr_current"] == pytest.approx(0.2)
    assert poisoned["ca_or_pa"] == pytest.approx(0.4) and poisoned["asr"] == pytest.approx(0.6)
    assert poisoned["samples"] == 60 and poisoned["requests"] == 60  # the totals keep everything


def test_the_window_ends_at_the_newest_traffic_and_keeps_only_its_seconds():
    stats = DefenseStats(window_s=3)
    poisoned_at(stats, 100.9, repaired=False)
    poisoned_at(stats, 101.0, repaired=True)
    poisoned_at(stats, 102.99, repaired=True)
    assert by_kind(stats.rows())["poisoned"]["window_samples"] == 3  # buckets 100, 101, 102
    poisoned_at(stats, 103.0, repaired=True)  # bucket 100 leaves the window
    poisoned = by_kind(stats.rows())["poisoned"]
    assert poisoned["window_samples"] == 3 and poisoned["ca_or_pa_current"] == 1.0
    assert poisoned["ca_or_pa"] == 0.75
    assert sorted(stats._seconds) == [101, 102, 103]  # nothing older is kept
    poisoned_at(stats, 95.0, repaired=False)  # late (a slow worker's report): counted, but not current
    poisoned = by_kind(stats.rows())["poisoned"]
    assert poisoned["requests"] == 5 and poisoned["window_samples"] == 3 and poisoned["ca_or_pa_current"] == 1.0
    # no new traffic: the window stays on the last seconds of traffic (a stopped test stays readable)
    assert by_kind(stats.rows())["poisoned"]["ca_or_pa_current"] == 1.0


def test_worker_reports_add_up_on_the_master_window_included():
    worker_a, worker_b, master = DefenseStats(), DefenseStats(), DefenseStats()
    poisoned_at(worker_a, 200.2, repaired=False, n=2)
    poisoned_at(worker_b, 200.7, repaired=True)
    master.merge(worker_a.pop())
    master.merge(worker_b.pop())
    poisoned_at(worker_a, 215.0, repaired=True, n=3)  # 15 s later: the first second leaves the master's window
    master.merge(worker_a.pop())
    master.merge(worker_a.pop())  # nothing new: adds nothing
    master.merge({"totals": {"unknown-kind": {"requests": 9}}, "seconds": {215: {"unknown-kind": {"samples": 9}}}})
    master.merge(None)
    counts = master.snapshot()["poisoned"]
    assert counts["requests"] == 6 and counts["samples"] == 6 and counts["target_hits"] == 2
    poisoned = by_kind(master.rows())["poisoned"]
    assert poisoned["window_samples"] == 3 and poisoned["ca_or_pa_current"] == 1.0
    assert poisoned["ca_or_pa"] == pytest.approx(4 / 6)
    assert worker_a.snapshot()["poisoned"]["requests"] == 0 and worker_a.window()["poisoned"]["samples"] == 0


def test_reset_clears_totals_window_and_history():
    stats = DefenseStats()
    poisoned_at(stats, 300.0, repaired=True, n=4)
    stats.add_history_point(at=300.5)
    assert len(stats.history()) == 1
    stats.reset()
    poisoned = by_kind(stats.rows())["poisoned"]
    assert poisoned["requests"] == 0 and poisoned["window_samples"] == 0 and poisoned["ca_or_pa"] is None
    assert stats.history() == []


def test_history_keeps_the_rows_of_each_point_and_drops_the_oldest():
    stats = DefenseStats(history_points=3)
    for i in range(5):
        poisoned_at(stats, 400.0 + i, repaired=i >= 2)
        stats.add_history_point(at=400.5 + i)
    history = stats.history()
    assert [at for at, _ in history] == [402.5, 403.5, 404.5]
    assert [by_kind(rows)["poisoned"]["requests"] for _, rows in history] == [3, 4, 5]
    text = history_csv(history)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert tuple(rows[0]) == HISTORY_KEYS and len(rows) == 3 * len(TRAFFIC_KINDS)
    assert [r["ca_or_pa"] for r in rows if r["traffic"] == "poisoned"] == ["0.3333", "0.5000", "0.6000"]
    assert rows[0]["timestamp"] == "402.500" and rows[0]["ca_or_pa"] == ""  # no clean traffic: empty, not 0


def test_defense_csv_has_the_documented_columns():
    stats = DefenseStats()
    stats.record("clean", np.array([1]), result([1], [0]), target=0)
    rows = list(csv.DictReader(io.StringIO(to_csv(DEFENSE, stats.rows()))))
    assert tuple(rows[0]) == ROW_KEYS
    assert {"traffic", "requests", "samples", "ca_or_pa", "asr", "flagged_rate", "ca_or_pa_current",
            "asr_current", "flagged_rate_current"} <= set(rows[0])
    assert rows[0]["ca_or_pa"] == "1.0000" and rows[1]["ca_or_pa"] == ""
    assert {c.key for c in DEFENSE.columns} <= set(ROW_KEYS)  # the web UI shows only known keys


def test_chart_draws_a_line_per_figure_and_breaks_it_where_there_is_no_traffic():
    svg_ns = "{http://www.w3.org/2000/svg}"
    stats = DefenseStats()
    poisoned_at(stats, 500.0, repaired=False)
    stats.add_history_point(at=500.5)
    poisoned_at(stats, 520.0, repaired=True)
    stats.add_history_point(at=520.5)
    stats.record("clean", np.array([4]), result([4], [0]), target=0, at=540.0)  # 20 s without poisoned traffic
    stats.add_history_point(at=540.5)
    poisoned_at(stats, 560.0, repaired=True)
    stats.add_history_point(at=560.5)
    svg = ElementTree.fromstring(chart_svg(stats.history()))
    paths = {p.find(f"{svg_ns}title").text: p.get("d") for p in svg.iter(f"{svg_ns}path")}
    assert set(paths) == {line.label for line in CHART_LINES}
    label = {(line.traffic, line.key): line.label for line in CHART_LINES}
    current_pa, total_pa = paths[label["poisoned", "ca_or_pa_current"]], paths[label["poisoned", "ca_or_pa"]]
    assert current_pa.count("M") == 2  # a gap where the window held no poisoned traffic, not a drop to 0
    assert total_pa.count("M") == 1  # the cumulative figure goes on
    ys = [float(seg.split(",")[1]) for seg in current_pa.replace("M", "L").split("L")[1:]]
    assert ys[0] > ys[-1]  # PA rose (SVG y grows downwards)
    assert not list(ElementTree.fromstring(chart_svg([])).iter(f"{svg_ns}path"))


def test_fire_sections_go_before_the_pages_own_closing_body_tag():
    script = '<script>var s = "<body>x</body>";</script>'
    page = f"<html><body>{script}</body></html>"
    assert before_body_end(page, "<p>F</p>") == f"<html><body>{script}<p>F</p></body></html>"
    assert before_body_end("<p>no body</p>", "<p>F</p>") == "<p>no body</p><p>F</p>"


# --------------------------------------------------------------------------------------------------
# per-sample figures from Locust's own entry (real locust.stats, in a subprocess: importing locust patches gevent)
# --------------------------------------------------------------------------------------------------

PER_SAMPLE_SCRIPT = """
import json
from locust.stats import RequestStats
from fire_backend.loadtest.per_sample import per_sample_rows
stats = RequestStats()
for ms in (8, 8, 12, 40):
    stats.log_request("grpc", "fire_ensemble", ms, 4)
stats.log_error("grpc", "fire_ensemble", "boom")
entry = stats.get("fire_ensemble", "grpc")
print(json.dumps({"rows": per_sample_rows(stats, 4), "total": stats.total.num_requests,
                  "p50": entry.median_response_time, "p95": entry.get_response_time_percentile(0.95)}))
"""


def test_per_sample_figures_divide_the_request_entry_by_the_batch():
    proc = run([sys.executable, "-c", PER_SAMPLE_SCRIPT])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    (row,) = out["rows"]  # one row per model entry, Locust's Aggregated left out
    assert out["total"] == 4
    assert (row["name"], row["type"], row["batch"]) == ("fire_ensemble", "grpc", 4)
    assert row["requests"] == 4 and row["samples"] == 16 and row["failures"] == 1
    assert row["p50_ms"] == out["p50"] / 4 and row["p95_ms"] == out["p95"] / 4  # Locust's percentiles / batch
    assert row["max_ms"] == 10.0 and row["min_ms"] == 2.0 and row["avg_ms"] == pytest.approx(68 / 4 / 4)
    assert tuple(row) == PER_SAMPLE_KEYS
    text = to_csv(PER_SAMPLE, out["rows"])
    assert text.splitlines()[1].startswith("fire_ensemble,grpc,4,4,1,16,")


def test_per_sample_rejects_a_batch_below_one():
    with pytest.raises(ValueError, match="--batch"):
        per_sample_row(object(), 0)


# --------------------------------------------------------------------------------------------------
# traffic
# --------------------------------------------------------------------------------------------------


def pools() -> tuple[Pool, Pool]:
    x = np.zeros((5, 1, 8, 8), np.float32)
    return Pool("clean", x, np.arange(5)), Pool("poisoned", x + 1, np.arange(5) + 10)


def test_the_mix_sends_the_configured_share_of_poisoned_requests():
    clean, poisoned = pools()
    traffic = Traffic(clean, poisoned, 0.2)
    rng = np.random.default_rng(0)
    kinds = [traffic.draw(rng, 3)[0] for _ in range(4000)]
    assert 0.18 < kinds.count("poisoned") / len(kinds) < 0.22
    kind, x, y = traffic.draw(rng, 7)
    pool = poisoned if kind == "poisoned" else clean
    assert x.shape == (7, 1, 8, 8) and set(y) <= set(pool.y)  # a request never mixes the two kinds


def test_the_mix_degrades_to_what_it_has_and_rejects_bad_ratios():
    clean, poisoned = pools()
    assert Traffic(clean, None, 0.2).ratio == 0.0
    assert Traffic(None, poisoned, 0.2).ratio == 1.0
    for ratio in (-0.1, 1.5):
        with pytest.raises(ValueError, match="--poison-ratio"):
            Traffic(clean, poisoned, ratio)
    with pytest.raises(ValueError, match="no images"):
        Traffic(None, None, 0.2)


def test_host_scheme_picks_the_protocol():
    assert host_protocol("grpc://127.0.0.1:8001") == "grpc"
    assert host_protocol("HTTP://127.0.0.1:8000", "grpc") == "http"  # the scheme wins over --protocol
    assert host_protocol("127.0.0.1:8000", "http") == "http"
    assert host_protocol("127.0.0.1:8001") == "grpc"


def test_options_default_to_an_80_20_mix_on_fire_ensemble():
    parser = argparse.ArgumentParser()
    add_options(parser)
    options = parser.parse_args([])
    assert options.poison_ratio == 0.2 and options.model == "fire_ensemble" and not options.bypass
    options = parser.parse_args(["--poison-ratio", "0.5", "--bypass", "--protocol", "http", "--batch", "8"])
    assert (options.poison_ratio, options.bypass, options.protocol, options.batch) == (0.5, True, "http", 8)
    with pytest.raises(SystemExit):
        parser.parse_args(["--protocol", "carrier-pigeon"])


# --------------------------------------------------------------------------------------------------
# locust --help
# --------------------------------------------------------------------------------------------------


def run(cmd: list[str], cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False, env=env)


@pytest.mark.parametrize("locust", [[str(LOCUST)], [sys.executable, "-m", "locust"],
                                    [sys.executable, "-X", "utf8", "-B", "-m", "locust"]],
                         ids=["script", "module", "module-after-interpreter-options"])
def test_locust_help_lists_the_fire_options(locust):
    proc = run([*locust, "-f", "loadtest/locustfile.py", "--help"])
    assert proc.returncode == 0, proc.stderr
    for text in (*GROUPS, *FIRE_OPTIONS, "--headless"):  # ours, next to Locust's own
        assert text in proc.stdout, text
    assert proc.stderr == ""


def test_help_for_a_directory_and_the_packaged_locustfile():
    from fire_backend.loadtest import LOCUSTFILE

    for target in ("loadtest", str(LOCUSTFILE)):
        proc = run([str(LOCUST), "-f", target, "-h"])
        assert proc.returncode == 0 and "--poison-ratio" in proc.stdout, (target, proc.stderr)


def test_help_without_a_locustfile_is_locusts_own(tmp_path):
    proc = run([str(LOCUST), "--help"], cwd=tmp_path)
    assert proc.returncode == 0 and "--headless" in proc.stdout
    assert "--poison-ratio" not in proc.stdout


def test_a_locustfile_that_fails_to_import_still_gets_help(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom at import')\n")
    proc = run([str(LOCUST), "-f", "broken.py", "--help"], cwd=tmp_path)
    assert proc.returncode == 0 and "--headless" in proc.stdout
    assert "could not import" in proc.stderr and "boom at import" in proc.stderr


def test_locustfiles_follow_locusts_own_rules(tmp_path):
    (tmp_path / "a.py").write_text("")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "b.py").write_text("")
    (tmp_path / "pkg" / "_private.py").write_text("")
    code = ("import json, sys; from fire_backend.loadtest.locust_help import locustfiles; "
            "print(json.dumps(locustfiles(sys.argv[1:])))")

    def resolve(*args: str, env: dict | None = None) -> list[str]:
        proc = run([sys.executable, "-c", code, *args], cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr
        return [Path(p).relative_to(tmp_path).as_posix() for p in json.loads(proc.stdout)]

    assert resolve("-f", "a.py,pkg,missing.py,-,https://example.com/x.py") == ["a.py", "pkg/b.py"]
    assert resolve("--locustfile=a.py", "--headless") == ["a.py"]
    assert resolve() == []  # Locust's default ./locustfile.py is not there
    (tmp_path / "locustfile.py").write_text("")
    assert resolve() == ["locustfile.py"]
    assert resolve(env={**os.environ, "LOCUST_LOCUSTFILE": "pkg"}) == ["pkg/b.py"]


def test_only_a_locust_process_is_recognised():
    assert locust_arguments(["/venv/bin/locust", "-f", "x.py", "-h"], []) == ["-f", "x.py", "-h"]
    assert locust_arguments(["-m", "--help"], ["python", "-X", "dev", "-m", "locust", "--help"]) == ["--help"]
    assert locust_arguments(["-m", "-h"], ["python", "-mlocust", "-h"]) == ["-h"]
    assert locust_arguments(["-m", "--help"], ["python", "-m", "json.tool", "--help"]) is None
    assert locust_arguments(["/venv/bin/pytest", "-k", "locust"], []) is None
    assert locust_arguments([], []) is None
