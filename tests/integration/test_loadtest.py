"""loadtest/locustfile.py: real Locust (headless subprocesses) against the real tritonserver, on loopback.

The server: a repository built with --flagged 20, so FIRE repairs from the first request (the session's `defended`
server when tests/integration/conftest.py provides it, else one for this module). Every Locust run is bounded (-t
plus a subprocess timeout).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fire_backend.cli import main as fire_main

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
RUN_SECONDS = 10
DEFENSE_COLUMNS = {"traffic", "requests", "samples", "ca_or_pa", "asr", "flagged_rate"}


@pytest.fixture(scope="module")
def checkpoint(served) -> Path:
    return served.checkpoint


@pytest.fixture(scope="module")
def traffic(checkpoint: Path, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("loadtest-data")
    paths = {"clean": out / "clean.npz", "poisoned": out / "poisoned.npz"}
    for kind, path in paths.items():
        argv = ["data", "export", "--checkpoint", str(checkpoint), "--split", "test", "--n", "200",
                "--out", str(path)] + (["--poisoned"] if kind == "poisoned" else [])
        assert fire_main(argv) == 0
    return paths


def locust(args: list[str], files: tuple[Path, ...] = (LOCUSTFILE,),
           timeout: float = RUN_SECONDS + 60) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "locust", "-f", ",".join(map(str, files)), "--loglevel", "INFO", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


def headless(served, traffic, prefix: Path, *extra: str, protocol: str = "grpc", users: int = 4) -> dict:
    host = served.urls[protocol]
    proc = locust(["--headless", "-u", str(users), "-r", str(users), "-t", f"{RUN_SECONDS}s", "--host", host,
                   "--clean-npz", str(traffic["clean"]), "--poisoned-npz", str(traffic["poisoned"]),
                   "--target", "0", "--csv", str(prefix), "--json-file", str(prefix), "--only-summary", *extra])
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    # Final counts from --json-file (written at shutdown, like the defense CSV); the _stats.csv is rewritten
    # once a second and can miss the last requests.
    stats = {entry["name"]: entry for entry in json.loads(Path(f"{prefix}.json").read_text())}
    assert read_csv(Path(f"{prefix}_stats.csv"))
    defense = {row["traffic"]: row for row in read_csv(Path(f"{prefix}_defense.csv"))}
    return {"stats": stats, "defense": defense, "log": log}


def read_csv(path: Path) -> list[dict]:
    assert path.is_file(), f"{path} was not written"
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_fire_repairs_poisoned_traffic(served, traffic, tmp_path):
    run = headless(served, traffic, tmp_path / "fire", "--batch", "4", "--html", str(tmp_path / "report.html"))
    stats, defense = run["stats"], run["defense"]
    model = stats["fire_ensemble"]
    per_sample = stats["fire_ensemble/per-sample"]
    requests = model["num_requests"]
    assert requests > 50 and model["last_request_timestamp"] > model["start_time"]  # nonzero throughput
    assert model["num_failures"] == 0 and per_sample["num_failures"] == 0
    assert per_sample["num_requests"] == 4 * requests  # one entry per sample
    assert abs(per_sample["total_response_time"] - model["total_response_time"]) < 1e-3 * requests  # latency / 4

    assert DEFENSE_COLUMNS <= set(defense["clean"])
    clean, poisoned = defense["clean"], defense["poisoned"]
    assert int(clean["requests"]) + int(poisoned["requests"]) == requests
    assert 0.05 < int(poisoned["requests"]) / requests < 0.45  # the 80/20 mix
    assert float(clean["ca_or_pa"]) >= 0.95
    assert float(poisoned["ca_or_pa"]) >= 0.9, defense  # PA with FIRE
    assert float(poisoned["asr"]) <= 0.1
    assert float(poisoned["flagged_rate"]) >= 0.9 and float(clean["flagged_rate"]) <= 0.1
    assert "fire-defense" in (tmp_path / "report.html").read_text()


def test_bypass_lets_the_attack_through(served, traffic, tmp_path):
    run = headless(served, traffic, tmp_path / "bypass", "--bypass", "--poison-ratio", "0.5", protocol="http")
    assert run["stats"]["fire_ensemble"]["num_failures"] == 0
    poisoned = run["defense"]["poisoned"]
    assert int(poisoned["samples"]) > 0
    assert float(poisoned["asr"]) >= 0.9, run["defense"]  # the model is backdoored: FIRE did the work above
    assert float(poisoned["ca_or_pa"]) <= 0.1


def test_distributed_counters_reach_the_master(served, traffic, tmp_path):
    run = headless(served, traffic, tmp_path / "dist", "--processes", "2")
    assert "2 workers connected" in run["log"]
    model = run["stats"]["fire_ensemble"]
    defense = run["defense"]
    assert model["num_failures"] == 0 and model["num_requests"] > 50
    # Locust's own counts and the defense counts travel in the same worker reports: they must agree exactly.
    assert int(defense["clean"]["requests"]) + int(defense["poisoned"]["requests"]) == model["num_requests"]
    assert int(defense["clean"]["samples"]) + int(defense["poisoned"]["samples"]) == \
        run["stats"]["fire_ensemble/per-sample"]["num_requests"]
    assert float(defense["poisoned"]["ca_or_pa"]) >= 0.9


def test_step_load_adds_users_each_step(served, traffic, tmp_path):
    prefix = tmp_path / "step"
    proc = locust(["--headless", "--host", served.urls["grpc"], "--clean-npz", str(traffic["clean"]),
                   "--step-users", "2", "--step-time", "3", "--step-count", "2", "--csv", str(prefix),
                   "--csv-full-history", "--only-summary"], files=(LOCUSTFILE, LOCUSTFILE.with_name("stepload.py")))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    history = read_csv(Path(f"{prefix}_stats_history.csv"))
    users = [int(row["User Count"]) for row in history if row["Name"] == "Aggregated"]
    assert 2 in users and max(users) == 4, users  # 2 users, then 4, then the shape stops the test
