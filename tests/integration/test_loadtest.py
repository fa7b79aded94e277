"""loadtest/locustfile.py: real Locust (headless subprocesses, or its web UI on a free loopback port) against the
real tritonserver, on loopback.

The servers: the session's `defended` repository (built with --flagged 20, so FIRE repairs from the first request)
and, for learning online mid-run, the session's `learning` one (no direction until `fire ctl observe`). Every
Locust run is bounded (-t plus a subprocess timeout).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fire_backend.cli import main as fire_main
from fire_backend.launcher.ports import free_port
from fire_backend.loadtest.defense import WINDOW_S
from fire_backend.wire.control import ControlClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
RUN_SECONDS = 10
DEFENSE_COLUMNS = {"traffic", "requests", "samples", "ca_or_pa", "asr", "flagged_rate"}


@pytest.fixture(scope="module")
def checkpoint(badnets_checkpoint) -> Path:
    return badnets_checkpoint


@pytest.fixture(scope="module")
def traffic(checkpoint: Path, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("loadtest-data")
    paths = {"clean": out / "clean.npz", "poisoned": out / "poisoned.npz"}
    for kind, path in paths.items():
        argv = ["data", "export", "--checkpoint", str(checkpoint), "--split", "test", "--n", "200",
                "--out", str(path)] + (["--poisoned"] if kind == "poisoned" else [])
        assert fire_main(argv) == 0
    return paths


def locust_cmd(args: list[str], files: tuple[Path, ...] = (LOCUSTFILE,)) -> list[str]:
    return [sys.executable, "-m", "locust", "-f", ",".join(map(str, files)), "--loglevel", "INFO", *args]


def locust(args: list[str], files: tuple[Path, ...] = (LOCUSTFILE,),
           timeout: float = RUN_SECONDS + 60) -> subprocess.CompletedProcess:
    return subprocess.run(locust_cmd(args, files), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          check=False)


def start_locust(args: list[str], log: Path) -> subprocess.Popen:
    """Locust in the background (its output in ``log``), for tests that act on it while it runs."""
    with log.open("w") as handle:
        return subprocess.Popen(locust_cmd(args), cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


def headless(served, traffic, prefix: Path, *extra: str, protocol: str = "grpc", users: int = 4) -> dict:
    host = served.urls[protocol]
    proc = locust(["--headless", "-u", str(users), "-r", str(users), "-t", f"{RUN_SECONDS}s", "--host", host,
                   "--clean-npz", str(traffic["clean"]), "--poisoned-npz", str(traffic["poisoned"]),
                   "--target", "0", "--csv", str(prefix), "--json-file", str(prefix), "--only-summary", *extra])
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    # Final counts from --json-file (written at shutdown, like the defense CSV); the _stats.csv is rewritten
    # once a second and can miss the last requests.
    return {**final_outputs(prefix), "log": log}


def final_outputs(prefix: Path) -> dict:
    """What a run wrote at its end: Locust's entries (--json-file), the FIRE defense and per-sample CSVs."""
    stats = {entry["name"]: entry for entry in json.loads(Path(f"{prefix}.json").read_text())}
    # Locust's _stats.csv is rewritten once a second (it can miss the last requests), but each version is one
    # consistent snapshot: its Aggregated row must count each request once.
    locust_rows = {row["Name"]: row for row in read_csv(Path(f"{prefix}_stats.csv"))}
    assert set(locust_rows) == {*stats, "Aggregated"}, locust_rows.keys()
    assert int(locust_rows["Aggregated"]["Request Count"]) == sum(
        int(row["Request Count"]) for name, row in locust_rows.items() if name != "Aggregated")
    defense = {row["traffic"]: row for row in read_csv(Path(f"{prefix}_defense.csv"))}
    per_sample = {row["name"]: row for row in read_csv(Path(f"{prefix}_per_sample.csv"))}
    return {"stats": stats, "defense": defense, "per_sample": per_sample,
            "history": read_csv(Path(f"{prefix}_defense_history.csv"))}


def read_csv(path: Path) -> list[dict]:
    assert path.is_file(), f"{path} was not written"
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_fire_repairs_poisoned_traffic(served, traffic, tmp_path):
    # --reset-stats: Locust resets its stats once the users are spawned; the defense counters must follow.
    run = headless(served, traffic, tmp_path / "fire", "--batch", "4", "--reset-stats",
                   "--html", str(tmp_path / "report.html"))
    stats, defense = run["stats"], run["defense"]
    assert set(stats) == {"fire_ensemble"}  # one entry per request: no per-sample entries in Locust's totals
    model = stats["fire_ensemble"]
    requests = model["num_requests"]
    assert requests > 50 and model["last_request_timestamp"] > model["start_time"]  # nonzero throughput
    assert model["num_failures"] == 0
    per_sample = run["per_sample"]["fire_ensemble"]
    assert int(per_sample["batch"]) == 4 and int(per_sample["requests"]) == requests
    assert int(per_sample["samples"]) == 4 * requests
    mean_request_ms = model["total_response_time"] / requests
    assert float(per_sample["avg_ms"]) == pytest.approx(mean_request_ms / 4, abs=1e-3)  # latency / 4
    assert float(per_sample["p50_ms"]) <= float(per_sample["p95_ms"]) <= float(per_sample["p99_ms"])

    assert DEFENSE_COLUMNS <= set(defense["clean"])
    clean, poisoned = defense["clean"], defense["poisoned"]
    assert int(clean["requests"]) + int(poisoned["requests"]) == requests
    assert 0.05 < int(poisoned["requests"]) / requests < 0.45  # the 80/20 mix
    assert float(clean["ca_or_pa"]) >= 0.95
    assert float(poisoned["ca_or_pa"]) >= 0.9, defense  # PA with FIRE
    assert float(poisoned["asr"]) <= 0.1
    assert float(poisoned["flagged_rate"]) >= 0.9 and float(clean["flagged_rate"]) <= 0.1
    assert float(poisoned["ca_or_pa_current"]) >= 0.9  # the same server all along: current and total agree
    page = (tmp_path / "report.html").read_text()
    section = page.rindex('<section id="fire"')
    assert section > page.rindex("</script>")  # in the page itself, not inside an inlined script's string
    assert all(key in page[section:] for key in ("fire-defense", "fire-per-sample", "FIRE defense over time"))


def test_bypass_lets_the_attack_through(served, traffic, tmp_path, monkeypatch):
    monkeypatch.setenv("FIRE_CONTROL_TOKEN", served.token)  # the users sign each bypass request with it
    monkeypatch.setenv("FIRE_CONTROL_TOKEN_FILE", "")
    run = headless(served, traffic, tmp_path / "bypass", "--bypass", "--poison-ratio", "0.5", protocol="http")
    assert run["stats"]["fire_ensemble"]["num_failures"] == 0
    poisoned = run["defense"]["poisoned"]
    assert int(poisoned["samples"]) > 0
    assert float(poisoned["asr"]) >= 0.9, run["defense"]  # the model is backdoored: FIRE did the work above
    assert float(poisoned["ca_or_pa"]) <= 0.1


def test_distributed_counters_reach_the_master(served, traffic, tmp_path):
    run = headless(served, traffic, tmp_path / "dist", "--processes", "2", "--batch", "2", "--reset-stats")
    assert "2 workers connected" in run["log"]
    model = run["stats"]["fire_ensemble"]
    defense = run["defense"]
    assert model["num_failures"] == 0 and model["num_requests"] > 50
    # Locust's own counts and the defense counts travel in the same worker reports (and were reset together at
    # the end of the ramp-up): they must agree exactly.
    assert int(defense["clean"]["requests"]) + int(defense["poisoned"]["requests"]) == model["num_requests"]
    assert int(defense["clean"]["samples"]) + int(defense["poisoned"]["samples"]) == \
        int(run["per_sample"]["fire_ensemble"]["samples"]) == 2 * model["num_requests"]
    assert float(defense["poisoned"]["ca_or_pa"]) >= 0.9
    assert len(run["history"]) >= 2 * len(defense)  # the master keeps the over-time history


def test_step_load_adds_users_each_step(served, traffic, tmp_path):
    prefix = tmp_path / "step"
    proc = locust(["--headless", "--host", served.urls["grpc"], "--clean-npz", str(traffic["clean"]),
                   "--step-users", "2", "--step-time", "3", "--step-count", "2", "--csv", str(prefix),
                   "--csv-full-history", "--only-summary"], files=(LOCUSTFILE, LOCUSTFILE.with_name("stepload.py")))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    history = read_csv(Path(f"{prefix}_stats_history.csv"))
    users = [int(row["User Count"]) for row in history if row["Name"] == "Aggregated"]
    assert 2 in users and max(users) == 4, users  # 2 users, then 4, then the shape stops the test


# --------------------------------------------------------------------------------------------------
# current vs cumulative figures across `fire ctl observe`; RESET and the web UI
# --------------------------------------------------------------------------------------------------

OBSERVE_RUN_S = 32
ATTACKED_S = 8


def poisoned_points(history: list[dict]) -> list[tuple[float, float | None, float]]:
    """(time, current PA, cumulative PA) of each history point."""
    return [(float(r["timestamp"]), float(r["ca_or_pa_current"]) if r["ca_or_pa_current"] else None,
             float(r["ca_or_pa"])) for r in history if r["traffic"] == "poisoned" and r["ca_or_pa"]]


def wait_for_requests(prefix: Path, proc: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    """Until Locust's _stats.csv (rewritten every second) shows answered requests."""
    deadline = time.monotonic() + timeout
    path = Path(f"{prefix}_stats.csv")
    while True:
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
        if path.is_file():
            rows = list(csv.DictReader(path.open()))
            if any(r["Name"] == "Aggregated" and int(r["Request Count"]) > 0 for r in rows):
                return
        time.sleep(0.2)


def test_current_pa_rises_after_observe_while_the_cumulative_one_lags(learning, checkpoint, traffic, tmp_path,
                                                                      monkeypatch):
    flagged = tmp_path / "flagged.npz"  # from the training split: disjoint from the traffic's test images
    assert fire_main(["data", "export", "--checkpoint", str(checkpoint), "--split", "train", "--poisoned",
                      "--n", "20", "--out", str(flagged)]) == 0
    monkeypatch.setenv("FIRE_CONTROL_TOKEN", learning.token)
    with ControlClient(learning.grpc, learning.token) as ctl:
        ctl.rollback(0)  # no direction: the attack goes through
    prefix, log = tmp_path / "observe", tmp_path / "observe.log"
    proc = start_locust(["--headless", "-u", "2", "-r", "2", "-t", f"{OBSERVE_RUN_S}s", "--host",
                         f"grpc://{learning.grpc}", "--clean-npz", str(traffic["clean"]), "--poisoned-npz",
                         str(traffic["poisoned"]), "--poison-ratio", "0.5", "--target", "0", "--csv", str(prefix),
                         "--json-file", str(prefix), "--only-summary"], log)
    try:
        wait_for_requests(prefix, proc, log)
        traffic_start = time.time()
        time.sleep(ATTACKED_S)  # attacked traffic first
        observe_start = time.time()
        assert fire_main(["ctl", "--url", learning.grpc, "observe", str(flagged)]) == 0  # learn the direction
        observe_end = time.time()
        finish(proc, log, timeout=OBSERVE_RUN_S + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
        with ControlClient(learning.grpc, learning.token) as ctl:
            ctl.rollback(0)
    assert observe_end + WINDOW_S + 2 < traffic_start + OBSERVE_RUN_S - 2, "observe too slow to test the window"
    run = final_outputs(prefix)
    points = poisoned_points(run["history"])
    before = [p for p in points if p[0] < observe_start]
    after = [p for p in points if p[0] > observe_end + WINDOW_S]  # windows that hold only repaired traffic
    assert before and after, points
    assert all(current is not None and current <= 0.2 for _, current, _ in before), before  # attacked
    assert all(current >= 0.9 for _, current, _ in after), after  # the repaired traffic, at once...
    _, current, cumulative = after[0]
    assert cumulative <= current - 0.15, after  # ...while the cumulative figure still carries the attack
    assert all(cumulative < current for _, current, cumulative in after), after  # and keeps lagging
    cumulative = [c for _, _, c in points]
    assert cumulative[-1] > before[-1][2]  # catching up, slowly
    poisoned = run["defense"]["poisoned"]
    assert float(poisoned["ca_or_pa_current"]) >= 0.9 and float(poisoned["asr_current"]) <= 0.1
    assert float(poisoned["ca_or_pa"]) < float(poisoned["ca_or_pa_current"])
    assert float(poisoned["flagged_rate_current"]) >= 0.9  # the learned direction also flags the trigger


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def defense_requests(base: str) -> int:
    return sum(row["requests"] for row in get_json(f"{base}/fire/defense")["rows"])


def test_web_ui_reset_zeroes_the_defense_counters_of_a_distributed_run(served, traffic, tmp_path):
    port, prefix, log = free_port(), tmp_path / "ui", tmp_path / "ui.log"
    base = f"http://127.0.0.1:{port}"
    proc = start_locust(["--web-host", "127.0.0.1", "--web-port", str(port), "--autostart", "--autoquit", "1",
                         "-u", "2", "-r", "2", "-t", "16s", "--processes", "2", "--host", served.urls["grpc"],
                         "--clean-npz", str(traffic["clean"]), "--poisoned-npz", str(traffic["poisoned"]),
                         "--batch", "2", "--csv", str(prefix), "--json-file", str(prefix)], log)
    try:
        deadline = time.monotonic() + 40
        before = 0
        while before < 150:  # a few worker reports in (one every 3 s per worker)
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
            try:
                before = defense_requests(base)
            except OSError:  # the web UI is not up yet
                continue
        stats = get_json(f"{base}/stats/requests")
        entries = {e["name"]: e for e in stats["stats"]}
        assert set(entries) == {"fire_ensemble", "Aggregated"}  # Aggregated counts each request once
        assert entries["Aggregated"]["num_requests"] == entries["fire_ensemble"]["num_requests"]
        assert stats["total_rps"] == pytest.approx(entries["fire_ensemble"]["total_rps"])
        assert {e["key"] for e in stats["extended_stats"]} == {"fire-defense", "fire-per-sample"}
        assert "fire-defense-chart" in urllib.request.urlopen(base + "/", timeout=10).read().decode()
        with urllib.request.urlopen(f"{base}/fire/defense/chart.svg", timeout=10) as response:
            assert response.headers["Content-Type"].startswith("image/svg+xml") and b"<svg" in response.read()

        request = urllib.request.Request(f"{base}/stats/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:  # what the RESET button sends
            assert response.status == 200
        after = get_json(f"{base}/fire/defense")
        # Zeroed on the master; only a worker report that lands between the two calls can add to it.
        assert sum(row["requests"] for row in after["rows"]) < before
        assert len(get_json(f"{base}/fire/defense/history")["history"]) <= 1
        finish(proc, log, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    run = final_outputs(prefix)
    model, defense = run["stats"]["fire_ensemble"], run["defense"]
    # Reset together, fed by the same worker reports since: Locust's count and the defense count agree exactly
    # (without the reset the defense count would still hold the `before` requests).
    assert int(defense["clean"]["requests"]) + int(defense["poisoned"]["requests"]) == model["num_requests"] > 0
    assert int(run["per_sample"]["fire_ensemble"]["samples"]) == 2 * model["num_requests"]


@pytest.mark.parametrize("down", ["refused", "silent"])
@pytest.mark.parametrize("stop", ["sigterm", "time_limit"])
def test_locust_exits_on_sigterm_and_its_time_limit_whatever_the_server_does(tmp_path, down, stop):
    """Issue 25: against a server that is down (a closed port, or one that accepts and never answers), Locust once
    never exited and ignored SIGTERM and SIGINT (a gRPC channel closed by the garbage collector under gevent). It
    must exit on SIGTERM and on -t, promptly; a watchdog ends any shutdown that still hangs (SHUTDOWN_GRACE_S)."""
    import signal
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        if down == "silent":
            listener.listen(16)  # accepts connections (the kernel does) and never answers
        port = listener.getsockname()[1]
        if down == "refused":
            listener.close()
        args = ["--headless", "-u", "2", "-r", "2", "--host", f"grpc://127.0.0.1:{port}"]
        log = tmp_path / "locust.log"
        proc = start_locust(args + (["-t", "5s"] if stop == "time_limit" else []), log)
        try:
            if stop == "sigterm":
                time.sleep(8)
                proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            proc.wait(timeout=30)
            took = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    print(f"{down} server, {stop}: exited {took:.1f} s after (code {proc.returncode})")
    assert proc.returncode in (0, 1), log.read_text()[-3000:]  # not killed by the watchdog: a clean exit
