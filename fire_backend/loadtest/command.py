"""Headless Locust runs of the packaged locustfile, as ``fire bench`` and ``fire demo`` start them.

The command line is built here once (:func:`locust_command`); :func:`locust_summary` reads back the ``--csv``
files a run wrote: per-sample latency and throughput from Locust's stats, live CA/PA/ASR from the defense CSV.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from fire_backend.loadtest import DEFENSE_CSV_SUFFIX, LOCUSTFILE, PER_SAMPLE_CSV_SUFFIX


def locust_command(host: str, *, users: int, run_time_s: float, csv_prefix: Path, clean_npz: Path,
                   poisoned_npz: Path | None = None, target: int = 0, model: str | None = None,
                   batch: int | None = None, latency_file: Path | None = None,
                   locustfile: Path = LOCUSTFILE) -> list[str]:
    """``python -m locust`` headless: ``users`` users spawned at once, closed loop for ``run_time_s`` seconds,
    against ``host`` (``grpc://H:P`` or ``http://H:P``), the locustfile's 80/20 clean/poisoned mix."""
    command = [
        sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "-u", str(users), "-r", str(users),
        "-t", f"{run_time_s:g}s", "--host", host, "--clean-npz", str(clean_npz), "--target", str(target),
        "--csv", str(csv_prefix), "--only-summary", "--loglevel", "WARNING", "--stop-timeout", "2",
    ]
    if poisoned_npz is not None:
        command += ["--poisoned-npz", str(poisoned_npz)]
    if model is not None:
        command += ["--model", model]
    if batch is not None:
        command += ["--batch", str(batch)]
    if latency_file is not None:
        command += ["--latency-file", str(latency_file)]
    return command


def run_locust(command: Sequence[str], timeout_s: float, log: Path | None = None, check: bool = False) -> int:
    """Run a command from :func:`locust_command`; its output goes to ``log`` (else nowhere). Returns the exit code
    (``check``: raise CalledProcessError unless it is 0)."""
    if log is None:
        return subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=timeout_s,
                              check=check).returncode
    with log.open("w") as handle:
        return subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout_s,
                              check=check).returncode


def locust_summary(csv_prefix: Path) -> dict:
    """p50 per-sample latency, samples/s and failures of the run's one model from ``PREFIX_per_sample.csv``; live
    CA, PA and ASR from ``PREFIX_defense.csv``."""
    with open(f"{csv_prefix}{PER_SAMPLE_CSV_SUFFIX}") as handle:
        (per_sample,) = list(csv.DictReader(handle))
    with open(f"{csv_prefix}{DEFENSE_CSV_SUFFIX}") as handle:
        defense = {r["traffic"]: r for r in csv.DictReader(handle)}
    return {
        "p50_ms": float(per_sample["p50_ms"]), "samples_per_s": float(per_sample["samples_per_s"]),
        "failures": int(per_sample["failures"]),
        "ca": float(defense["clean"]["ca_or_pa"]), "pa": float(defense["poisoned"]["ca_or_pa"]),
        "asr": float(defense["poisoned"]["asr"]),
    }
