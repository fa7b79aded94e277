"""The suite's stress mode (tests/stress.py): the busy processes, the scan of the logs a session left, and that CI
runs it once."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest
import stress

from fire_backend.procfs import process_state

ROOT = Path(__file__).resolve().parents[2]


def test_the_hogs_keep_cores_busy_until_stopped() -> None:
    hogs = stress.start_hogs(2)
    try:
        time.sleep(0.5)
        assert [process_state(hog.pid) for hog in hogs] == ["R", "R"] or all(hog.poll() is None for hog in hogs)
    finally:
        stress.stop_hogs(hogs)
    assert all(hog.poll() is not None for hog in hogs)


def test_the_scan_counts_aborts_by_kind_in_this_sessions_logs_only(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    session = tmp_path / "pytest-7"
    logs = {
        "a": f"=== fire-backend: start 1: tritonserver --model-repository={session}/x/models\n"
             "terminate called after throwing an instance of 'boost::interprocess::lock_exception'\n"
             "Signal (6) received.\n",
        "b": f"=== fire-backend: start 1: tritonserver --model-repository={session}/y/models\n"
             "terminate called after throwing an instance of 'std::bad_alloc'\nSignal (6) received.\n",
        "c": f"--model-repository={session}/z/models\nmalloc_consolidate(): unaligned fastbin chunk detected\n",
        "d": "--model-repository=/elsewhere/models\nSignal (11) received.\n",  # another session's server
        "e": f"--model-repository={session}/w/models\nI ... successfully loaded 'echo'\n",
    }
    for name, text in logs.items():
        (tmp_path / f"fire-tritonserver-{name}").mkdir()
        (tmp_path / f"fire-tritonserver-{name}" / "tritonserver.log").write_text(text)
    report = stress.scan_logs(session, since=0.0)
    assert report.kinds == {"lock_exception": 1, "other abort": 1, "heap corruption": 1}
    assert report.unexpected == 2 and len(report.logs) == 3
    assert "lock_exception 1" in report.lines()[0]
    assert stress.scan_logs(session, since=time.time() + 60).lines() == ["tritonserver aborts in the logs: 0"]


def test_ci_runs_the_server_tests_once_in_stress_mode() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert f"{stress.STRESS_ENV}=1 python -m pytest -q tests/integration tests/security" in script
