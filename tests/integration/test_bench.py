"""`fire bench` from the installed console script: real tritonserver, real Locust, the three targets compared."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fire_backend.loadtest import LOCUSTFILE
from fire_backend.serving.repository import build_repository

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FIRE = Path(sys.executable).with_name("fire")
TARGETS = {"fire", "undefended", "monolithic"}


def test_bench_prints_the_comparison_and_writes_json(served, tmp_path):
    repository = tmp_path / "repository"
    build_repository(served.checkpoint, repository, flagged=20)
    out = tmp_path / "bench"
    proc = subprocess.run(
        [str(FIRE), "bench", "--repository", str(repository), "--concurrency", "1,4", "--duration", "3",
         "--warmup", "1", "--out", str(out), "--json"],
        capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1])  # --json: the last line is the report

    machine = report["machine"]
    assert machine["cores"] >= 1 and "gpu" in machine and machine["tritonserver"]
    rows = report["rows"]
    assert {(r["target"], r["concurrency"]) for r in rows} == {(t, c) for t in TARGETS for c in (1, 4)}
    for row in rows:
        assert row["failures"] == 0 and row["requests"] > 0 and row["samples_per_s"] > 0, row
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"], row
    for entry in report["ratios"]:
        assert entry["throughput_fire_vs_undefended"] > 0 and entry["throughput_fire_vs_monolithic"] > 0
    assert report["settings"]["locustfile"] == str(LOCUSTFILE.resolve())  # the packaged one: works from a wheel

    table = "\n".join(lines[:-1])
    assert "no GPU" in table or "GPU " in table  # the machine is stated
    assert "FIRE relative to" in table and "p95 ms" in table
    assert json.loads((out / "bench.json").read_text())["rows"] == rows
    assert (out / "bench.png").stat().st_size > 0
