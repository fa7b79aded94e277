"""Offline evaluation: CA/PA/ASR, the ShrinkPad baseline, FIRE variants, streaming curve, layer sweep.

The defender's data never overlaps the evaluation data: the first ``RESERVE`` test images are the
defender's (a small clean set and the flagged poisoned samples), the rest are evaluated.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fire_backend.data import Attack, load_dataset, resolve_attack, to_tensor
from fire_backend.data.augment import shrinkpad_defense, trigger_breaking_augmentations
from fire_backend.defaults import RESERVE
from fire_backend.fire import (
    AugmentedEstimator,
    Direction,
    PairedEstimator,
    UnpairedEstimator,
    centroid,
    compile_directions,
    repair,
)
from fire_backend.split import candidate_layers, split

ESTIMATORS = ("paired", "unpaired", "augmented")
DEFAULT_LAYERS = {"digits_cnn": "block2", "preact_resnet18": "layer4.0"}
ALPHA_GRID = (0.5, 1.0, 1.5, 2.0, 3.0)


@dataclass(frozen=True)
class Metrics:
    ca: float
    pa: float
    asr: float


def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([fn(x[i : i + batch]) for i in range(0, len(x), batch)]) if len(x) else fn(x)


def accuracy_figures(clean_pred: torch.Tensor, poison_pred: torch.Tensor, y: torch.Tensor, target: int) -> Metrics:
    """CA over all clean inputs; PA and ASR over triggered inputs whose true class is not the target."""
    keep = y != target
    return Metrics(
        ca=float((clean_pred == y).float().mean()),
        pa=float((poison_pred[keep] == y[keep]).float().mean()),
        asr=float((poison_pred[keep] == target).float().mean()),
    )


def attack_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack, target: int) -> Metrics:
    clean = batched(model, x).argmax(1)
    poisoned = batched(model, attack(x)).argmax(1)
    return accuracy_figures(clean, poisoned, y, target)


@dataclass
class DefenderData:
    """The defender's few samples and the disjoint evaluation set, as [0, 1] NCHW tensors."""

    clean: torch.Tensor  # small clean set for the centroid
    flagged_clean: torch.Tensor  # clean originals of the flagged samples (paired estimator only)
    flagged: torch.Tensor  # flagged poisoned samples
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    eval_poisoned: torch.Tensor


def defender_data(
    x: np.ndarray, y: np.ndarray, attack: Attack, target: int, n_clean: int, n_flagged: int
) -> DefenderData:
    if not (1 <= n_clean <= RESERVE and 0 <= n_flagged <= RESERVE):
        raise ValueError(f"need 1 to {RESERVE} clean and 0 to {RESERVE} flagged samples (the defender's reserve)")
    if len(x) <= RESERVE:
        raise ValueError(f"the test split needs more than {RESERVE} images, has {len(x)}")
    xt, yt = to_tensor(x), torch.from_numpy(np.asarray(y, dtype=np.int64))
    reserve_x, reserve_y = xt[:RESERVE], yt[:RESERVE]
    non_target = reserve_x[reserve_y != target][:n_flagged]
    eval_x, eval_y = xt[RESERVE:], yt[RESERVE:]
    return DefenderData(
        clean=reserve_x[:n_clean],
        flagged_clean=non_target,
        flagged=attack(non_target),
        eval_x=eval_x,
        eval_y=eval_y,
        eval_poisoned=attack(eval_x),
    )


class LayerView:
    """A model cut at one layer, with the evaluation set's latents computed once."""

    def __init__(self, model: nn.Module, layer: str, data: DefenderData) -> None:
        self.layer = layer
        self.head, self.tail = split(model, layer)
        self.data = data
        self.clean_latents = batched(self.head, data.eval_x)
        self.poison_latents = batched(self.head, data.eval_poisoned)
        self.mu = centroid(batched(self.head, data.clean))
        self.dim = self.mu.numel()

    def estimate(self, kind: str, n_flagged: int) -> torch.Tensor:
        head, d = self.head, self.data
        poisoned = batched(head, d.flagged[:n_flagged])
        if kind == "paired":
            est = PairedEstimator(self.dim)
            est.observe(poisoned, batched(head, d.flagged_clean[:n_flagged]))
        elif kind == "unpaired":
            est = UnpairedEstimator(self.dim, self.mu, len(d.clean))
            est.observe(poisoned=poisoned)
        elif kind == "augmented":
            est = AugmentedEstimator(self.dim)
            augs = trigger_breaking_augmentations(d.flagged.shape[-1])
            est.observe_augmented(poisoned, [batched(head, a(d.flagged[:n_flagged])) for a in augs])
        else:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, not {kind!r}")
        return est.direction()

    def metrics(self, directions: Sequence[Direction], target: int) -> tuple[Metrics, torch.Tensor, torch.Tensor]:
        """Metrics after repair, plus the clean and poisoned scores (for the detector)."""
        compiled = compile_directions(directions, self.mu, self.dim)
        clean_fixed, clean_score, _ = repair(self.clean_latents, compiled)
        poison_fixed, poison_score, _ = repair(self.poison_latents, compiled)
        clean_pred = batched(self.tail, clean_fixed).argmax(1)
        poison_pred = batched(self.tail, poison_fixed).argmax(1)
        keep = self.data.eval_y != target
        return accuracy_figures(clean_pred, poison_pred, self.data.eval_y, target), clean_score, poison_score[keep]


def detector_tpr(clean_scores: torch.Tensor, poison_scores: torch.Tensor, max_fpr: float = 0.01) -> tuple[float, float]:
    """True-positive rate at the score threshold that flags at most ``max_fpr`` of clean inputs."""
    threshold = float(torch.quantile(clean_scores.double(), 1.0 - max_fpr))
    return float((poison_scores > threshold).float().mean()), threshold


@dataclass
class EvalRow:
    method: str
    ca: float
    pa: float
    asr: float


@dataclass
class EvalReport:
    layer: str
    rows: list[EvalRow]
    streaming: list[dict]  # {"flagged": n, "<estimator>": pa, ..., "shrinkpad": pa}
    detector: dict

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "rows": [asdict(r) for r in self.rows],
            "streaming": self.streaming,
            "detector": self.detector,
        }


def load_for_eval(model: nn.Module, dataset: str, attack_name: str, target: int, n_clean: int, n_flagged: int):
    data = load_dataset(dataset)
    attack = resolve_attack(attack_name)
    return defender_data(data.x_test, data.y_test, attack, target, n_clean, n_flagged)


def evaluate(
    model: nn.Module,
    data: DefenderData,
    target: int,
    layer: str,
    n_flagged: int = 20,
    alpha: float = 1.0,
    curve_points: Sequence[int] = (1, 2, 3, 5, 8, 10, 15, 20, 30, 50, 75, 100),
) -> EvalReport:
    view = LayerView(model, layer, data)
    undefended, _, _ = view.metrics([], target)
    shrink_poison = batched(model, shrinkpad_defense(data.eval_poisoned)).argmax(1)
    shrink_clean = batched(model, shrinkpad_defense(data.eval_x)).argmax(1)
    shrink = accuracy_figures(shrink_clean, shrink_poison, data.eval_y, target)
    rows = [EvalRow("undefended", **asdict(undefended)), EvalRow("shrinkpad", **asdict(shrink))]
    detector: dict = {}
    for kind in ESTIMATORS:
        beta = view.estimate(kind, n_flagged)
        for mode in ("constant", "projection"):
            metrics, clean_s, poison_s = view.metrics([Direction(beta, alpha=alpha, mode=mode)], target)
            rows.append(EvalRow(f"fire-{kind}-{mode}", **asdict(metrics)))
            if mode == "projection":
                tpr, threshold = detector_tpr(clean_s, poison_s)
                detector[kind] = {"tpr_at_1pct_fpr": tpr, "threshold": threshold}
    available = len(data.flagged)
    streaming = []
    for n in [p for p in curve_points if p <= available]:
        point: dict = {"flagged": n, "shrinkpad": shrink.pa}
        for kind in ("unpaired", "augmented"):
            metrics, _, _ = view.metrics([Direction(view.estimate(kind, n), alpha=alpha)], target)
            point[kind] = metrics.pa
        streaming.append(point)
    return EvalReport(layer, rows, streaming, detector)


def sweep(
    model: nn.Module,
    data: DefenderData,
    target: int,
    input_shape: tuple[int, int, int],
    n_flagged: int = 20,
    estimator: str = "unpaired",
    alphas: Sequence[float] = ALPHA_GRID,
) -> tuple[list[dict], dict]:
    """Per candidate layer, the best alpha's CA and PA; recommends the layer with the best PA among
    those whose CA drops by at most one point (or the smallest drop if none qualifies)."""
    base_ca = accuracy_figures(batched(model, data.eval_x).argmax(1), batched(model, data.eval_poisoned).argmax(1),
                               data.eval_y, target).ca
    rows = []
    for layer, shape in candidate_layers(model, input_shape):
        view = LayerView(model, layer, data)
        beta = view.estimate(estimator, n_flagged)
        best = None
        for alpha in alphas:
            m, _, _ = view.metrics([Direction(beta, alpha=alpha)], target)
            key = (m.ca >= base_ca - 0.01, m.pa, m.ca)
            if best is None or key > best[0]:
                best = (key, alpha, m)
        _, alpha, m = best
        rows.append({"layer": layer, "shape": list(shape), "alpha": alpha, "ca": m.ca, "pa": m.pa, "asr": m.asr,
                     "relative": m.pa / m.ca if m.ca else 0.0})
    qualified = [r for r in rows if r["ca"] >= base_ca - 0.01] or rows
    pick = max(qualified, key=lambda r: (r["pa"], r["ca"]))
    return rows, {"layer": pick["layer"], "alpha": pick["alpha"], "undefended_ca": base_ca}


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_streaming(path: Path, streaming: Sequence[dict], title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["flagged"] for p in streaming]
    for key in ("unpaired", "augmented"):
        ax.plot(xs, [p[key] for p in streaming], marker="o", label=f"FIRE ({key})")
    ax.plot(xs, [p["shrinkpad"] for p in streaming], linestyle="--", label="ShrinkPad")
    ax.set(xlabel="flagged poisoned samples seen", ylabel="poisoned accuracy (PA)", ylim=(0, 1.02), title=title)
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(path: Path, rows: Sequence[dict], title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.6), 4))
    ax.bar([r["layer"] for r in rows], [r["relative"] for r in rows], color="tab:blue")
    ax.set(ylabel="relative accuracy PA / CA", ylim=(0, 1.05), title=title)
    ax.tick_params(axis="x", rotation=45)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
