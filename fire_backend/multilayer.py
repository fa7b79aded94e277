"""Directions at several layers from the defender's evidence, and the label-free choice of the layers to repair.

The defender has flagged images (their predicted label is the attack's target) and a clean reserve, never true
labels. :func:`estimate` turns that evidence into one direction set per layer with the FIRE math of
:mod:`fire_backend.fire`; :func:`rank_subsets` scores candidate layer subsets by K-fold over the evidence alone.
``fire sweep`` (offline) and the control endpoint's ``observe`` (online) both call these, so what is ranked offline
is what is served.

Two estimation modes: ``independent`` (the measured default) estimates every layer from unrepaired latents;
``ordered`` estimates a deeper layer on latents already repaired upstream, as the served network will see them.
On the full-size CIFAR-10 BadNets model, layer1.0 + layer4.0 reached PA .86 / ASR .029 independent but .69 / .21
ordered: the upstream repair already moves the flagged latents, so the deeper shift is small and noisy.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from fire_backend.defaults import ESTIMATION_MODES
from fire_backend.fire import Direction, UnpairedOptions, centroid, compile_directions, repair, unpaired_direction
from fire_backend.models.layers import Layer
from fire_backend.models.network import Network

if TYPE_CHECKING:
    from fire_backend.repository.layout import ServingSettings

MODES = ESTIMATION_MODES
#: folds of the label-free ranking, and the weight of a changed clean prediction against a flipped flagged one
FOLDS = 5
CHANGE_WEIGHT = 2.0
#: subsets of at most this many layers are ranked (the measured gains stop at two)
MAX_SUBSET = 2

LayerSets = dict[str, tuple[list[Direction], torch.Tensor]]
Hook = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EstimationSettings:
    """How directions are estimated from flagged images (typed; the serving settings and the CLI fill it in)."""

    mode: str = "independent"
    options: UnpairedOptions = UnpairedOptions()
    alpha: float = 1.0
    threshold: float = 0.5
    batch: int = 64

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"estimation mode must be one of {', '.join(MODES)}, not {self.mode!r}")

    @classmethod
    def of(cls, settings: ServingSettings) -> EstimationSettings:
        """How a repository estimates: its serving settings, typed (the builder and the control endpoint alike)."""
        return cls(settings.estimation, UnpairedOptions(settings.estimation_z or None, settings.nontarget_reference),
                   settings.default_alpha, settings.default_threshold, settings.max_batch_size)


def _weight_layer(layer: Layer) -> bool:
    name = layer.module_type.lower()
    return "conv" in name or "linear" in name


def default_layers(stages: Sequence[Layer]) -> tuple[str, ...]:
    """The layers ``fire repo build`` repairs at when none is named: an early and a deep one, chosen from the
    network's stages (:meth:`fire_backend.models.network.Network.stages`) by one rule for any network; the label-free
    ranking then picks among their subsets online.

    - **early**: the first stage that is a block (a module with submodules: a residual block, a conv-norm-activation
      unit); in a network of single layers only (VGG's ``features``), the first stage after the first weight layer
      that is not itself a weight layer (the end of the first convolution unit).
    - **deep**: the first stage after the early one at the smallest spatial size above 1 x 1 among the C x H x W
      latents after it (where the last resolution stage starts, before global pooling); in a network without such
      latents (a transformer's tokens, vectors), the stage three quarters of the way from the early one to the
      last stage.

    On the built-ins it gives the pairs measured best (CIFAR-10 PreActResNet18: ``layer1.0`` + ``layer4.0``,
    layer4.0 alone fails Blended, PA .56, layer1.0 alone leaves BadNets ASR up to .20, both: BadNets PA .878 ASR
    .016, Blended PA .835 ASR .014; digits CNN: ``block1`` + ``block2``, ranked best for every digits attack
    measured). One layer when the network has no later stage.
    """
    stages = list(stages)
    if not stages:
        raise ValueError("the network has no stage to repair at (no module called once per forward that returns "
                         "one tensor with the batch dimension): name a layer")
    early = next((i for i, s in enumerate(stages) if s.kind == "block"), None)
    if early is None:
        first_weight = next((i for i, s in enumerate(stages) if _weight_layer(s)), 0)
        early = next((i for i, s in enumerate(stages) if i > first_weight and not _weight_layer(s)), 0)
    after = stages[early + 1:]
    if not after:
        return (stages[early].name,)
    sizes = [s.spatial for s in after if s.spatial is not None and s.spatial > 1]
    if sizes:
        deep = next(s for s in after if s.spatial == min(sizes))
    else:
        deep = stages[early + max(1, round(0.75 * len(after)))]
    return stages[early].name, deep.name


def _in_order(net: Network, layers: Sequence[str]) -> list[str]:
    net.check_hooks(layers)
    return sorted(set(layers), key=net.layers.index)


def run(net: Network, images: torch.Tensor, repairs: Mapping[str, Hook],
        capture: Sequence[str] = (), batch: int = 64) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits of ``images`` (CPU) with ``repairs`` hooked in, and the latents entering each ``capture`` layer's
    repair (CPU, flattened), i.e. the latent after that layer with every upstream repair applied."""
    device = next(net.parameters()).device
    logits, captured = [], {layer: [] for layer in capture}

    def hook(layer: str) -> Hook:
        fix = repairs.get(layer)

        def apply(x: torch.Tensor) -> torch.Tensor:
            if layer in captured:
                captured[layer].append(x.flatten(1).cpu())
            return fix(x) if fix is not None else x
        return apply

    hooks = {layer: hook(layer) for layer in {*repairs, *capture}}
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            logits.append(net(images[start:start + batch].to(device), hooks).cpu())
    return torch.cat(logits), {layer: torch.cat(parts) for layer, parts in captured.items()}


def repairs_of(sets: LayerSets, device: torch.device | str = "cpu") -> dict[str, Hook]:
    """Hooks applying each layer's directions (the served repair, :func:`fire_backend.fire.repair`)."""
    hooks = {}
    for layer, (directions, center) in sets.items():
        if directions:
            compiled = compile_directions(directions, center, center.numel(), device)
            hooks[layer] = lambda x, c=compiled: repair(x, c)[0]
    return hooks


#: a second (third, ...) label counts as an attack's target when at least this share of the flagged images, and two
#: of them, are predicted as it: several triggers with their own targets in one model (each gets its own direction)
TARGET_SHARE = 0.25
MAX_TARGETS = 4


def targets_of(predictions: torch.Tensor, share: float = TARGET_SHARE) -> list[int]:
    """The attack targets the flagged images' predictions show: the most predicted label first (the single target of
    an all-to-one attack), then every other label predicted for ``share`` of them (and at least two), most first."""
    predictions = predictions.reshape(-1).cpu()
    counts = torch.bincount(predictions)
    first = int(torch.mode(predictions).values)
    need = max(2, int(np.ceil(share * len(predictions))))
    others = [int(c) for c in torch.argsort(counts, descending=True, stable=True) if c != first and counts[c] >= need]
    return [first, *others][:MAX_TARGETS]


class Evidence:
    """The defender's images and what the unrepaired network makes of them (computed once, reused by every fold
    and candidate): the targets (:func:`targets_of` the flagged predictions; ``target`` is the first), each flagged
    image's target (its own prediction when that is a target, else the first), the clean predictions, and the
    unrepaired latents at every layer asked for."""

    def __init__(self, net: Network, clean: torch.Tensor, flagged: torch.Tensor, layers: Sequence[str],
                 batch: int = 64) -> None:
        if len(flagged) == 0 or len(clean) == 0:
            raise ValueError("estimation needs at least one flagged and one clean image")
        self.net, self.clean, self.flagged, self.batch = net, clean, flagged, batch
        self.layers = _in_order(net, layers)
        clean_logits, self.clean_latents = run(net, clean, {}, self.layers, batch)
        flagged_logits, self.flagged_latents = run(net, flagged, {}, self.layers, batch)
        self.clean_logits = clean_logits
        self.clean_pred = clean_logits.argmax(1)
        predicted = flagged_logits.argmax(1)
        self.targets = targets_of(predicted)
        self.target = self.targets[0]
        self.flagged_target = torch.where(torch.isin(predicted, torch.tensor(self.targets)), predicted,
                                          torch.tensor(self.target))


def estimate(evidence: Evidence, layers: Sequence[str], settings: EstimationSettings,
             clean_rows: np.ndarray | None = None, flagged_rows: np.ndarray | None = None) -> LayerSets:
    """One direction per target and the clean centroid per layer, from the evidence's rows (all by default).

    ``independent``: every layer from the cached unrepaired latents. ``ordered``: layer by layer in stage order,
    each from latents repaired at the layers before it. Each target's direction comes from the flagged images
    assigned to it (``Evidence.flagged_target``): one attack, one direction, as before; two triggers with their own
    targets, two directions (their mean shift would be neither trigger's).
    """
    ev = evidence
    crows = slice(None) if clean_rows is None else torch.as_tensor(clean_rows)
    frows = slice(None) if flagged_rows is None else torch.as_tensor(flagged_rows)
    flagged_target = ev.flagged_target[frows]
    sets: LayerSets = {}
    for layer in _in_order(ev.net, layers):
        if settings.mode == "independent" or not sets:
            clean, flagged, clean_pred = ev.clean_latents[layer][crows], ev.flagged_latents[layer][frows], \
                ev.clean_pred[crows]
        else:
            upstream = repairs_of(sets)
            logits, clean_at = run(ev.net, ev.clean[crows], upstream, [layer], ev.batch)
            _, flagged_at = run(ev.net, ev.flagged[frows], upstream, [layer], ev.batch)
            clean, flagged, clean_pred = clean_at[layer], flagged_at[layer], logits.argmax(1)
        directions = []
        for target in ev.targets:
            group = flagged[flagged_target == target]
            if len(group):
                beta = unpaired_direction(group, clean, settings.options, clean_pred, target)
                if beta.norm() > 0:
                    directions.append(Direction(beta, settings.alpha, "projection", settings.threshold,
                                                f"target-{target}"))
        sets[layer] = (directions, centroid(clean))
    return sets


@dataclass(frozen=True)
class FoldScore:
    """What the K folds say of one layer subset, without labels.

    ``flip``: share of held-out flagged images whose prediction leaves their target after the repair; ``restore``:
    the same images counted by the confidence of their new prediction (the mean over held-out flagged images of the
    top class probability where the prediction left the target, 0 where it did not); ``change``: share of held-out
    clean images whose prediction changes; ``clean_tv``: mean total-variation distance of the held-out clean
    images' class probabilities (the tie-break: a repair that leaves clean outputs alone).

    Why ``restore`` and not ``flip``: leaving the target is all a trigger patch needs, but a whole-image trigger
    (SIG) can be pushed off the target without its image's own class coming back, into a prediction the network is
    unsure of. On the clean-label SIG CIFAR-10 model every subset flipped every held-out image, and the one the
    flip rule kept (``layer4.0``: PA 0.34) left them at a mean top probability of 0.47; the pair that repairs
    (PA 0.57 at CA 0.59) at 0.71 (benchmarks/RESULTS.md section 6).
    """

    layers: tuple[str, ...]
    flip: float
    change: float
    clean_tv: float
    restore: float

    @property
    def score(self) -> float:
        return self.restore - CHANGE_WEIGHT * self.change

    def key(self) -> tuple[float, float, int]:
        """Higher is better: the rule, then the tie-break, then fewer layers (cheaper to serve)."""
        return (round(self.score, 9), -round(self.clean_tv, 9), -len(self.layers))

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "flip": self.flip, "restore": self.restore, "change": self.change,
                "clean_tv": self.clean_tv, "score": self.score}


def fold_score(evidence: Evidence, layers: Sequence[str], settings: EstimationSettings, folds: int = FOLDS,
               seed: int = 0) -> FoldScore:
    """:class:`FoldScore` of repairing at ``layers``: estimate on K-1 folds of the flagged and clean images, count
    flips (and their confidence) and changes on the held-out fold, over all K folds."""
    ev = evidence
    if len(ev.flagged) < folds or len(ev.clean) < folds:
        raise ValueError(f"the ranking needs at least {folds} flagged and {folds} clean images")
    rng = np.random.default_rng(seed)
    flagged_folds = np.array_split(rng.permutation(len(ev.flagged)), folds)
    clean_folds = np.array_split(rng.permutation(len(ev.clean)), folds)
    base_prob = ev.clean_logits.softmax(1)
    flips = changes = 0
    tv = restored = 0.0
    for f in range(folds):
        train_f = np.concatenate([flagged_folds[g] for g in range(folds) if g != f])
        train_c = np.concatenate([clean_folds[g] for g in range(folds) if g != f])
        hooks = repairs_of(estimate(ev, layers, settings, train_c, train_f))
        held_f, held_c = torch.as_tensor(flagged_folds[f]), torch.as_tensor(clean_folds[f])
        flagged_logits, _ = run(ev.net, ev.flagged[held_f], hooks, (), ev.batch)
        clean_logits, _ = run(ev.net, ev.clean[held_c], hooks, (), ev.batch)
        top, predicted = flagged_logits.softmax(1).max(1)
        left = predicted != ev.flagged_target[held_f]
        flips += int(left.sum())
        restored += float(top[left].sum())
        changes += int((clean_logits.argmax(1) != ev.clean_pred[held_c]).sum())
        tv += float(0.5 * (clean_logits.softmax(1) - base_prob[held_c]).abs().sum(1).sum())
    return FoldScore(tuple(_in_order(ev.net, layers)), flips / len(ev.flagged), changes / len(ev.clean),
                     tv / len(ev.clean), restored / len(ev.flagged))


def candidate_subsets(layers: Sequence[str], max_size: int = MAX_SUBSET) -> list[tuple[str, ...]]:
    """Every non-empty subset of ``layers`` of at most ``max_size`` layers (in the given order)."""
    return [combo for size in range(1, min(max_size, len(layers)) + 1)
            for combo in itertools.combinations(layers, size)]


def ranked(scores: Sequence[FoldScore], full: Sequence[str] = (), tolerance: float = 0.0) -> list[FoldScore]:
    """Best first by the rule: highest restore - CHANGE_WEIGHT x change; then the lowest clean_tv; then the fewest
    layers. When the ``full`` subset (every configured layer) scores within ``tolerance`` of the best, it goes
    first instead.

    Why: at a handful of flagged images the folds cannot tell the subsets apart (on the CIFAR-10 BadNets model at 5
    flagged images every subset flipped 2 of 5 held-out images, none changed a clean one), and the clean_tv
    tie-break then picks the subset that touches clean outputs least, which is the one that does least: layer4.0
    alone, PA .036. Repairing every configured layer is what the unranked small-n path does (PA .81-.88 from one
    flagged image), so a difference the folds cannot resolve is no reason to drop a layer.
    """
    order = sorted(scores, key=FoldScore.key, reverse=True)
    whole = tuple(full)
    for rank, candidate in enumerate(order):
        if candidate.layers == whole and candidate.score >= order[0].score - tolerance - 1e-9:
            order.insert(0, order.pop(rank))
            break
    return order


def rank_subsets(evidence: Evidence, settings: EstimationSettings, candidates: Sequence[Sequence[str]] | None = None,
                 folds: int = FOLDS) -> list[FoldScore]:
    """Every candidate subset (default: :func:`candidate_subsets` of the evidence's layers) scored, best first
    (:func:`ranked`; a tie within one held-out flagged image's worth, 1 / flagged, goes to every evidence layer)."""
    subsets = candidates if candidates is not None else candidate_subsets(evidence.layers)
    return ranked([fold_score(evidence, subset, settings, folds) for subset in subsets], evidence.layers,
                  1.0 / len(evidence.flagged))


def learn(evidence: Evidence, settings: EstimationSettings, folds: int = FOLDS) -> tuple[LayerSets, list[FoldScore]]:
    """Choose the layers to repair from the evidence alone, and their directions: an entry for every evidence layer,
    those outside the chosen subset with no direction (their clean centroid kept).

    With several layers and at least ``folds`` flagged and clean images, the best subset of
    :func:`rank_subsets` is repaired (the ranking is returned, best first; a near tie keeps every layer);
    otherwise every layer is, unranked.
    """
    ev = evidence
    enough = len(ev.flagged) >= folds and len(ev.clean) >= folds
    ranking = rank_subsets(ev, settings, folds=folds) if len(ev.layers) > 1 and enough else []
    chosen = ranking[0].layers if ranking else tuple(ev.layers)
    sets = estimate(ev, chosen, settings)
    return {layer: sets.get(layer) or ([], centroid(ev.clean_latents[layer])) for layer in ev.layers}, ranking
