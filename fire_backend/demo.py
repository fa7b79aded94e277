"""``fire demo``: the whole story on the embedded digits data set, end to end, in a few minutes.

Trains (or reuses) a backdoored digits model, builds a repository with no direction, starts the real
tritonserver, sends a mixed clean/poisoned stream (PA low), learns the direction online from flagged
samples through the control endpoint (PA vs flagged samples seen), sends the stream again (PA high),
runs a short Locust load, prints a before/after table, writes a PNG, and stops the server.
"""

from __future__ import annotations

import csv
import json
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fire_backend.client import FireClient
from fire_backend.control_client import ControlClient
from fire_backend.data import load_dataset, resolve_attack, to_tensor, to_uint8
from fire_backend.evaluation import RESERVE
from fire_backend.loadtest import LOCUSTFILE
from fire_backend.serving.commands import cache_dir, demo_repository
from fire_backend.serving.launcher import running_server
from fire_backend.serving.repository import build_repository


@dataclass
class StreamFigures:
    ca: float
    pa: float
    asr: float
    clean_flagged: float
    poisoned_flagged: float
    p50_ms: float
    samples_per_s: float


def step(number: int, total: int, text: str) -> None:
    print(f"[{number}/{total}] {text}", flush=True)


def send_stream(client: FireClient, clean: np.ndarray, y_clean: np.ndarray, poisoned: np.ndarray,
                y_poisoned: np.ndarray, target: int, batch: int = 8, seed: int = 0) -> StreamFigures:
    """A shuffled clean/poisoned stream in small requests; figures from the responses and ground truth."""
    images = np.concatenate([clean, poisoned])
    truth = np.concatenate([y_clean, y_poisoned])
    is_poisoned = np.r_[np.zeros(len(clean), bool), np.ones(len(poisoned), bool)]
    order = np.random.default_rng(seed).permutation(len(images))
    labels, flagged, per_sample_ms = np.empty(len(images), np.int64), np.empty(len(images), bool), []
    start = time.perf_counter()
    for i in range(0, len(order), batch):
        idx = order[i : i + batch]
        sent = time.perf_counter()
        result = client.infer(images[idx])
        per_sample_ms.append((time.perf_counter() - sent) * 1e3 / len(idx))
        labels[idx], flagged[idx] = result.labels, result.flagged
    elapsed = time.perf_counter() - start
    p, c = is_poisoned, ~is_poisoned
    return StreamFigures(
        ca=float((labels[c] == truth[c]).mean()), pa=float((labels[p] == truth[p]).mean()),
        asr=float((labels[p] == target).mean()), clean_flagged=float(flagged[c].mean()),
        poisoned_flagged=float(flagged[p].mean()), p50_ms=float(np.median(per_sample_ms)),
        samples_per_s=len(images) / elapsed,
    )


def run_locust(url: str, clean_npz: Path, poisoned_npz: Path, target: int, prefix: Path, users: int,
               seconds: int) -> dict:
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r", str(users),
           "-t", f"{seconds}s", "--host", f"grpc://{url}", "--clean-npz", str(clean_npz), "--poisoned-npz",
           str(poisoned_npz), "--target", str(target), "--csv", str(prefix), "--only-summary", "--loglevel",
           "WARNING", "--stop-timeout", "2"]
    subprocess.run(cmd, check=True, timeout=seconds + 120, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    with open(f"{prefix}_stats.csv") as handle:
        rows = {r["Name"]: r for r in csv.DictReader(handle)}
    with open(f"{prefix}_defense.csv") as handle:
        defense = {r["traffic"]: r for r in csv.DictReader(handle)}
    per_sample = next((r for name, r in rows.items() if name.endswith("/per-sample")), rows["Aggregated"])
    return {
        "p50_ms": float(per_sample["50%"]), "samples_per_s": float(per_sample["Requests/s"]),
        "failures": int(rows["Aggregated"]["Failure Count"]),
        "ca": float(defense["clean"]["ca_or_pa"]), "pa": float(defense["poisoned"]["ca_or_pa"]),
        "asr": float(defense["poisoned"]["asr"]),
    }


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


def run_demo(out: Path, flagged: int = 20, load_seconds: int = 15, users: int = 8) -> dict:
    total = 8
    out.mkdir(parents=True, exist_ok=True)
    step(1, total, "backdoored digits model (BadNets, target 0): trained once, then cached")
    demo_repository()
    checkpoint = cache_dir() / "demo" / "checkpoint"
    meta = json.loads((checkpoint / "meta.json").read_text())
    print(f"      undefended offline: CA {meta['ca']:.4f}, ASR {meta['asr']:.4f}")

    step(2, total, "Triton repository with no direction yet (version 0)")
    work = Path(tempfile.mkdtemp(prefix="fire-demo-"))
    repository = work / "repository"
    settings = build_repository(checkpoint, repository)
    data = load_dataset("digits")
    attack, target = resolve_attack(settings.attack), settings.target
    x, y = data.x_test[RESERVE:], data.y_test[RESERVE:]
    keep = y != target
    clean, poisoned = to_tensor(x).numpy(), attack(to_tensor(x[keep])).numpy()
    y_poisoned = y[keep]
    reserve_x, reserve_y = data.x_test[:RESERVE], data.y_test[:RESERVE]
    flagged_images = to_uint8(attack(to_tensor(reserve_x[reserve_y != target][:flagged])))
    clean_npz, poisoned_npz = work / "clean.npz", work / "poisoned.npz"
    np.savez(clean_npz, x=x, y=y, poisoned=np.zeros(len(x), bool))
    np.savez(poisoned_npz, x=to_uint8(attack(to_tensor(x[keep]))), y=y_poisoned, poisoned=np.ones(keep.sum(), bool))

    step(3, total, "starting tritonserver (fire_ensemble = head -> FIRE repair -> tail)")
    token = secrets.token_urlsafe(24)
    started = time.perf_counter()
    with running_server(repository, extra_env={"FIRE_CONTROL_TOKEN": token}) as server:
        url = server.urls["grpc"]
        print(f"      ready in {time.perf_counter() - started:.1f}s at grpc {url}, http {server.urls['http']}")
        with FireClient(url) as client, ControlClient(url, token) as ctl:
            step(4, total, f"mixed stream, no direction: {len(clean)} clean + {len(poisoned)} poisoned images")
            before = send_stream(client, clean, y, poisoned, y_poisoned, target)
            print(f"      CA {before.ca:.4f}  PA {before.pa:.4f}  ASR {before.asr:.4f}")

            step(5, total, f"observing {flagged} flagged poisoned samples through the control endpoint")
            probe = poisoned[:120]
            seen, curve = [], []
            for i in range(flagged):
                ctl.observe(flagged_images[i : i + 1])
                result = client.infer_batches(probe, batch=60)
                seen.append(i + 1)
                curve.append(float((result.labels == y_poisoned[:120]).mean()))
                print(f"      {i + 1:2d} seen -> live version {int(result.versions[0])}, PA on a probe {curve[-1]:.3f}",
                      flush=True)

            step(6, total, "the same mixed stream again, with the learned direction")
            after = send_stream(client, clean, y, poisoned, y_poisoned, target)
            print(f"      CA {after.ca:.4f}  PA {after.pa:.4f}  ASR {after.asr:.4f}")

        step(7, total, f"Locust: {users} users for {load_seconds}s, 80/20 clean/poisoned, gRPC")
        load = run_locust(url, clean_npz, poisoned_npz, target, work / "locust", users, load_seconds)
        print(f"      {load['samples_per_s']:.0f} samples/s, p50 {load['p50_ms']:.2f} ms/sample, "
              f"{load['failures']} failures, live PA {load['pa']:.3f}")
        step(8, total, "stopping tritonserver")
    plot_curve(out / "demo_pa_vs_flagged.png", seen, curve, before.pa)
    rows = [
        ("before (no direction)", before.ca, before.pa, before.asr, before.p50_ms, before.samples_per_s),
        (f"after ({flagged} flagged observed)", after.ca, after.pa, after.asr, after.p50_ms, after.samples_per_s),
        (f"Locust load ({users} users)", load["ca"], load["pa"], load["asr"], load["p50_ms"], load["samples_per_s"]),
    ]
    print()
    print(f"{'':30s} {'CA':>7s} {'PA':>7s} {'ASR':>7s} {'p50 ms/sample':>14s} {'samples/s':>10s}")
    for name, ca, pa, asr, p50, sps in rows:
        print(f"{name:30s} {ca:7.4f} {pa:7.4f} {asr:7.4f} {p50:14.3f} {sps:10.0f}")
    print(f"\nwrote {out / 'demo_pa_vs_flagged.png'}")
    summary = {"before": before.__dict__, "after": after.__dict__, "load": load,
               "curve": {"seen": seen, "pa": curve}}
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
