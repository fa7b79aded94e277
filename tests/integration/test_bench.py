"""`fire bench` from the installed console script: one real tritonserver with every layout and the baselines, real
Locust, the comparisons and Triton's per-stage counters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import stress

from fire_backend.bench import COMPARISONS
from fire_backend.loadtest import LOCUSTFILE

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FIRE = Path(sys.executable).with_name("fire")
TARGETS = {"fused", "inline", "separate", "undefended", "monolithic"}


def test_bench_compares_every_layout_and_reports_stage_counters(production, tmp_path, request):
    out = tmp_path / "bench"
    proc = subprocess.run(
        # the warm-up absorbs Locust's start; beside the stress mode's busy processes a 1-user run once sent nothing
        # in 4 s, and once in 6 s (its first call took that long), so there it is longer
        [str(FIRE), "bench", "--repository", str(production), "--concurrency", "1,4", "--duration", "3",
         "--warmup", "10" if stress.requested(request.config.getoption("--stress")) else "3", "--out", str(out),
         "--json"],
        capture_output=True, text=True, timeout=900, check=False)
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
        stages = {s["model"]: s for s in row["stages"]}
        assert list(stages) == report["settings"]["targets"][row["target"]], row["target"]
        public = stages[row["model"]]
        assert public["requests"] >= row["requests"]  # Triton counted every request Locust made, warm-up included
        for figures in stages.values():
            assert figures["executions"] > 0 and figures["mean_batch"] >= 1 and figures["queue_ms"] >= 0
    assert report["settings"]["targets"]["fused"] == ["fire_ensemble"]
    assert report["settings"]["targets"]["separate"] == ["fire_separate", "fire_separate_head",
                                                         "fire_separate_repair", "fire_separate_tail"]
    compared = {(e["comparison"], e["concurrency"]) for e in report["ratios"]}
    assert compared == {(label, c) for label, _, _ in COMPARISONS for c in (1, 4)}
    for entry in report["ratios"]:
        assert entry["throughput"] > 0 and entry["p50"] > 0
    assert report["settings"]["locustfile"] == str(LOCUSTFILE.resolve())  # the packaged one: works from a wheel
    # the source repository is measured as it is configured, and left alone
    assert report["settings"]["source"] == str(production)
    assert not (production / "models" / "fire_inline").exists()

    table = "\n".join(lines[:-1])
    assert "no GPU" in table or "GPU " in table  # the machine is stated
    assert "default vs undefended split" in table and "p95 ms" in table and "fire_separate_repair" in table
    assert json.loads((out / "bench.json").read_text())["rows"] == rows
    assert (out / "bench.png").stat().st_size > 0
