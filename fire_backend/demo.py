"""The embedded digits demo: its cached model and repository, and ``fire demo``'s whole story, end to end.

:func:`demo_repository` trains a BadNets digits model once (cached, see :mod:`fire_backend.defaults`)
and builds the repository ``fire serve`` and ``fire bench`` use when given none. :func:`run_demo` builds a fresh
repository with no direction in a temporary folder (removed afterwards), starts the real tritonserver, sends a
mixed clean/poisoned stream (PA low), learns the direction online from flagged samples through the control
endpoint (PA vs flagged samples seen), sends the stream again (PA high), runs a short Locust load, writes a PNG
and a JSON summary, and stops the server. It reports progress through a callback; the CLI prints.
"""

from __future__ import annotations

import json
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fire_backend.data import load_dataset
from fire_backend.data.export import export_images
from fire_backend.defaults import demo_checkpoint_dir, demo_repository_dir
from fire_backend.launcher.server import running_server
from fire_backend.loadtest.command import locust_command, locust_summary, run_locust
from fire_backend.metric_families import summary_lines
from fire_backend.repository.build import build_repository
from fire_backend.repository.layout import is_fire_repository
from fire_backend.stage_metrics import fetch
from fire_backend.stub.metrics import MetricsConfig
from fire_backend.wire.client import FireClient
from fire_backend.wire.control import ControlClient
from fire_backend.wire.names import FIRE_ENSEMBLE
from fire_backend.wire.token import pinned_token

Progress = Callable[[str], None]
DEMO_STEPS = 9
#: triggered evaluation images whose PA step 5 reports after each observed sample
PROBE_IMAGES = 120
DEMO_ATTACK = "badnets"


def _silent(_: str) -> None:
    return None


def demo_checkpoint(progress: Progress = _silent, bars: bool = False) -> Path:
    """The demo's backdoored digits model (BadNets, target 0): trained on first use (about a minute), then cached.

    ``bars``: show the training progress bar.
    """
    from fire_backend.offline.training import TrainConfig, train_backdoored

    checkpoint = demo_checkpoint_dir()
    if not (checkpoint / "meta.json").is_file():
        progress(f"no cached demo model: training a BadNets digits model into {checkpoint} (about a minute)")
        train_backdoored(TrainConfig(data="digits", attack=DEMO_ATTACK), checkpoint, progress=bars)
    return checkpoint


def demo_repository(progress: Progress = _silent, bars: bool = False) -> Path:
    """The embedded default repository: the demo model served with no direction (built once, cached)."""
    checkpoint = demo_checkpoint(progress, bars)
    repository = demo_repository_dir()
    if not is_fire_repository(repository):
        build_repository(checkpoint, repository)
    return repository


@dataclass
class StreamFigures:
    ca: float
    pa: float
    asr: float
    clean_flagged: float
    poisoned_flagged: float
    p50_ms: float  #: median latency of one request (of ``images_per_request`` images), in ms
    samples_per_s: float
    images_per_request: int
    in_flight: int  #: requests outstanding at once (1: each waits for the last)


def send_stream(client: FireClient, clean: np.ndarray, y_clean: np.ndarray, poisoned: np.ndarray,
                y_poisoned: np.ndarray, target: int, batch: int = 8, seed: int = 0) -> StreamFigures:
    """A shuffled clean/poisoned stream in requests of ``batch`` images, one at a time; figures from the responses and
    ground truth."""
    images = np.concatenate([clean, poisoned])
    truth = np.concatenate([y_clean, y_poisoned])
    is_poisoned = np.r_[np.zeros(len(clean), bool), np.ones(len(poisoned), bool)]
    order = np.random.default_rng(seed).permutation(len(images))
    labels, flagged, request_ms = np.empty(len(images), np.int64), np.empty(len(images), bool), []
    start = time.perf_counter()
    for i in range(0, len(order), batch):
        idx = order[i : i + batch]
        sent = time.perf_counter()
        result = client.infer(images[idx])
        request_ms.append((time.perf_counter() - sent) * 1e3)
        labels[idx], flagged[idx] = result.labels, result.flagged
    elapsed = time.perf_counter() - start
    p, c = is_poisoned, ~is_poisoned
    return StreamFigures(
        ca=float((labels[c] == truth[c]).mean()), pa=float((labels[p] == truth[p]).mean()),
        asr=float((labels[p] == target).mean()), clean_flagged=float(flagged[c].mean()),
        poisoned_flagged=float(flagged[p].mean()), p50_ms=float(np.median(request_ms)),
        samples_per_s=len(images) / elapsed, images_per_request=batch, in_flight=1,
    )


def plot_curve(path: Path, seen: list[int], pa: list[float], pa_before: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([0, *seen], [pa_before, *pa], marker="o", label="served PA (FIRE, online)")
    ax.set(xlabel="flagged poisoned samples observed", ylabel="poisoned accuracy (PA)", ylim=(0, 1.02),
           title="fire demo: served PA as flagged samples arrive")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(out: Path, flagged: int = 20, load_seconds: int = 15, users: int = 8,
             progress: Progress = _silent) -> dict:
    """The whole story; returns the summary also written to ``out/demo.json`` (before, after, load, curve, and
    the FIRE lines of the server's /metrics at the end)."""

    def step(number: int, text: str) -> None:
        progress(f"[{number}/{DEMO_STEPS}] {text}")

    out.mkdir(parents=True, exist_ok=True)
    step(1, "backdoored digits model (BadNets, target 0): trained once, then cached")
    checkpoint = demo_checkpoint(progress, bars=True)
    meta = json.loads((checkpoint / "meta.json").read_text())
    progress(f"      undefended offline: CA {meta['ca']:.4f}, ASR {meta['asr']:.4f}")

    with tempfile.TemporaryDirectory(prefix="fire-demo-") as tmp:
        work = Path(tmp)
        step(2, "Triton repository with no direction yet (version 0)")
        settings = build_repository(checkpoint, work / "repository")
        data = load_dataset(settings.dataset)
        attack, target = settings.attack, settings.target
        clean = export_images(data, attack, target)
        poisoned = export_images(data, attack, target, poisoned=True)
        observed = export_images(data, attack, target, poisoned=True, n=flagged, part="reserve").x
        clean_npz, poisoned_npz = clean.save(work / "clean.npz"), poisoned.save(work / "poisoned.npz")

        step(3, f"starting tritonserver ({FIRE_ENSEMBLE}: one model that runs the network and repairs the latent "
                "where each repair layer computes it; the fused layout)")
        token = secrets.token_urlsafe(24)
        started = time.perf_counter()
        with running_server(work / "repository", extra_env=pinned_token(token)) as server:
            url = server.urls["grpc"]
            progress(f"      ready in {time.perf_counter() - started:.1f}s at grpc {url}, http {server.urls['http']}")
            with FireClient(url) as client, ControlClient(url, token) as ctl:
                step(4, f"mixed stream, no direction: {len(clean)} clean + {len(poisoned)} poisoned images")
                before = send_stream(client, clean.x, clean.y, poisoned.x, poisoned.y, target)
                progress(f"      CA {before.ca:.4f}  PA {before.pa:.4f}  ASR {before.asr:.4f}")

                step(5, f"observing {flagged} flagged poisoned samples through the control endpoint")
                # the probe: evaluation images with the trigger, never the observed reserve images
                probe, probe_y = poisoned.x[:PROBE_IMAGES], poisoned.y[:PROBE_IMAGES]
                progress(f"      PA (poisoned accuracy: the true label back) on a probe of {len(probe)} triggered "
                         "evaluation images after each sample")
                seen, curve = [], []
                for i in range(flagged):
                    ctl.observe(observed[i : i + 1])
                    result = client.infer_batches(probe, batch=60)
                    seen.append(i + 1)
                    curve.append(float((result.labels == probe_y).mean()))
                    progress(f"      {i + 1:2d} seen -> live version {int(result.versions[0])}, "
                             f"PA on the probe {curve[-1]:.3f}")

                step(6, "the same mixed stream again, with the learned direction")
                after = send_stream(client, clean.x, clean.y, poisoned.x, poisoned.y, target)
                progress(f"      CA {after.ca:.4f}  PA {after.pa:.4f}  ASR {after.asr:.4f}")

            step(7, f"Locust: {users} users for {load_seconds}s, 80/20 clean/poisoned, gRPC")
            prefix = work / "locust"
            command = locust_command(f"grpc://{url}", users=users, run_time_s=load_seconds, csv_prefix=prefix,
                                     clean_npz=clean_npz, poisoned_npz=poisoned_npz, target=target)
            run_locust(command, timeout_s=load_seconds + 120)
            load = {**locust_summary(prefix), "images_per_request": 1, "in_flight": users}
            progress(f"      {load['samples_per_s']:.0f} samples/s, p50 {load['p50_ms']:.2f} ms/request, "
                     f"{load['failures']} failures, live PA {load['pa']:.3f}")
            time.sleep(MetricsConfig().flush_interval_s + 0.5)  # the stages' last flush
            metrics = {"url": server.urls["metrics"], "lines": summary_lines(fetch(server.urls["metrics"]))}
            step(8, f"FIRE's own metrics, beside Triton's, on {metrics['url']}: {len(metrics['lines'])} lines "
                    "that moved (shown at the end)")
            step(9, "stopping tritonserver")
    plot_curve(out / "demo_pa_vs_flagged.png", seen, curve, before.pa)
    summary = {"before": asdict(before), "after": asdict(after), "load": load, "curve": {"seen": seen, "pa": curve},
               "metrics": metrics}
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
