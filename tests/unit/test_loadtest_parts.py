"""fire_backend.loadtest without a server: defense counters, the traffic mix, options, and Locust's --help.

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

import numpy as np
import pytest

from fire_backend.loadtest.defense import CSV_COLUMNS, DefenseStats, defense_csv
from fire_backend.loadtest.locust_help import locust_arguments
from fire_backend.loadtest.options import GROUPS, add_options
from fire_backend.loadtest.traffic import Pool, Traffic, host_protocol
from fire_backend.wire.client import InferResult

ROOT = Path(__file__).resolve().parents[2]
LOCUST = Path(sys.executable).with_name("locust")  # the console script, as users type it
#: what `locust -f loadtest/locustfile.py --help` must list: mix, attack and protocol options
FIRE_OPTIONS = ("--clean-npz", "--poisoned-npz", "--poison-ratio", "--batch", "--target", "--model", "--bypass",
                "--protocol", "--request-timeout", "--step-users")


def result(labels, flagged=None) -> InferResult:
    return InferResult(labels=np.asarray(labels), flagged=None if flagged is None else np.asarray(flagged, bool))


# --------------------------------------------------------------------------------------------------
# defense counters
# --------------------------------------------------------------------------------------------------


def test_defense_rates_follow_their_definitions():
    stats = DefenseStats()
    # clean: 3 of 4 right, 1 flagged
    stats.record("clean", np.array([1, 2, 3, 0]), result([1, 2, 0, 0], [0, 1, 0, 0]), target=0)
    # poisoned, true labels 0 (target), 5, 6, 7: one repaired (5), two hijacked to the target (6, 7)
    stats.record("poisoned", np.array([0, 5, 6, 7]), result([0, 5, 0, 0], [1, 1, 1, 0]), target=0)
    rows = {r["traffic"]: r for r in stats.rows()}
    assert rows["clean"]["ca_or_pa"] == 0.75 and rows["clean"]["flagged_rate"] == 0.25
    poisoned = rows["poisoned"]
    assert poisoned["ca_or_pa"] == 0.5  # label 0 and label 5 right
    assert poisoned["asr"] == pytest.approx(2 / 3)  # over the three samples whose true label is not the target
    assert poisoned["flagged_rate"] == 0.75
    assert poisoned["requests"] == 1 and poisoned["samples"] == 4


def test_models_without_flags_report_no_flagged_rate():
    stats = DefenseStats()
    stats.record("clean", np.array([1, 2]), result([1, 2]), target=0)
    clean = next(r for r in stats.rows() if r["traffic"] == "clean")
    assert clean["flagged_rate"] is None and clean["ca_or_pa"] == 1.0
    poisoned = next(r for r in stats.rows() if r["traffic"] == "poisoned")
    assert poisoned["ca_or_pa"] is None and poisoned["asr"] is None  # no traffic: no rate, not zero


def test_worker_deltas_add_up_on_the_master():
    worker, master = DefenseStats(), DefenseStats()
    worker.record("poisoned", np.array([3, 4]), result([0, 4], [1, 1]), target=0)
    master.merge(worker.pop())
    worker.record("poisoned", np.array([5]), result([0], [1]), target=0)
    master.merge(worker.pop())
    master.merge(worker.pop())  # nothing new: adds nothing
    master.merge({"unknown-kind": {"requests": 9}})
    counts = master.snapshot()["poisoned"]
    assert counts["requests"] == 2 and counts["samples"] == 3 and counts["target_hits"] == 2
    assert worker.snapshot()["poisoned"]["requests"] == 0


def test_defense_csv_has_the_documented_columns():
    stats = DefenseStats()
    stats.record("clean", np.array([1]), result([1], [0]), target=0)
    rows = list(csv.DictReader(io.StringIO(defense_csv(stats.rows()))))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert {"traffic", "requests", "samples", "ca_or_pa", "asr", "flagged_rate"} <= set(rows[0])
    assert rows[0]["ca_or_pa"] == "1.0000" and rows[1]["ca_or_pa"] == ""


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
