"""Offline evaluation: CA/PA/ASR, the ShrinkPad baseline, FIRE variants, streaming curve, layer sweep.

The defender's data never overlaps the evaluation data: the defender's samples come from the reserve (a
seeded, class-stratified draw of ``RESERVE`` test images, :mod:`fire_backend.data.reserve`), every other test
image is evaluated. Work is done where it is needed: latents of the evaluation images are computed the first
time a figure needs them, never to get a centroid. Models compute on the device they sit on; inputs move
there one batch at a time.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fire_backend.data import Attack, Dataset, load_dataset, resolve_attack, to_tensor
from fire_backend.data.attacks import apply_trigger
from fire_backend.data.augment import shrinkpad_defense, trigger_breaking_augmentations
from fire_backend.data.reserve import DefenderSamples, defender_samples
from fire_backend.defaults import evaluation_indices
from fire_backend.device import DEFAULT_BATCH_SIZE
from fire_backend.fire import (
    AugmentedEstimator,
    CompiledRepair,
    Direction,
    PairedEstimator,
    UnpairedEstimator,
    centroid,
    compile_directions,
    repair,
)
from fire_backend.models.layers import CutError
from fire_backend.models.network import Network
from fire_backend.multilayer import LayerSets, default_layers, repairs_of, run

ESTIMATORS = ("paired", "unpaired", "augmented")
ALPHA_GRID = (0.5, 1.0, 1.5, 2.0, 3.0)


@dataclass(frozen=True)
class Metrics:
    ca: float
    pa: float
    asr: float


def module_device(module: nn.Module) -> torch.device:
    """Where a model (or one of its halves) computes: the device of its first parameter or buffer."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int = DEFAULT_BATCH_SIZE,
            device: torch.device | str | None = None) -> torch.Tensor:
    """``fn`` over ``x`` in batches, each moved to ``device`` first (when given); the result stays where ``fn``
    put it."""
    def run(chunk: torch.Tensor) -> torch.Tensor:
        return fn(chunk if device is None else chunk.to(device, non_blocking=True))

    with torch.inference_mode():
        return torch.cat([run(x[i : i + batch]) for i in range(0, len(x), batch)]) if len(x) else run(x)


def predict(model: nn.Module, x: torch.Tensor, batch: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """Predicted labels (on the CPU) of ``model`` on ``x``, computed on the model's device."""
    return batched(model, x, batch, module_device(model)).argmax(1).cpu()


def accuracy_figures(clean_pred: torch.Tensor, y: torch.Tensor, poison_pred: torch.Tensor, poison_y: torch.Tensor,
                     target: int) -> Metrics:
    """CA over the clean inputs; PA and ASR over the triggered inputs (images whose true class is not the
    target: only those are poisoned)."""
    return Metrics(
        ca=float((clean_pred == y).float().mean()),
        pa=float((poison_pred == poison_y).float().mean()),
        asr=float((poison_pred == target).float().mean()),
    )


def attack_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack, target: int,
                   batch: int = DEFAULT_BATCH_SIZE, exclude_unchanged: bool = False) -> tuple[Metrics, int]:
    """CA on ``x``; PA and ASR on its non-target images with the trigger; and how many were excluded.

    By default every non-target image must be poisoned (a stored attack without a copy of one raises); with
    ``exclude_unchanged`` the images the attack leaves unchanged are left out of PA/ASR and counted instead.
    """
    keep = y != target
    originals = x[keep]
    if exclude_unchanged:
        poisoned, changed = apply_trigger(attack, originals)
        poisoned, poison_y, excluded = poisoned[changed], y[keep][changed], int((~changed).sum())
    else:
        poisoned, poison_y, excluded = attack(originals), y[keep], 0
    return accuracy_figures(predict(model, x, batch), y, predict(model, poisoned, batch), poison_y, target), excluded


def default_layer(net: Network) -> str:
    """The one layer ``fire eval`` repairs at when none is named: the deep layer of the default pair."""
    return default_layers(net.stages())[-1]


def subset_metrics(net: Network, evaluation: EvaluationSet, target: int, sets: LayerSets,
                   batch: int = DEFAULT_BATCH_SIZE) -> Metrics:
    """CA/PA/ASR with the directions of ``sets`` repaired at their layers as the network runs (what the fused
    layout serves)."""
    hooks = repairs_of(sets, module_device(net))
    clean, _ = run(net, evaluation.x, hooks, (), batch)
    poisoned, _ = run(net, evaluation.poisoned, hooks, (), batch)
    return accuracy_figures(clean.argmax(1), evaluation.y, poisoned.argmax(1), evaluation.poisoned_y, target)


@dataclass(frozen=True)
class EvaluationSet:
    """The evaluated test images (everything but the reserve), clean and, for non-target ones, triggered."""

    x: torch.Tensor
    y: torch.Tensor
    poisoned: torch.Tensor  # the non-target images with the trigger (all of them: a stored attack must cover them)
    poisoned_y: torch.Tensor  # their true labels


def evaluation_set(x: np.ndarray, y: np.ndarray, attack: Attack, target: int,
                   limit: int | None = None) -> EvaluationSet:
    """The test split (x, y) without the defender's reserve; with ``limit``, its first ``limit`` images in the
    seeded, class-stratified draw order (a smaller but still balanced evaluation for CPU budgets)."""
    if limit is not None and limit < 1:
        raise ValueError(f"the evaluation needs at least 1 image, got a limit of {limit}")
    index = evaluation_indices(y)[:limit]
    xt = to_tensor(x[index])
    yt = torch.from_numpy(np.asarray(y)[index].astype(np.int64))
    keep = yt != target
    return EvaluationSet(xt, yt, attack(xt[keep]), yt[keep])


@dataclass(frozen=True)
class DefenderData:
    """The defender's few samples and the disjoint evaluation set."""

    samples: DefenderSamples
    evaluation: EvaluationSet

    def describe(self) -> dict:
        """How the defender's samples were drawn and how many images were evaluated (reports, results files)."""
        return {**self.samples.describe(), "evaluated": len(self.evaluation.y),
                "evaluated_poisoned": len(self.evaluation.poisoned_y)}


def load_defender_samples(dataset: Dataset | str, attack_name: str, target: int, n_clean: int,
                          n_flagged: int) -> DefenderSamples:
    """The defender's samples only (a repository build): reads no evaluation image through the attack (with no
    flagged samples, no attack is needed)."""
    data = load_dataset(dataset) if isinstance(dataset, str) else dataset
    if n_flagged and not attack_name:
        raise ValueError("flagged samples need the attack's trigger, and no attack is named")
    attack = resolve_attack(attack_name) if attack_name else None
    return defender_samples(data.x_test, data.y_test, attack, target, n_clean, n_flagged)


def load_for_eval(dataset: str, attack_name: str, target: int, n_clean: int, n_flagged: int,
                  eval_limit: int | None = None, at_least: int | None = None) -> DefenderData:
    """The defender's samples and the evaluation set of a checkpoint's data set and attack (``n_flagged``
    flagged samples, or as many as the reserve holds but at least ``at_least``: `fire eval`'s streaming curve)."""
    data = load_dataset(dataset)
    attack = resolve_attack(attack_name)
    return DefenderData(
        defender_samples(data.x_test, data.y_test, attack, target, n_clean, n_flagged, at_least),
        evaluation_set(data.x_test, data.y_test, attack, target, eval_limit),
    )


class LayerView:
    """A network seen at one layer: the clean centroid from the defender's clean set, direction estimates from its
    flagged samples, and (computed once, on first use) the evaluation images' latents for figures.

    Repaired predictions run the tail of the network cut at the layer on the repaired latents; a network that cannot
    be cut there runs whole with the repair hooked in at the layer, as the fused layout serves it.
    """

    def __init__(self, net: Network, layer: str, samples: DefenderSamples,
                 evaluation: EvaluationSet | None = None, batch: int = DEFAULT_BATCH_SIZE) -> None:
        self.net = net
        self.layer = layer
        net.check_hooks([layer])
        self.samples = samples
        self.evaluation = evaluation
        self.batch = batch
        self.device = module_device(net)
        self.mu = centroid(self.latents(samples.clean)).cpu()
        self.dim = self.mu.numel()

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """The latent at the layer for ``x`` (on the network's device)."""
        return batched(lambda chunk: self.net.latents(chunk, self.layer), x, self.batch, self.device)

    def _evaluated(self) -> EvaluationSet:
        if self.evaluation is None:
            raise ValueError("this view has no evaluation set: pass one to compute figures")
        return self.evaluation

    @functools.cached_property
    def tail(self) -> Network | None:
        """The network after the layer (None where it cannot be cut there), cut on first use."""
        try:
            return self.net.cut(self.layer)[1]
        except CutError:
            return None

    @functools.cached_property
    def clean_latents(self) -> torch.Tensor:
        return self.latents(self._evaluated().x)

    @functools.cached_property
    def poison_latents(self) -> torch.Tensor:
        return self.latents(self._evaluated().poisoned)

    def estimator(self, kind: str, n_flagged: int) -> PairedEstimator | UnpairedEstimator:
        """An estimator of ``kind`` that has observed the first ``n_flagged`` flagged samples."""
        s = self.samples
        poisoned = self.latents(s.flagged[:n_flagged])
        if kind == "paired":
            est = PairedEstimator(self.dim)
            est.observe(poisoned, self.latents(s.flagged_clean[:n_flagged]))
        elif kind == "unpaired":
            est = UnpairedEstimator(self.dim, self.mu, len(s.clean))
            est.observe(poisoned=poisoned)
        elif kind == "augmented":
            est = AugmentedEstimator(self.dim)
            augs = trigger_breaking_augmentations(s.flagged.shape[-1])
            est.observe_augmented(poisoned, [self.latents(a(s.flagged[:n_flagged])) for a in augs])
        else:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, not {kind!r}")
        return est

    def estimate(self, kind: str, n_flagged: int) -> torch.Tensor:
        return self.estimator(kind, n_flagged).direction()

    def _repaired(self, poisoned: bool, compiled: CompiledRepair) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted labels and repair scores (on the CPU) of the clean or poisoned evaluation images after the
        repair."""
        if self.tail is not None:
            fixed, score, _ = repair(self.poison_latents if poisoned else self.clean_latents, compiled)
            return batched(self.tail, fixed, self.batch).argmax(1).cpu(), score.cpu()
        evaluation = self._evaluated()
        scores: list[torch.Tensor] = []

        def fix(latent: torch.Tensor) -> torch.Tensor:
            fixed, score, _ = repair(latent, compiled)
            scores.append(score)
            return fixed

        logits = batched(lambda chunk: self.net(chunk, {self.layer: fix}),
                         evaluation.poisoned if poisoned else evaluation.x, self.batch, self.device)
        return logits.argmax(1).cpu(), torch.cat(scores).cpu()

    def metrics(self, directions: Sequence[Direction], target: int) -> tuple[Metrics, torch.Tensor, torch.Tensor]:
        """Metrics after repair, plus the clean and poisoned scores (for the detector)."""
        evaluation = self._evaluated()
        compiled = compile_directions(directions, self.mu, self.dim, self.device)
        clean_pred, clean_score = self._repaired(False, compiled)
        poison_pred, poison_score = self._repaired(True, compiled)
        figures = accuracy_figures(clean_pred, evaluation.y, poison_pred, evaluation.poisoned_y, target)
        return figures, clean_score, poison_score

    def poisoned_accuracy(self, directions: Sequence[Direction]) -> float:
        """PA alone (the streaming curve): the network does not run on the clean images."""
        pred, _ = self._repaired(True, compile_directions(directions, self.mu, self.dim, self.device))
        return float((pred == self._evaluated().poisoned_y).float().mean())


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
    defender: dict = field(default_factory=dict)  # how the reserve was drawn, how many images were evaluated

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "rows": [asdict(r) for r in self.rows],
            "streaming": self.streaming,
            "detector": self.detector,
            "defender": self.defender,
        }


def evaluate(
    model: Network,
    data: DefenderData,
    target: int,
    layer: str,
    n_flagged: int = 20,
    alpha: float = 1.0,
    curve_points: Sequence[int] = (1, 2, 3, 5, 8, 10, 15, 20, 30, 50, 75, 100),
    batch: int = DEFAULT_BATCH_SIZE,
) -> EvalReport:
    view = LayerView(model, layer, data.samples, data.evaluation, batch)
    evaluation = data.evaluation
    undefended, _, _ = view.metrics([], target)
    shrink = accuracy_figures(predict(model, shrinkpad_defense(evaluation.x), batch), evaluation.y,
                              predict(model, shrinkpad_defense(evaluation.poisoned), batch), evaluation.poisoned_y,
                              target)
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
    available = len(data.samples.flagged)
    streaming = []
    for n in [p for p in curve_points if p <= available]:
        point: dict = {"flagged": n, "shrinkpad": shrink.pa}
        for kind in ("unpaired", "augmented"):
            point[kind] = view.poisoned_accuracy([Direction(view.estimate(kind, n), alpha=alpha)])
        streaming.append(point)
    defender = {**data.describe(), "flagged": n_flagged, "flagged_for_curve": available}
    return EvalReport(layer, rows, streaming, detector, defender)


def sweep(
    model: Network,
    data: DefenderData,
    target: int,
    n_flagged: int = 20,
    estimator: str = "unpaired",
    alphas: Sequence[float] = ALPHA_GRID,
    batch: int = DEFAULT_BATCH_SIZE,
) -> tuple[list[dict], dict]:
    """Per stage of the network (:meth:`~fire_backend.models.network.Network.stages`), the best alpha's CA and PA;
    recommends the layer with the best PA among those whose CA drops by at most one point (or the smallest drop if
    none qualifies)."""
    evaluation = data.evaluation
    base_ca = float((predict(model, evaluation.x, batch) == evaluation.y).float().mean())
    rows = []
    for stage in model.stages():
        layer, shape = stage.name, stage.shape
        view = LayerView(model, layer, data.samples, evaluation, batch)
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
    return rows, {"layer": pick["layer"], "alpha": pick["alpha"], "undefended_ca": base_ca,
                  "defender": data.describe()}


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
