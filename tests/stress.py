"""The suite's stress mode (``FIRE_TEST_STRESS=1`` or ``pytest --stress``): the tests run beside busy processes, so
that what Triton 2.51 does only on a loaded machine (stubs starved, loads racing requests) shows up here and not on a
user's machine; and at the end, every tritonserver log this session left is read for aborts.

A tritonserver that exits other than by a requested stop keeps its log (``TritonServer.stop``), so the logs left
under the temporary directory that name this session's repositories are exactly the crashed runs. Tests crash the
server on purpose (a SIGKILL, Triton's own HTTP JSON crash), so aborts are counted by kind, and only the kinds no
test causes on purpose fail the session: ``lock_exception``, heap corruption and segmentation faults.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

STRESS_ENV = "FIRE_TEST_STRESS"
#: busy processes beside the tests: one per core of the 2-core machines this project is measured on
HOGS = 2
#: what a tritonserver log says when the server (or a stub) died, by kind; the first three no test causes on purpose
ABORTS = {
    "lock_exception": re.compile(r"boost::interprocess::lock_exception"),
    "heap corruption": re.compile(r"malloc\(\)|free\(\)|malloc_consolidate|double free|corrupted (size|double)"),
    "segmentation fault": re.compile(r"Signal \(11\) received"),
    "other abort": re.compile(r"Signal \(6\) received"),
}
UNEXPECTED = ("lock_exception", "heap corruption", "segmentation fault")


def requested(option: bool) -> bool:
    return option or os.environ.get(STRESS_ENV, "") not in ("", "0")


def start_hogs(count: int = HOGS) -> list[subprocess.Popen]:
    """``count`` processes that each keep a core busy until killed."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
            for _ in range(count)]


def stop_hogs(hogs: list[subprocess.Popen]) -> None:
    for hog in hogs:
        hog.kill()
        hog.wait()


@dataclass
class AbortReport:
    """The aborts found in the kept tritonserver logs of one session."""

    kinds: Counter = field(default_factory=Counter)
    logs: dict[str, list[str]] = field(default_factory=dict)  #: log -> kinds found in it

    @property
    def unexpected(self) -> int:
        return sum(self.kinds[kind] for kind in UNEXPECTED)

    def lines(self) -> list[str]:
        if not self.kinds:
            return ["tritonserver aborts in the logs: 0"]
        counts = ", ".join(f"{kind} {n}" for kind, n in self.kinds.most_common())
        return [f"tritonserver aborts in the logs: {counts}"] + [f"  {log}: {', '.join(kinds)}"
                                                                 for log, kinds in sorted(self.logs.items())]


def scan_logs(session_root: Path, since: float) -> AbortReport:
    """The aborts in tritonserver logs written since ``since`` (epoch seconds) that name ``session_root``."""
    report = AbortReport()
    for log in Path(tempfile.gettempdir()).glob("fire-tritonserver-*/tritonserver.log"):
        try:
            if log.stat().st_mtime < since:
                continue
            text = log.read_text(errors="replace")
        except OSError:
            continue
        if str(session_root) not in text:
            continue  # another session's (or another user's) server
        kinds = [kind for kind, pattern in ABORTS.items() if pattern.search(text)]
        if "lock_exception" in kinds or "heap corruption" in kinds:
            kinds = [kind for kind in kinds if kind != "other abort"]  # the SIGABRT those end in
        for kind in kinds:
            report.kinds[kind] += 1
        if kinds:
            report.logs[str(log)] = kinds
    return report
