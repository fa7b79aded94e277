"""``fire bench``: the cost of FIRE on the real server, every layout against the baselines, measured with Locust.

Builds one repository with every way of serving the network (:func:`bench_targets`): the three FIRE layouts
(``fused``, the default, as ``fire_ensemble``; ``inline`` and ``separate`` under their own names; ``separate`` only
where the repository repairs at one layer, :func:`bench_layouts`), the undefended
split (head -> tail, no repair) and the monolithic model (unsplit, no repair); from a checkpoint (with a direction
estimated from 20 flagged reserve images) or from an existing repository (its network, settings and live
direction; a store at version 0 gets one synthetic direction, so the repair costs what it costs in service).
Starts tritonserver once, then, for every concurrency level, runs Locust headless against each target in turn, over
each asked protocol -- interleaved, so drift (thermal, background load) hits all alike -- ``rounds`` times. The
protocols (:data:`BENCH_PROTOCOLS`): ``grpc`` (tritonserver's own gRPC), ``http`` (KServe v2 through the HTTP front,
as clients get it) and ``triton-http`` (tritonserver's own HTTP, exposed on a loopback port for this comparison
only: what the front costs). Each run sends the
locustfile's default 80/20 clean/poisoned mix, closed loop, ``--batch`` images per request.

Latency is per sample: a request's latency divided by its image count, exact (from Locust's ``--latency-file``,
not its rounded histogram); throughput is samples/s. The first ``warmup`` seconds of each run are left out of
both. Around each run Triton's own per-model counters are read (:mod:`fire_backend.stage_metrics`): per stage, the
mean dynamic batch and the queue and compute time. Results: ``bench.json``, ``bench.csv`` and ``bench.png`` in
``--out``, Locust's own CSV/logs under ``--out/raw``, and a table (:func:`format_table`) the CLI prints. Progress
goes to a callback.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from fire_backend import stage_metrics
from fire_backend.loadtest import LOCUSTFILE
from fire_backend.loadtest.command import locust_command, run_locust
from fire_backend.wire.names import FIRE_MONOLITHIC, UNDEFENDED_ENSEMBLE

#: how the layouts compare: (row, numerator target, denominator target)
COMPARISONS = (
    ("default vs undefended split", "fused", "undefended"),
    ("fused vs monolithic", "fused", "monolithic"),
    ("inline vs undefended split", "inline", "undefended"),
    ("separate vs undefended split", "separate", "undefended"),
)
#: how the protocols compare, for each target measured over both: (row, numerator, denominator)
PROTOCOL_COMPARISONS = (
    ("HTTP front vs Triton's own HTTP", "http", "triton-http"),
    ("HTTP front vs gRPC", "http", "grpc"),
)
#: what a bench run can measure a target over: gRPC, HTTP through the front, tritonserver's own HTTP
BENCH_PROTOCOLS = ("grpc", "http", "triton-http")
#: the FIRE layout fire_ensemble gets in the bench repository (the builder's default)
DEFAULT_TARGET = "fused"
#: every target a bench repository can serve (:func:`bench_targets`: the layouts, then the two baselines)
BENCH_TARGETS = ("fused", "inline", "separate", "undefended", "monolithic")
TRAFFIC_IMAGES = 400
#: flagged reserve images of the direction a bench repository built from a checkpoint starts with
BENCH_FLAGGED = 20
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Target:
    """One way of serving the network: the model a client calls, and every model that serves it."""

    name: str
    model: str
    stages: tuple[str, ...]


def bench_layouts(repair_layers: int, cut: bool = True) -> tuple[str, ...]:
    """The FIRE layouts a bench repository serves: all three for one repair layer; ``separate`` repairs one layer,
    so a repository repairing at several (the default build) is compared in ``fused`` and ``inline``; a network that
    cannot be cut at its split layer (``cut`` false) is served ``fused`` only."""
    if not cut:
        return ("fused",)
    return ("fused", "inline", "separate") if repair_layers == 1 else ("fused", "inline")


def bench_targets(layouts: Sequence[str], cut: bool = True) -> list[Target]:
    """The targets of a bench repository, in the order they run (the models come from the repository builder); no
    undefended split for a network that cannot be cut (``cut`` false)."""
    from fire_backend.repository.build import LAYOUT_MODELS, served_models
    from fire_backend.wire.names import FIRE_ENSEMBLE

    targets = []
    for layout in layouts:
        public = FIRE_ENSEMBLE if layout == DEFAULT_TARGET else LAYOUT_MODELS[layout]
        models = served_models(public, layout)
        targets.append(Target(layout, public, tuple(models)))
    undefended, monolithic = BENCH_TARGETS[3:]
    if cut:
        targets.append(Target(undefended, UNDEFENDED_ENSEMBLE, tuple(served_models(UNDEFENDED_ENSEMBLE, "inline"))))
    targets.append(Target(monolithic, FIRE_MONOLITHIC, (FIRE_MONOLITHIC,)))
    return targets


@dataclass(frozen=True)
class BenchConfig:
    """What to measure: exactly one of ``repository`` and ``checkpoint`` (with ``layer``, ``gpu``)."""

    repository: Path | None = None
    checkpoint: Path | None = None
    layer: str | None = None
    gpu: bool = False
    concurrency: tuple[int, ...] = (1, 16)
    duration_s: float = 15.0
    batch: int = 1
    out: Path = Path("bench-results")
    protocols: tuple[str, ...] = ("grpc",)
    warmup_s: float = 2.0
    rounds: int = 1
    locustfile: Path | None = None
    #: the targets to measure (names of :func:`bench_targets`); None: every one
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if (self.repository is None) == (self.checkpoint is None):
            raise ValueError("give a repository or a checkpoint to benchmark (one of them)")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        unknown = sorted(set(self.protocols) - set(BENCH_PROTOCOLS))
        if not self.protocols or unknown:
            raise ValueError(f"protocols must be among {', '.join(BENCH_PROTOCOLS)}, got {list(self.protocols)}")


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
    #: CPU the server, the HTTP front and Locust spent per sample over the whole run (warm-up included): what a
    #: path costs, much less sensitive to other load than throughput is
    cpu_ms_per_sample: float | None = None
    round: int = 1
    #: Triton's counters for every model that served the target during the run (StageFigures as dicts)
    stages: list[dict] = field(default_factory=list)
    protocol: str = "grpc"


@dataclass
class BenchReport:
    machine: dict
    rows: list[BenchRow]
    ratios: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"machine": self.machine, "rows": [asdict(r) for r in self.rows], "ratios": self.ratios,
                "settings": self.settings}


def parse_list(text: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    """A comma-separated list of names out of ``allowed`` (ValueError naming them otherwise)."""
    values = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [v for v in values if v not in allowed]
    if not values or unknown:
        raise ValueError(f"expected comma-separated {what} out of {', '.join(allowed)}, got {text!r}")
    return values


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
    """CPU seconds the whole machine spent busy vs. what the server tree, the HTTP front and our Locust children used.

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
        t = os.times()  # this process (the HTTP front runs in it) and its reaped children (the Locust runs)
        return total + t.user + t.system + t.children_user + t.children_system

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

    def ours_s(self) -> float:
        """CPU seconds the server tree, the front and Locust used since ``start``."""
        return self._ours() - self._ours0


def summarize(latency_file: Path, warmup_s: float) -> dict:
    """Per-sample percentiles and samples/s over requests that started after the warm-up."""
    data = np.loadtxt(latency_file, delimiter=",", skiprows=1, ndmin=2)
    start, latency, n = data[:, 0], data[:, 1], data[:, 2].astype(np.int64)
    run_samples = int(n.sum())
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
        "run_samples": run_samples,
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


def _median_row(rows: Sequence[BenchRow]) -> BenchRow:
    """One row for a target, protocol and concurrency: the medians over its rounds (counts summed)."""
    first = rows[0]
    if len(rows) == 1:
        return first
    med = {k: statistics.median(getattr(r, k) for r in rows)
           for k in ("samples_per_s", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "window_s")}
    costs = [r.cpu_ms_per_sample for r in rows if r.cpu_ms_per_sample is not None]
    loads = [r.other_load_cores for r in rows if r.other_load_cores is not None]
    return BenchRow(target=first.target, concurrency=first.concurrency, model=first.model, batch=first.batch,
                    requests=sum(r.requests for r in rows), samples=sum(r.samples for r in rows),
                    failures=sum(r.failures for r in rows), other_load_cores=max(loads) if loads else None,
                    round=0, protocol=first.protocol, cpu_ms_per_sample=statistics.median(costs) if costs else None,
                    **med)


def summary_rows(rows: Sequence[BenchRow]) -> list[BenchRow]:
    """Per target, protocol and concurrency, the median over rounds (round 0), in the order the runs were made."""
    groups: dict[tuple[str, str, int], list[BenchRow]] = {}
    for row in rows:
        groups.setdefault((row.target, row.protocol, row.concurrency), []).append(row)
    return [_median_row(group) for group in groups.values()]


def _compare(by_key: dict[tuple, BenchRow], rounds: list[int], num: tuple, den: tuple) -> list[dict]:
    """The ratios of ``num`` to ``den`` (keys without the round) in every round that measured both."""
    per_round = []
    for rnd in rounds:
        a, b = by_key.get((rnd, *num)), by_key.get((rnd, *den))
        if a is None or b is None or not (b.samples_per_s and b.p50_ms and b.p95_ms):
            continue
        ratio = {"throughput": a.samples_per_s / b.samples_per_s, "p50": a.p50_ms / b.p50_ms,
                 "p95": a.p95_ms / b.p95_ms, "added_p50_ms": a.p50_ms - b.p50_ms}
        if a.cpu_ms_per_sample and b.cpu_ms_per_sample:
            ratio["cpu_per_sample"] = a.cpu_ms_per_sample / b.cpu_ms_per_sample
        loads = [r.other_load_cores for r in (a, b) if r.other_load_cores is not None]
        if loads:
            ratio["other_load_cores"] = max(loads)
        per_round.append(ratio)
    return per_round


def ratios(rows: Sequence[BenchRow]) -> list[dict]:
    """Per concurrency and comparison -- of layouts within each protocol (:data:`COMPARISONS`; labelled with the
    protocol when several were measured) and of protocols for each target (:data:`PROTOCOL_COMPARISONS`) --
    throughput and p50/p95 ratios and the added p50, each computed within a round (measured side by side) and
    then the median over rounds."""
    by_key = {(r.round, r.target, r.protocol, r.concurrency): r for r in rows}
    rounds = sorted({r.round for r in rows})
    protocols = list(dict.fromkeys(r.protocol for r in rows))
    targets = list(dict.fromkeys(r.target for r in rows))
    out = []

    def add(label: str, c: int, target: str, baseline: str, per_round: list[dict], **extra: str) -> None:
        if per_round:
            entry = {"concurrency": c, "comparison": label, "target": target, "baseline": baseline,
                     "rounds": len(per_round), **extra}
            entry.update({k: statistics.median(r[k] for r in per_round) for k in per_round[0]
                          if all(k in r for r in per_round) and k != "other_load_cores"})
            # the spread over rounds, and the most other load any of them saw: a ratio is only as good as those
            entry["throughput_range"] = [min(r["throughput"] for r in per_round),
                                         max(r["throughput"] for r in per_round)]
            loads = [r["other_load_cores"] for r in per_round if "other_load_cores" in r]
            entry["other_load_cores"] = max(loads) if loads else None
            out.append(entry)

    for c in sorted({r.concurrency for r in rows}):
        for protocol in protocols:
            for label, num, den in COMPARISONS:
                add(label if len(protocols) == 1 else f"{label} [{protocol}]", c, num, den,
                    _compare(by_key, rounds, (num, protocol, c), (den, protocol, c)), protocol=protocol)
        for label, num, den in PROTOCOL_COMPARISONS:
            for target in targets:
                add(f"{label} [{target}]", c, target, target,
                    _compare(by_key, rounds, (target, num, c), (target, den, c)), protocol=num, baseline_protocol=den)
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
    rounds = report.settings.get("rounds", 1)
    lines = [f"machine: {describe_machine(report.machine)}",
             f"per-sample latency (request latency / images per request), batch {report.settings.get('batch')}, "
             f"{', '.join(report.settings.get('protocols', ()))}, {report.settings.get('duration_s'):g} s per run, "
             f"{rounds} round(s){' (medians shown)' if rounds > 1 else ''}; Locust on the same machine; 1-min load "
             f"average {_load(report.settings)}",
             f"{'target':11s} {'protocol':11s} {'users':>5s} {'samples/s':>10s} {'p50 ms':>8s} {'p95 ms':>8s} "
             f"{'p99 ms':>8s} {'requests':>9s} {'failures':>8s} {'CPU ms/sample':>13s} {'other load':>10s}"]
    for r in summary_rows(report.rows):
        cost = "?" if r.cpu_ms_per_sample is None else f"{r.cpu_ms_per_sample:.3f}"
        lines.append(f"{r.target:11s} {r.protocol:11s} {r.concurrency:5d} {r.samples_per_s:10.1f} {r.p50_ms:8.3f} "
                     f"{r.p95_ms:8.3f} {r.p99_ms:8.3f} {r.requests:9d} {r.failures:8d} {cost:>13s} "
                     f"{_cores(r.other_load_cores):>10s}")
    lines.append("(CPU ms/sample: what tritonserver, the HTTP front and Locust spent per sample; other load: cores "
                 "busy with anything else during the run)")
    width = max([29, *(len(e["comparison"]) for e in report.ratios)])
    lines.append(f"{'comparison':{width}s} {'users':>5s} {'throughput':>10s} {'rounds: min-max':>15s} {'p50':>7s} "
                 f"{'p95':>7s} {'added p50 ms':>12s} {'CPU/sample':>10s} {'other load':>10s}")
    for e in report.ratios:
        cost = f"{e['cpu_per_sample']:.3f}" if "cpu_per_sample" in e else "?"
        low, high = e.get("throughput_range") or (e["throughput"], e["throughput"])
        lines.append(f"{e['comparison']:{width}s} {e['concurrency']:5d} {e['throughput']:10.3f} "
                     f"{f'{low:.3f}-{high:.3f}':>15s} {e['p50']:7.3f} {e['p95']:7.3f} {e['added_p50_ms']:12.3f} "
                     f"{cost:>10s} {_cores(e.get('other_load_cores')):>10s}")
    lines.append("(ratios: median over rounds of the ratio measured side by side within each round; other load: "
                 "the most any of their runs saw, in cores; quiet means under 0.3)")
    lines.append("Triton's counters per stage (last round): mean batch, queue and compute ms per request, "
                 "compute ms per inference")
    last = max((r.round for r in report.rows), default=1)
    for r in report.rows:
        if r.round != last:
            continue
        for st in r.stages:
            lines.append(f"  {r.target:11s} {r.protocol:11s} c={r.concurrency:<3d} {st['model']:22s} "
                         f"batch {st['mean_batch']:6.2f}  "
                         f"queue {st['queue_ms']:8.3f}  compute {st['compute_ms']:8.3f}  "
                         f"per inference {st['compute_ms_per_inference']:8.3f}")
    return "\n".join(lines)


def write_outputs(report: BenchReport, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    with (out / "bench.csv").open("w", newline="") as handle:  # one line per run; per-stage figures: bench.json
        names = [f.name for f in fields(BenchRow) if f.name != "stages"]
        writer = csv.DictWriter(handle, fieldnames=names, extrasaction="ignore")
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
    summary = summary_rows(report.rows)
    several = len({r.protocol for r in summary}) > 1
    names = list(dict.fromkeys(f"{r.target} {r.protocol}" if several else r.target for r in summary))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    width = 0.8 / len(names)
    for i, target in enumerate(names):
        rows = {r.concurrency: r for r in summary if (f"{r.target} {r.protocol}" if several else r.target) == target}
        xs = np.arange(len(levels)) + (i - (len(names) - 1) / 2) * width
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
    fig.suptitle(f"fire bench, {report.settings.get('arch', '')} batch {report.settings.get('batch')}: "
                 f"{m['cores']} cores, {'GPU ' + m['gpu'] if m.get('gpu') else 'no GPU'}", fontsize=10)
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


def bench_repository(config: BenchConfig, progress: Progress) -> Path:
    """The repository with every target (``config.out/repository``), built from the checkpoint or rebuilt from the
    given repository (which is left as it is)."""
    from fire_backend.repository.build import RepositoryOptions, build_repository, rebuild_repository
    from fire_backend.repository.layout import ARTIFACTS_DIR, STORE_DIR, ServingSettings
    from fire_backend.stores.files import DirectionStore

    out = config.out / "repository"
    if config.checkpoint is not None:
        # no layer named: the default build, which repairs at several layers
        compare = tuple(layout for layout in bench_layouts(1 if config.layer else 2) if layout != DEFAULT_TARGET)
        options = RepositoryOptions(layout=DEFAULT_TARGET, compare_layouts=compare, baselines=True, gpu=config.gpu)
        progress(f"building the bench repository {out} from {config.checkpoint} "
                 f"(a direction from {BENCH_FLAGGED} flagged reserve images)")
        build_repository(config.checkpoint, out, config.layer, flagged=BENCH_FLAGGED, options=options)
        return out
    source = ServingSettings.read(config.repository / ARTIFACTS_DIR)
    compare = tuple(layout for layout in bench_layouts(len(source.repair_layers), not source.cut_reason)
                    if layout != DEFAULT_TARGET)
    recorded = RepositoryOptions.from_record(source.build)
    options = RepositoryOptions.from_record({**asdict(recorded), "layout": DEFAULT_TARGET,
                                             "compare_layouts": compare, "baselines": True, "allow_bypass": False,
                                             "gpu": recorded.gpu or config.gpu, "store": ""})
    # The copy follows its own file store (a copy of the source's, if it has one), never a shared etcd store.
    progress(f"rebuilding {config.repository} with every layout and the baselines into {out}")
    settings = rebuild_repository(config.repository, out, options)
    store = DirectionStore(out / ARTIFACTS_DIR / STORE_DIR)
    if store.live_version() == 0:
        _synthetic_direction(store, settings)
        progress("the repository's store has no direction yet: the bench copy got one synthetic direction per layer")
    return out


def _synthetic_direction(store, settings) -> None:
    """One random direction at every repaired layer (the repair's cost does not depend on its values), committed to
    the bench copy as one version; the split layer's centroid is the repository's, the others' zero."""
    import numpy as np
    import torch

    from fire_backend.fire import Direction
    from fire_backend.repository.layout import load_centroid
    from fire_backend.stores.format import DirectionSet, LayeredSet

    center, _ = load_centroid(store.root.parent)
    generator = torch.Generator().manual_seed(0)
    sets = {layer: DirectionSet(center if layer == settings.layer else np.zeros(dim, np.float32),
                                [Direction(torch.randn(dim, generator=generator))])
            for layer, dim in settings.layer_dims.items()}
    store.commit(LayeredSet(sets), action="push", actor="fire bench", note={"synthetic": True})


def run_bench(config: BenchConfig, progress: Progress) -> BenchReport:
    """Build the bench repository, serve it, and measure every target at every concurrency, ``rounds`` times."""
    from fire_backend.data import load_dataset
    from fire_backend.data.export import write_traffic
    from fire_backend.launcher.ports import free_port
    from fire_backend.launcher.server import running_server
    from fire_backend.repository.layout import ARTIFACTS_DIR, ServingSettings
    from fire_backend.wire.client import FireClient

    locustfile = (config.locustfile or LOCUSTFILE).resolve()
    if not locustfile.is_file():
        raise FileNotFoundError(f"{locustfile}: no such Locust file")
    repository = bench_repository(config, progress).resolve()
    out = config.out
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    settings = ServingSettings.read(repository / ARTIFACTS_DIR)
    if not settings.dataset:
        raise ValueError(f"{repository}: serving settings name no data set: cannot make bench traffic")
    traffic = write_traffic(load_dataset(settings.dataset), settings.attack, settings.target, out / "data",
                            TRAFFIC_IMAGES)
    label = max(settings.target, 0)
    cut = not settings.cut_reason
    if not cut:
        progress(f"the network cannot be cut at {settings.layer}: fused against monolithic only "
                 f"({settings.cut_reason})")
    targets = bench_targets(bench_layouts(len(settings.repair_layers), cut), cut)
    if config.targets is not None:
        unknown = sorted(set(config.targets) - {t.name for t in targets})
        if unknown:
            raise ValueError(f"no target {', '.join(unknown)} in this bench; its targets: "
                             f"{', '.join(t.name for t in targets)}")
        targets = [t for t in targets if t.name in config.targets]
    rows: list[BenchRow] = []
    progress(f"fire bench: {repository}, {settings.arch} repaired at {', '.join(settings.repair_layers)}, "
             f"concurrency {','.join(map(str, config.concurrency))}, {config.duration_s:g} s per run "
             f"(+{config.warmup_s:g} s warm-up), {config.rounds} round(s), batch {config.batch}, "
             f"{', '.join(config.protocols)}")
    started = time.time()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    exposed = {"triton_http_port": free_port()} if "triton-http" in config.protocols else {}
    with running_server(repository, **exposed) as server:
        urls = {"grpc": f"grpc://{server.urls['grpc']}", "http": server.urls["http"],
                "triton-http": server.urls.get("triton_http", "")}
        server_version = ""
        for protocol in config.protocols:
            with FireClient(urls[protocol]) as client:
                server_version = client.server_metadata().get("version")
                for t in targets:  # load check and first-call warm-up, outside the measured runs
                    shape = client.model_info(t.model).input_shape
                    client.infer_batches(np.zeros((config.batch, *shape), np.float32), config.batch, t.model)
        progress(f"tritonserver {server_version} ready in {server.startup_s or 0:.1f}s at "
                 f"{', '.join(urls[p] for p in config.protocols)}")
        for rnd in range(1, config.rounds + 1):
            for users in config.concurrency:
                for t in targets:
                    for protocol in config.protocols:
                        suffix = "" if len(config.protocols) == 1 else f"-{protocol}"
                        prefix = raw / f"{t.name}-c{users}-r{rnd}{suffix}"
                        meter = CpuMeter(server.pid)
                        before = stage_metrics.scrape(server.urls["metrics"])
                        meter.start()
                        latency_file = _run(config, locustfile, urls[protocol], t.model, users, prefix, traffic,
                                            label)
                        other, ours = meter.other_cores(), meter.ours_s()
                        after = stage_metrics.scrape(server.urls["metrics"])
                        stats = summarize(latency_file, config.warmup_s)
                        run_samples = stats.pop("run_samples")
                        row = BenchRow(target=t.name, concurrency=users, model=t.model, batch=config.batch,
                                       failures=_failures(prefix, t.model), other_load_cores=other, round=rnd,
                                       stages=[s.to_dict() for s in stage_metrics.difference(before, after, t.stages)],
                                       protocol=protocol, cpu_ms_per_sample=1000 * ours / max(run_samples, 1),
                                       **stats)
                        rows.append(row)
                        progress(f"  round {rnd} {t.name:11s} {protocol:11s} users {users:3d}: "
                                 f"{row.samples_per_s:8.1f} samples/s, p50 {row.p50_ms:.3f} ms, p95 {row.p95_ms:.3f} "
                                 f"ms, p99 {row.p99_ms:.3f} ms ({row.requests} requests, {row.failures} failures; "
                                 f"{row.cpu_ms_per_sample:.3f} CPU ms per sample; other load {_cores(other)} cores)")
    machine = machine_info(server_version)
    settings_out = {"repository": str(repository), "source": str(config.repository or config.checkpoint),
                    "arch": settings.arch, "repair_layers": list(settings.repair_layers),
                    "gpu": bool(settings.build.get("gpu")), "concurrency": list(config.concurrency),
                    "duration_s": config.duration_s, "warmup_s": config.warmup_s, "rounds": config.rounds,
                    "batch": config.batch, "protocols": list(config.protocols), "locustfile": str(locustfile),
                    "targets": {t.name: list(t.stages) for t in targets}, "elapsed_s": time.time() - started,
                    # load generator and server share this machine; other load skews the numbers
                    "loadavg_1m_start": load_start,
                    "loadavg_1m_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    return BenchReport(machine=machine, rows=rows, ratios=ratios(rows), settings=settings_out)
