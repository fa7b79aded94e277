"""The FIRE math: clean centroids, streaming direction estimators, and the fused latent repair.

This is the only implementation. Offline evaluation, the sweep, the control endpoint's online
learning and the Triton repair stage all call these functions, so what is measured offline is what
is served. Everything is pure torch and device-agnostic (estimator state is frozen to numpy arrays for the
store); latents are flattened to (N, D).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

MODES = ("projection", "constant")


class RunningMean:
    """Mean of a stream of vectors, folded in one batch (or sample) at a time.

    Accumulates in float64 with the incremental update mean += (sum(x) - k * mean) / n, which
    stays accurate for long streams (no growing sum); the result equals the batch mean of everything
    seen, whether the samples arrive one by one or in batches.
    """

    def __init__(self, dim: int, mean: torch.Tensor | None = None, count: int = 0) -> None:
        self.dim = dim
        self.count = count
        self.mean = torch.zeros(dim, dtype=torch.float64) if mean is None else mean.to(torch.float64).cpu()

    def update(self, samples: torch.Tensor) -> None:
        samples = samples.detach()
        rows = (samples[None] if samples.dim() == 1 else samples.flatten(1)).to(device="cpu", dtype=torch.float64)
        if rows.shape[1] != self.dim:
            raise ValueError(f"samples have {rows.shape[1]} values each; this estimate is over {self.dim}")
        if rows.shape[0] == 0:
            return
        self.count += rows.shape[0]
        self.mean += (rows.sum(0) - rows.shape[0] * self.mean) / self.count

    def value(self) -> torch.Tensor:
        return self.mean.to(torch.float32)


def flatten(latents: torch.Tensor) -> torch.Tensor:
    """(N, ...) -> (N, D); also for an empty batch."""
    return latents.flatten(1)


def centroid(clean_latents: torch.Tensor) -> torch.Tensor:
    """mu_l: the clean centroid at a layer, from a small clean set."""
    return flatten(clean_latents).double().mean(0).float()


@dataclass(frozen=True)
class Reference:
    """The clean reference an unpaired estimate is measured from: per-coordinate mean and variance over ``count``
    clean latents (flattened)."""

    mean: torch.Tensor  # float64 (D,)
    var: torch.Tensor  # float64 (D,), unbiased
    count: int

    @classmethod
    def of(cls, clean_latents: torch.Tensor) -> Reference:
        rows = flatten(clean_latents).double()
        if rows.shape[0] == 0:
            raise ValueError("a clean reference needs at least one clean latent")
        var = rows.var(0) if rows.shape[0] > 1 else torch.zeros(rows.shape[1], dtype=torch.float64)
        return cls(rows.mean(0), var, int(rows.shape[0]))


#: fewest clean latents a non-target reference keeps; with fewer, every clean latent is the reference
MIN_NONTARGET = 2


def reference(clean_latents: torch.Tensor, predictions: torch.Tensor | None = None, target: int | None = None
              ) -> Reference:
    """The clean reference, from the clean latents the model does NOT predict as ``target`` when given.

    Why: the defender's clean reserve holds images of the target class, which sit where the flagged images are
    pushed to; leaving them out of the reference keeps the estimated shift from absorbing the target class's own
    features (measured on the full-size CIFAR-10 models: the "nontarget" reference with the z-score filter lifts
    BadNets PA at layer1.0 + layer4.0 from .86 to .88 and its ASR from .029 to .016).
    """
    if predictions is not None and target is not None:
        keep = predictions.reshape(-1).cpu() != target
        if int(keep.sum()) >= MIN_NONTARGET:
            return Reference.of(flatten(clean_latents)[keep.to(clean_latents.device)])
    return Reference.of(clean_latents)


def significant(shift: torch.Tensor, poisoned_var: torch.Tensor, poisoned_count: int, ref: Reference,
                z: float) -> torch.Tensor:
    """The coordinates of an unpaired shift that are significant, the rest zeroed (a sparse, denoised direction).

    Welch's z per coordinate: |shift| / sqrt(var_poisoned / n_poisoned + var_clean / n_clean); coordinates at or
    below ``z`` are noise of 20 samples, not the trigger, and each one left in moves clean inputs too. When no
    coordinate passes, the shift is returned unchanged (nothing better is known).
    """
    if z <= 0:
        raise ValueError(f"the z-score threshold must be > 0, got {z}")
    shift = shift.reshape(-1).double()
    se = (poisoned_var.double() / max(poisoned_count, 1) + ref.var.double() / max(ref.count, 1)).sqrt()
    keep = shift.abs() > z * se.clamp_min(1e-12)
    if not bool(keep.any()):
        return shift.float()
    return torch.where(keep, shift, torch.zeros_like(shift)).float()


@dataclass(frozen=True)
class UnpairedOptions:
    """How an unpaired direction is sharpened (see :func:`unpaired_direction`); the defaults are the measured best.

    ``z``: keep only coordinates whose Welch z-score exceeds it (None, the default: the plain shift), from
    ``z_min_flagged`` flagged latents on (the variance of fewer is noise). Off by default because it throws away a
    whole-image trigger's signal: on the clean-label SIG CIFAR-10 model the filter at z = 4 kept 20% of the
    coordinates at ``conv1`` (47% of the shift's energy), its direction aligned 0.64 with the true shift against
    0.95 for the plain one, and PA at ``layer1.0 + layer4.0`` fell from 0.572 to 0.478 (z = 3: 0.524, z = 2:
    0.552); on the full-size BadNets and Blended models the plain shift did as well (PA 0.879 / 0.862, ASR 0.010 /
    0.009, against 0.881 / 0.857 and 0.014 / 0.006 filtered; benchmarks/RESULTS.md section 6). ``nontarget``:
    measure the shift from the clean latents not predicted as the target (False: from every clean latent).
    """

    z: float | None = None
    nontarget: bool = True
    z_min_flagged: int = 20

    def __post_init__(self) -> None:
        if self.z is not None and not self.z > 0:
            raise ValueError(f"z must be > 0 or None, not {self.z}")


PLAIN = UnpairedOptions(z=None, nontarget=False)


def unpaired_direction(poisoned: torch.Tensor, clean: torch.Tensor, options: UnpairedOptions = PLAIN,
                       clean_predictions: torch.Tensor | None = None, target: int | None = None) -> torch.Tensor:
    """beta = mean(poisoned) - mean(clean reference), sharpened by ``options`` (PLAIN: the plain unpaired shift).

    ``clean_predictions``/``target`` pick the non-target reference (``options.nontarget``).
    """
    rows = flatten(poisoned).double()
    if rows.shape[0] == 0:
        raise ValueError("an unpaired direction needs at least one flagged latent")
    ref = reference(clean, clean_predictions, target) if options.nontarget else Reference.of(clean)
    shift = rows.mean(0) - ref.mean
    if options.z is None or rows.shape[0] < options.z_min_flagged:
        return shift.float()
    var = rows.var(0) if rows.shape[0] > 1 else torch.zeros_like(shift)
    return significant(shift, var, rows.shape[0], ref, options.z)


class Estimator:
    """Base class: a streaming estimate of the trigger direction beta_l at one layer."""

    kind = "base"

    def __init__(self, dim: int) -> None:
        self.dim = dim

    @property
    def count(self) -> int:
        raise NotImplementedError

    def direction(self) -> torch.Tensor:
        raise NotImplementedError


class PairedEstimator(Estimator):
    """beta = mean over pairs of (poisoned latent - clean latent) of the same image."""

    kind = "paired"

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.diff = RunningMean(dim)

    def observe(self, poisoned: torch.Tensor, clean: torch.Tensor) -> None:
        if poisoned.shape != clean.shape:
            raise ValueError(f"paired latents differ in shape: {tuple(poisoned.shape)} vs {tuple(clean.shape)}")
        self.diff.update(flatten(poisoned).double() - flatten(clean).double())

    @property
    def count(self) -> int:
        return self.diff.count

    def direction(self) -> torch.Tensor:
        return self.diff.value()


class UnpairedEstimator(Estimator):
    """beta = mean(poisoned latents) - mu, with mu the clean centroid (refined by clean observations)."""

    kind = "unpaired"

    def __init__(self, dim: int, clean_centroid: torch.Tensor, clean_count: int = 0) -> None:
        super().__init__(dim)
        self.poisoned = RunningMean(dim)
        self.clean = RunningMean(dim, flatten(clean_centroid[None]).reshape(-1), clean_count)

    def observe(self, poisoned: torch.Tensor | None = None, clean: torch.Tensor | None = None) -> None:
        if poisoned is not None:
            self.poisoned.update(flatten(poisoned))
        if clean is not None:
            self.clean.update(flatten(clean))

    @property
    def count(self) -> int:
        return self.poisoned.count

    def direction(self) -> torch.Tensor:
        return (self.poisoned.mean - self.clean.mean).float()

    def state(self) -> EstimatorState:
        """What a store version keeps so that learning resumes where it stopped (the clean centroid included)."""
        return EstimatorState.of(self.kind, self.poisoned, self.clean)

    @classmethod
    def from_state(cls, state: EstimatorState) -> UnpairedEstimator:
        estimator = cls(state.dim, torch.from_numpy(state.clean_mean), state.clean_count)
        estimator.poisoned = state.running_poisoned()
        return estimator


class AugmentedEstimator(PairedEstimator):
    """Paired estimation where each flagged sample's clean twin is its trigger-broken augmentations.

    The pseudo-clean latent is the mean latent of the augmented copies (e.g. shrink-and-pad, small
    shifts), which destroy a fixed-position or fine-grained trigger but keep the object.
    """

    kind = "augmented"

    def observe_augmented(self, poisoned: torch.Tensor, augmented: Sequence[torch.Tensor]) -> None:
        if not augmented:
            raise ValueError("augmented estimation needs at least one augmented copy per sample")
        twin = torch.stack([flatten(a).double() for a in augmented]).mean(0)
        self.diff.update(flatten(poisoned).double() - twin)

    def state(self, clean: RunningMean) -> EstimatorState:
        """What a store version keeps: the mean (poisoned - twin) difference and the separately kept centroid."""
        return EstimatorState.of(self.kind, self.diff, clean)

    @classmethod
    def from_state(cls, state: EstimatorState) -> AugmentedEstimator:
        estimator = cls(state.dim)
        estimator.diff = state.running_poisoned()
        return estimator


@dataclass
class EstimatorState:
    """A streaming estimate frozen as arrays (stored with each version), so online learning survives restarts.

    ``poisoned_mean``/``poisoned_count`` are the unpaired estimator's poisoned mean, or the augmented
    estimator's mean (poisoned - pseudo-clean twin) difference; ``clean_mean`` is the clean centroid, refined
    by clean observations.
    """

    kind: str  # "unpaired" | "augmented"
    poisoned_mean: np.ndarray  # float64 (D,)
    poisoned_count: int
    clean_mean: np.ndarray  # float64 (D,)
    clean_count: int

    @classmethod
    def of(cls, kind: str, poisoned: RunningMean, clean: RunningMean) -> EstimatorState:
        return cls(kind, poisoned.mean.numpy().copy(), poisoned.count, clean.mean.numpy().copy(), clean.count)

    @property
    def dim(self) -> int:
        return int(self.poisoned_mean.size)

    def running_poisoned(self) -> RunningMean:
        return RunningMean(self.dim, torch.from_numpy(self.poisoned_mean), self.poisoned_count)

    def restore(self) -> tuple[UnpairedEstimator | AugmentedEstimator, RunningMean]:
        """The live estimator to keep folding observations into, and the clean centroid's running mean."""
        if self.kind == "unpaired":
            unpaired = UnpairedEstimator.from_state(self)
            return unpaired, unpaired.clean
        if self.kind == "augmented":
            clean = RunningMean(self.dim, torch.from_numpy(self.clean_mean), self.clean_count)
            return AugmentedEstimator.from_state(self), clean
        raise ValueError(f"unknown estimator kind {self.kind!r}")


@dataclass
class Direction:
    """One trigger direction at the repaired layer, with how to apply it."""

    beta: torch.Tensor  # (D,)
    alpha: float = 1.0
    mode: str = "projection"
    threshold: float = 0.5  # flag a sample whose projection coefficient exceeds this
    name: str = "default"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")


@dataclass
class CompiledRepair:
    """Directions pre-arranged as matrices on the target device, so a batch costs two matmuls.

    For K directions with unit vectors U (K x D): s = x.U^T - mu.U^T is how far each sample sits
    beyond the clean centroid along each direction; the coefficient removed along U_k is
    alpha_k * relu(s_k) in projection mode and alpha_k * |beta_k| in constant mode, all at once.
    """

    units: torch.Tensor  # (K, D)
    norms: torch.Tensor  # (K,)
    offsets: torch.Tensor  # (K,) mu . u_k
    alphas: torch.Tensor  # (K,)
    projection: torch.Tensor  # (K,) bool
    thresholds: torch.Tensor  # (K,)
    version: int = 0
    # Derived once here, so a served batch runs as few tensor operations as possible (on a small model each
    # operation's dispatch costs more than its arithmetic).
    neg_offsets: torch.Tensor = field(init=False, repr=False)
    units_t: torch.Tensor = field(init=False, repr=False)  # (D, K)
    all_projection: bool = field(init=False, repr=False)
    unit_alphas: bool = field(init=False, repr=False)
    #: with one direction (the common case): 1 / |beta| and the threshold in units of ``beyond``, as Python floats
    inv_norm: float = field(init=False, repr=False)
    flag_at: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.neg_offsets = -self.offsets
        self.units_t = self.units.t()
        self.all_projection = bool(self.projection.all())
        self.unit_alphas = bool((self.alphas == 1.0).all())
        single = self.units.shape[0] == 1
        self.inv_norm = 1.0 / float(self.norms[0]) if single else 0.0
        self.flag_at = float(self.thresholds[0]) * float(self.norms[0]) if single else 0.0

    @property
    def empty(self) -> bool:
        return self.units.shape[0] == 0


def compile_directions(
    directions: Sequence[Direction],
    center: torch.Tensor | None,
    dim: int,
    device: str | torch.device = "cpu",
    version: int = 0,
) -> CompiledRepair:
    if directions and center is None:
        raise ValueError("repair needs the clean centroid")
    for d in directions:
        if d.beta.numel() != dim:
            raise ValueError(f"direction {d.name!r} has {d.beta.numel()} values; the latent has {dim}")
        if not bool(torch.isfinite(d.beta).all()):
            raise ValueError(f"direction {d.name!r} has NaN or Inf values")
    if center is not None and (center.numel() != dim or not bool(torch.isfinite(center).all())):
        raise ValueError(f"the centroid must be {dim} finite values")
    betas = torch.stack([d.beta.reshape(-1).float() for d in directions]) if directions else torch.zeros(0, dim)
    norms = betas.norm(dim=1)
    if bool((norms <= 0).any()):
        raise ValueError("a direction has zero norm")
    units = betas / norms[:, None] if directions else betas
    mu = center.reshape(-1).float() if center is not None else torch.zeros(dim)
    return CompiledRepair(
        units=units.to(device).contiguous(),
        norms=norms.to(device),
        offsets=(units @ mu).to(device),
        alphas=torch.tensor([d.alpha for d in directions], dtype=torch.float32, device=device),
        projection=torch.tensor([d.mode == "projection" for d in directions], dtype=torch.bool, device=device),
        thresholds=torch.tensor([d.threshold for d in directions], dtype=torch.float32, device=device),
        version=version,
    )


def repair(latents: torch.Tensor, compiled: CompiledRepair) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Repair a batch of latents: returns (repaired latents, score, flagged).

    score is the largest projection coefficient <x - mu, beta> / |beta|^2 over the directions: about
    0 for clean inputs and about 1 for a typical triggered one. With no direction the input is
    returned as is with score 0.
    """
    n = latents.shape[0]
    if compiled.empty:
        zeros = torch.zeros(n, device=latents.device)
        return latents, zeros, torch.zeros(n, dtype=torch.bool, device=latents.device)
    flat = latents.flatten(1)
    beyond = torch.addmm(compiled.neg_offsets, flat, compiled.units_t)  # (N, K)
    if compiled.all_projection:
        removed = beyond.clamp_min(0.0)
        if not compiled.unit_alphas:
            removed = removed * compiled.alphas
    else:
        removed = torch.where(
            compiled.projection, compiled.alphas * beyond.clamp_min(0.0), compiled.alphas * compiled.norms
        )
    repaired = torch.addmm(flat, removed, compiled.units, alpha=-1.0).reshape(latents.shape)
    if beyond.shape[1] == 1:  # scalars instead of (K,) tensors: two tensor operations fewer per batch
        along = beyond[:, 0]
        return repaired, along * compiled.inv_norm, along > compiled.flag_at
    coefficients = beyond / compiled.norms
    flagged = (coefficients > compiled.thresholds).any(dim=1)
    return repaired, coefficients.max(dim=1).values, flagged


@dataclass
class RepairPlan:
    """One direction version compiled for every layer it repairs: what a served network applies as it runs.

    ``repairs`` maps a layer (a stage name of the network) to its compiled directions. Layers without a direction
    are left out, so they cost nothing. The forward pass reaches the layers in the network's stage order, so a
    deeper layer always sees a latent already repaired upstream. One plan serves a whole batch: a request never
    mixes versions.
    """

    repairs: dict[str, CompiledRepair] = field(default_factory=dict)
    version: int = 0

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.repairs)


def compile_plan(
    direction_sets: Mapping[str, tuple[Sequence[Direction], torch.Tensor | None]],
    dims: Mapping[str, int],
    device: str | torch.device = "cpu",
    version: int = 0,
) -> RepairPlan:
    """A plan from ``{layer: (directions, clean centroid)}``; ``dims`` holds each repairable layer's latent size."""
    repairs = {}
    for layer, (directions, center) in direction_sets.items():
        if layer not in dims:
            raise ValueError(f"no repairable latent at layer {layer!r}; configured layers: {', '.join(dims)}")
        if directions:
            repairs[layer] = compile_directions(directions, center, dims[layer], device, version)
    return RepairPlan(repairs, version)


class RepairPass:
    """Applies a plan to one batch while the network runs, and collects the per-sample outputs.

    ``hooks`` go to :meth:`fire_backend.models.split.Part.forward`, which calls each at its layer. Per sample, the score
    is the largest over the repaired layers and a sample is flagged when any layer flags it; with nothing to
    repair the score is 0. ``keep`` (bool, one per row) marks rows that keep their unrepaired latent at every
    layer (bypassing requests); their scores are still computed (shadow mode).
    """

    def __init__(self, plan: RepairPlan, keep: torch.Tensor | None = None) -> None:
        self.plan = plan
        self.keep = keep if keep is not None and bool(keep.any()) else None
        self._score: torch.Tensor | None = None
        self._flagged: torch.Tensor | None = None
        self.hooks: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            layer: self._hook(compiled) for layer, compiled in plan.repairs.items()}

    def _hook(self, compiled: CompiledRepair) -> Callable[[torch.Tensor], torch.Tensor]:
        def apply(latents: torch.Tensor) -> torch.Tensor:
            repaired, score, flagged = repair(latents, compiled)
            self._score = score if self._score is None else torch.maximum(self._score, score)
            self._flagged = flagged if self._flagged is None else self._flagged | flagged
            if self.keep is None:
                return repaired
            keep = self.keep.to(latents.device).reshape(-1, *([1] * (latents.dim() - 1)))
            return torch.where(keep, latents, repaired)

        return apply

    def outputs(self, n: int, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(score, flagged) of the ``n`` samples, after the network ran."""
        if self._score is None:
            return torch.zeros(n, device=device), torch.zeros(n, dtype=torch.bool, device=device)
        return self._score, self._flagged
