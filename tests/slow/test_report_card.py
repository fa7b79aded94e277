"""The report card end to end on digits: `benchmarks/report_card.py` trains two settings (cached), builds the default
repository, serves it with the real tritonserver, observes 5 then 20 flagged images with `fire ctl observe`, and
writes the table, the JSON and the figure; a second run finds the trained models in the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "report_card.py"


def card(tmp_path: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--data", "digits", "--settings", "badnets,two-targets", "--eval-images", "400",
         "--torch-threads", "1", "--cache", str(cache), "--work", str(tmp_path / "work"), "--out",
         str(tmp_path / "card"), *extra],
        cwd=SCRIPT.parent, env=env, capture_output=True, text=True, timeout=900, check=False)


def test_report_card_on_digits(tmp_path: Path) -> None:
    cache_root = os.environ.get("FIRE_TEST_CACHE")
    cache = Path(cache_root) / "report-card" if cache_root else tmp_path / "cache"
    proc = card(tmp_path, cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "card"
    rows = {row["label"]: row for row in json.loads((out / "report_card.json").read_text())}
    assert set(rows) == {"badnets", "two-targets: badnets", "two-targets: blended"}
    table = (out / "report_card.md").read_text()
    assert table.count("\n") == 2 + len(rows) and "fire-20 CA / PA / ASR" in table
    assert (out / "report_card.png").stat().st_size > 10_000
    for label, row in rows.items():
        undefended, fire = row["rows"]["undefended"], row["rows"]["fire-20"]
        assert set(row["rows"]) == {"undefended", "shrinkpad", "fire-5", "fire-20"}, label
        assert undefended["asr"] >= 0.85, label  # the attacks count
        assert fire["pa"] >= 0.9 * fire["ca"] and fire["asr"] <= 0.05, (label, fire)
        assert row["verdict"] == "repaired", label
        assert row["layers"]["20"], label  # the ranking kept some layer
    setting = json.loads((out / "two-targets.json").read_text())
    assert [t["target"] for t in setting["triggers"]] == [0, 1]
    assert setting["timings_s"]["observe 5"] > 0 and setting["timings_s"]["observe 20"] > 0
    # the trainings are cached: a second run (train-only, to keep the test short) trains nothing
    again = card(tmp_path, cache, "--train-only")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training" not in again.stdout and again.stdout.count("(0.0 s)") == 2
