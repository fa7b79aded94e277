"""``fire bench``: the cost of FIRE on the real server, measured with Locust.

Starts tritonserver on a repository (``fire bench`` defaults to the digits demo's), then for every concurrency
level runs Locust headless (the package's locustfile, one subprocess per run) against ``fire_ensemble``,
``undefended_ensemble`` and ``fire_monolithic`` in turn -- interleaved, so drift (thermal, background load)
hits all three alike.
Each run sends the locustfile's default 80/20 clean/poisoned mix, closed loop, ``--batch`` images per request.

Latency is per sample: a request's latency divided by its image count, exact (from Locust's ``--latency-file``,
not its rounded histogram); throughput is samples/s. The first ``warmup`` seconds of each run are left out of
both. Results: ``bench.json``, ``bench.csv`` and ``bench.png`` in ``--out``, Locust's own CSV/logs under
``--out/raw``, and a table (:func:`format_table`) the CLI prints. Progress goes to a callback.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fire_backend.loadtest import LOCUSTFILE
from fire_backend.loadtest.command import locust_command, run_locust
from fire_backend.wire.names import FIRE_ENSEMBLE, FIRE_MONOLITHIC, UNDEFENDED_ENSEMBLE

#: (row name, model) in the order they run at each concurrency.
TARGETS = (("fire", FIRE_ENSEMBLE), ("undefended", UNDEFENDED_ENSEMBLE), ("monolithic", FIRE_MONOLITHIC))
TRAFFIC_IMAGES = 400
Progress = Callable[[str], None]


@dataclass(frozen=True)
class BenchConfig:
    repository: Path
    concurrency: tuple[int, ...] = (1, 16)
    duration_s: float = 15.0
    batch: int = 1
    out: Path = Path("bench-results")
    protocol: str = "grpc"
    warmup_s: float = 2.0
    locustfile: Path | None = None


@dataclass
class BenchRow:
    target: str
    concurrency: int
    samples_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    model: str = ""
    batch: int = 1
    requests: int = 0
    samples: int = 0
    failures: int = 0
    mean_ms: float = 0.0
    window_s: float = 0.0
    #: CPU used during the run by processes other than the server and Locust, in cores (shared-machine noise).
    other_load_cores: float | None = None


@dataclass
class BenchReport:
    machine: dict
    rows: list[BenchRow]
    ratios: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"machine": self.machine, "rows": [asdict(r) for r in self.rows], "ratios": self.ratios,
                "settings": self.settings}


def parse_concurrency(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated integers like 1,16, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"expected positive integers like 1,16, got {text!r}")
    return values


# --------------------------------------------------------------------------------------------------
# machine
# --------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def machine_info(server_version: str | None = None) -> dict:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "cpu_model": _cpu_model(),
        "gpu": ", ".join(gpus) if gpus else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "tritonserver": server_version,
        "tritonclient": _version("tritonclient"),
        "locust": _version("locust"),
    }


def describe_machine(m: dict) -> str:
    gpu = f"GPU {m['gpu']}" if m.get("gpu") else "no GPU"
    return (f"{m['cores']} cores ({m['cpu_model']}), {gpu}, Python {m['python']}, torch {m['torch']}, "
            f"tritonserver {m.get('tritonserver') or '?'}, locust {m.get('locust') or '?'}")


# --------------------------------------------------------------------------------------------------
# traffic and runs
# --------------------------------------------------------------------------------------------------


class CpuMeter:
    """CPU seconds the whole machine spent busy vs. what the server tree and our Locust children used.

    The difference is other work on the machine; reported per run so a noisy neighbour is visible in the table.
    """

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid

    def _ours(self) -> float:
        import psutil

        total = 0.0
        try:
            root = psutil.Process(self.server_pid)
            for proc in [root, *root.children(recursive=True)]:
                try:
                    t = proc.cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    pass
        except (psutil.Error, ValueError, TypeError):
            pass
        t = os.times()  # reaped children: the Locust subprocesses
        return total + t.children_user + t.children_system

    @staticmethod
    def _busy() -> float:
        import psutil

        t = psutil.cpu_times()  # guest time is already inside user; steal is not ours to spend
        return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq"))

    def start(self) -> None:
        self._t0, self._busy0, self._ours0 = time.monotonic(), self._busy(), self._ours()

    def other_cores(self) -> float | None:
        wall = time.monotonic() - self._t0
        if wall <= 0:
            return None
        return max(0.0, (self._busy() - self._busy0) - (self._ours() - self._ours0)) / wall


def summarize(latency_file: Path, warmup_s: float) -> dict:
    """Per-sample percentiles and samples/s over requests that started after the warm-up."""
    data = np.loadtxt(latency_file, delimiter=",", skiprows=1, ndmin=2)
    start, latency, n = data[:, 0], data[:, 1], data[:, 2].astype(np.int64)
    keep = start >= start.min() + warmup_s
    if keep.sum() < 10:  # too short to drop a warm-up: keep everything
        keep = np.ones_like(keep)
    start, latency, n = start[keep], latency[keep], n[keep]
    per_sample = np.repeat(latency / n, n)
    window = float((start + latency / 1000.0).max() - start.min())
    return {
        "requests": int(len(n)), "samples": int(n.sum()), "window_s": window,
        "samples_per_s": float(n.sum() / window) if window > 0 else 0.0,
        "p50_ms": float(np.percentile(per_sample, 50)), "p95_ms": float(np.percentile(per_sample, 95)),
        "p99_ms": float(np.percentile(per_sample, 99)), "mean_ms": float(per_sample.mean()),
    }


def _failures(prefix: Path, model: str) -> int:
    stats = prefix.with_name(prefix.name + "_stats.csv")
    if not stats.is_file():
        return 0
    with stats.open() as handle:
        for row in csv.DictReader(handle):
            if row.get("Name") == model:
                return int(row.get("Failure Count") or 0)
    return 0


def ratios(rows: Sequence[BenchRow]) -> list[dict]:
    """Per concurrency: FIRE's throughput and p50/p95 latency relative to undefended and monolithic."""
    out = []
    by_key = {(r.target, r.concurrency): r for r in rows}
    for c in sorted({r.concurrency for r in rows}):
        fire = by_key.get(("fire", c))
        if fire is None:
            continue
        entry: dict = {"concurrency": c}
        for other in ("undefended", "monolithic"):
            base = by_key.get((other, c))
            if base is None:
                continue
            entry[f"throughput_fire_vs_{other}"] = fire.samples_per_s / base.samples_per_s if base.samples_per_s \
                else None
            entry[f"p50_fire_vs_{other}"] = fire.p50_ms / base.p50_ms if base.p50_ms else None
            entry[f"p95_fire_vs_{other}"] = fire.p95_ms / base.p95_ms if base.p95_ms else None
        out.append(entry)
    return out


# --------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------


def _cores(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def _load(settings: dict) -> str:
    values = [settings.get("loadavg_1m_start"), settings.get("loadavg_1m_end")]
    return " -> ".join(f"{v:.2f}" for v in values if v is not None) or "?"


def format_table(report: BenchReport) -> str:
    lines = [f"machine: {describe_machine(report.machine)}",
             f"per-sample latency (request latency / images per request), batch {report.settings.get('batch')}, "
             f"{report.settings.get('protocol')}, {report.settings.get('duration_s'):g} s per run; Locust on the same "
             f"machine; 1-min load average {_load(report.settings)}",
             f"{'target':11s} {'users':>5s} {'samples/s':>10s} {'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s} "
             f"{'requests':>9s} {'failures':>8s} {'other load':>10s}"]
    for r in report.rows:
        lines.append(f"{r.target:11s} {r.concurrency:5d} {r.samples_per_s:10.1f} {r.p50_ms:8.3f} {r.p95_ms:8.3f} "
                     f"{r.p99_ms:8.3f} {r.requests:9d} {r.failures:8d} {_cores(r.other_load_cores):>10s}")
    lines.append("(other load: cores busy with processes other than tritonserver and Locust during the run)")
    lines.append("FIRE relative to      throughput   p50 latency   p95 latency")

    def fmt(v):
        return f"{v:.3f}" if v is not None else "-"

    for entry in report.ratios:
        for other in ("undefended", "monolithic"):
            if f"throughput_fire_vs_{other}" in entry:
                throughput, p50, p95 = (fmt(entry[f"{k}_fire_vs_{other}"]) for k in ("throughput", "p50", "p95"))
                lines.append(f"  {other:11s} c={entry['concurrency']:<4d} {throughput:>10s} {p50:>13s} {p95:>13s}")
    return "\n".join(lines)


def write_outputs(report: BenchReport, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    with (out / "bench.csv").open("w", newline="") as handle:
        names = list(asdict(report.rows[0]).keys()) if report.rows else ["target"]
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        for row in report.rows:
            writer.writerow(asdict(row))
    plot(report, out / "bench.png")
    return [out / "bench.json", out / "bench.csv", out / "bench.png"]


def plot(report: BenchReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted({r.concurrency for r in report.rows})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(TARGETS)
    for i, (target, _) in enumerate(TARGETS):
        rows = {r.concurrency: r for r in report.rows if r.target == target}
        xs = np.arange(len(levels)) + (i - (len(TARGETS) - 1) / 2) * width
        ax1.bar(xs, [rows[c].samples_per_s if c in rows else 0 for c in levels], width, label=target)
        p50 = [rows[c].p50_ms if c in rows else np.nan for c in levels]
        p95 = [rows[c].p95_ms if c in rows else np.nan for c in levels]
        bars = ax2.bar(xs, p50, width, label=f"{target} p50")
        ax2.scatter(xs, p95, marker="_", s=200, color=bars.patches[0].get_facecolor(), zorder=3,
                    label=f"{target} p95")
    for ax, title, unit in ((ax1, "throughput", "samples/s"), (ax2, "per-sample latency (bar p50, tick p95)", "ms")):
        ax.set_xticks(np.arange(len(levels)), [f"{c} user{'s' if c > 1 else ''}" for c in levels])
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    ax1.legend()
    ax2.legend(fontsize=7, ncol=2)
    m = report.machine
    fig.suptitle(f"fire bench, batch {report.settings.get('batch')}: {m['cores']} cores, "
                 f"{'GPU ' + m['gpu'] if m.get('gpu') else 'no GPU'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------


def _run(config: BenchConfig, locustfile: Path, url: str, model: str, users: int, prefix: Path,
         traffic: tuple[Path, Path | None], target: int) -> Path:
    latency_file = prefix.with_name(prefix.name + "_latency.csv")
    latency_file.unlink(missing_ok=True)
    run_time = config.duration_s + config.warmup_s
    clean, poisoned = traffic
    command = locust_command(url, users=users, run_time_s=run_time, csv_prefix=prefix, clean_npz=clean,
                             poisoned_npz=poisoned, target=target, model=model, batch=config.batch,
                             latency_file=latency_file, locustfile=locustfile)
    log = prefix.with_name(prefix.name + ".log")
    code = run_locust(command, timeout_s=run_time + 120, log=log)
    if not latency_file.is_file():
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"locust run for {model} at {users} users wrote no latencies (exit {code}); "
                           f"log {log}:\n{tail}")
    return latency_file


def run_bench(config: BenchConfig, progress: Progress) -> BenchReport:
    """Serve the repository and measure every target at every concurrency; writes the files into ``config.out``."""
    from fire_backend.data import load_dataset
    from fire_backend.data.export import write_traffic
    from fire_backend.serving.artifacts import ARTIFACTS_DIR, ServingSettings, require_fire_repository
    from fire_backend.serving.server import running_server
    from fire_backend.wire.client import FireClient

    locustfile = (config.locustfile or LOCUSTFILE).resolve()
    if not locustfile.is_file():
        raise FileNotFoundError(f"{locustfile}: no such Locust file")
    repository = require_fire_repository(config.repository.resolve())
    out = config.out
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    settings = ServingSettings.read(repository / ARTIFACTS_DIR)
    if not settings.dataset:
        raise ValueError(f"{repository}: serving settings name no data set: cannot make bench traffic")
    traffic = write_traffic(load_dataset(settings.dataset), settings.attack, settings.target, out / "data",
                            TRAFFIC_IMAGES)
    target = max(settings.target, 0)
    rows: list[BenchRow] = []
    progress(f"fire bench: {repository}, concurrency {','.join(map(str, config.concurrency))}, "
             f"{config.duration_s:g} s per run (+{config.warmup_s:g} s warm-up), batch {config.batch}, "
             f"{config.protocol}")
    started = time.time()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with running_server(repository, http_inference=config.protocol == "http") as server:
        url = server.urls[config.protocol] if config.protocol == "http" else f"grpc://{server.urls['grpc']}"
        with FireClient(url) as client:
            server_version = client.server_metadata().get("version")
            for _, model in TARGETS:  # load check and first-call warm-up, outside the measured runs
                client.infer_batches(np.zeros((config.batch, *client.model_info(model).input_shape), np.float32),
                                     config.batch, model)
        progress(f"tritonserver {server_version} ready in {server.startup_s or 0:.1f}s at {url}")
        for users in config.concurrency:
            for name, model in TARGETS:
                prefix = raw / f"{name}-c{users}"
                meter = CpuMeter(server.pid)
                meter.start()
                latency_file = _run(config, locustfile, url, model, users, prefix, traffic, target)
                other = meter.other_cores()
                stats = summarize(latency_file, config.warmup_s)
                row = BenchRow(target=name, concurrency=users, model=model, batch=config.batch,
                               failures=_failures(prefix, model), other_load_cores=other, **stats)
                rows.append(row)
                progress(f"  {name:11s} users {users:3d}: {row.samples_per_s:8.1f} samples/s, p50 {row.p50_ms:.3f} "
                         f"ms, p95 {row.p95_ms:.3f} ms, p99 {row.p99_ms:.3f} ms ({row.requests} requests, "
                         f"{row.failures} failures; other load {_cores(other)} cores)")
    machine = machine_info(server_version)
    settings_out = {"repository": str(repository), "concurrency": list(config.concurrency),
                    "duration_s": config.duration_s, "warmup_s": config.warmup_s, "batch": config.batch,
                    "protocol": config.protocol, "locustfile": str(locustfile), "elapsed_s": time.time() - started,
                    # load generator and server share this machine; other load skews the numbers
                    "loadavg_1m_start": load_start,
                    "loadavg_1m_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    return BenchReport(machine=machine, rows=rows, ratios=ratios(rows), settings=settings_out)
