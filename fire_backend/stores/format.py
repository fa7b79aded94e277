"""The direction store's format: what a version holds (a direction set per layer), what a store commits to
(:class:`LiveState`), the errors every engine raises, and the checks a version must pass to be served.

Both engines (:mod:`fire_backend.stores.files`, :mod:`fire_backend.stores.etcd.store`) write and read these bytes
and raise these errors; nothing here touches a disk or a network.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fire_backend.fire import MODES, Direction, EstimatorState

#: the one-layer format (read only: versions written before every version held named layers) and the layered one,
#: the only one written (a fire-backend older than it refuses it as "not a direction-set file" rather than
#: misreading it)
MAGIC = "fire-backend/direction-set/v1"
MAGIC_LAYERED = "fire-backend/direction-set/v2"
MAGICS = (MAGIC, MAGIC_LAYERED)

#: checks that a version's sets fit the network being served (layer names, shapes, bounds); raises ValueError
FitCheck = Callable[["LayeredSet"], None]


class StoreError(Exception):
    """A store operation could not be carried out; the store is unchanged."""


class Conflict(StoreError):
    """Another writer committed first inside a :meth:`locked` block of a store that locks optimistically (etcd);
    nothing of the block was committed from then on: run the block again on the new live version."""


class StoreUnavailable(StoreError):
    """The store's engine could not be reached in time; a write's outcome is unknown (the message says how to
    find it in the history)."""


@dataclass
class DirectionSet:
    """What a version holds at one layer: the clean centroid, the live directions, and the estimator state."""

    center: np.ndarray  # float32 (D,)
    directions: list[Direction] = field(default_factory=list)
    estimator: EstimatorState | None = None

    @property
    def dim(self) -> int:
        return int(self.center.size)

    def arrays(self, prefix: str = "") -> dict[str, Any]:
        """The set as named arrays (``prefix`` keeps several layers' sets apart in one payload)."""
        arrays: dict[str, Any] = {"center": np.asarray(self.center, dtype=np.float32)}
        arrays["betas"] = np.stack([d.beta.reshape(-1).cpu().numpy().astype(np.float32) for d in self.directions]) \
            if self.directions else np.zeros((0, self.dim), np.float32)
        arrays["alphas"] = np.array([d.alpha for d in self.directions], np.float64)
        arrays["thresholds"] = np.array([d.threshold for d in self.directions], np.float64)
        arrays["modes"] = np.array([d.mode for d in self.directions], dtype="U16")
        arrays["names"] = np.array([d.name for d in self.directions], dtype="U64")
        if self.estimator is not None:
            e = self.estimator
            arrays.update(est_kind=np.array(e.kind), est_poisoned_mean=e.poisoned_mean.astype(np.float64),
                          est_poisoned_count=np.array(e.poisoned_count), est_clean_mean=e.clean_mean.astype(np.float64),
                          est_clean_count=np.array(e.clean_count))
        return {prefix + key: value for key, value in arrays.items()}

    @classmethod
    def of_arrays(cls, data: Any, prefix: str = "") -> DirectionSet:
        def get(key: str) -> np.ndarray:
            return data[prefix + key]

        directions = [
            Direction(torch.from_numpy(get("betas")[i].copy()), float(get("alphas")[i]), str(get("modes")[i]),
                      float(get("thresholds")[i]), str(get("names")[i]))
            for i in range(len(get("betas")))
        ]
        estimator = None
        if prefix + "est_kind" in data.files:
            estimator = EstimatorState(str(get("est_kind")), get("est_poisoned_mean").copy(),
                                       int(get("est_poisoned_count")), get("est_clean_mean").copy(),
                                       int(get("est_clean_count")))
        return cls(get("center").copy(), directions, estimator)


def _npz(arrays: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


#: the layer of a bare set (the one-layer format, or a set committed without a layer): the split layer
SPLIT = ""


@dataclass
class LayeredSet:
    """What a version holds across layers, committed as one: a direction set per configured layer (a layer with
    no direction repairs nothing), the flagged images the learned directions were estimated from (uint8
    N x H x W x C, so a later observation re-estimates from all of them: exact in ``ordered`` mode, and what the
    label-free ranking folds over), and the ranking that chose the repaired layers.
    """

    sets: dict[str, DirectionSet]
    flagged: np.ndarray | None = None
    ranking: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.sets:
            raise ValueError("a layered set needs at least one layer")

    def to_bytes(self) -> bytes:
        arrays: dict[str, Any] = {"layers": np.array(list(self.sets), dtype="U64"),
                                  "ranking": np.array(json.dumps(self.ranking))}
        for i, ds in enumerate(self.sets.values()):
            arrays.update(ds.arrays(f"{i}/"))
        if self.flagged is not None:
            arrays["flagged"] = np.asarray(self.flagged, dtype=np.uint8)
        return _npz(arrays)

    @classmethod
    def from_bytes(cls, payload: bytes) -> LayeredSet:
        with np.load(io.BytesIO(payload), allow_pickle=False) as data:
            if "layers" not in data.files:  # the one-layer format: the split layer's set
                return cls({SPLIT: DirectionSet.of_arrays(data)})
            sets = {str(layer): DirectionSet.of_arrays(data, f"{i}/") for i, layer in enumerate(data["layers"])}
            flagged = data["flagged"].copy() if "flagged" in data.files else None
            return cls(sets, flagged, json.loads(str(data["ranking"])))

    def at(self, split_layer: str) -> dict[str, DirectionSet]:
        """The sets by layer name, a one-layer version's set named ``split_layer``."""
        return {split_layer if layer == SPLIT else layer: ds for layer, ds in self.sets.items()}

    @classmethod
    def of(cls, directions: DirectionSet | LayeredSet) -> LayeredSet:
        """``directions`` as layered: a bare set is the split layer's (what a store commits, in the one format)."""
        return directions if isinstance(directions, LayeredSet) else cls({SPLIT: directions})

    def counts(self, split_layer: str) -> dict[str, int]:
        """How many directions each layer holds."""
        return {layer: len(ds.directions) for layer, ds in self.at(split_layer).items()}


@dataclass(frozen=True)
class Version:
    number: int
    sha256: str
    layered: LayeredSet
    header: dict

    @property
    def directions(self) -> DirectionSet:
        """The set of a one-layer version (a StoreError for a version with several layers: use ``layered``)."""
        if len(self.layered.sets) != 1:
            raise StoreError(f"version {self.number} holds {len(self.layered.sets)} layers")
        return next(iter(self.layered.sets.values()))


@dataclass(frozen=True)
class LiveState:
    """What a store commits to, what of it can be verified now, and the damage found on the way.

    ``version``/``sha256``: the committed live version (``CURRENT``, checked against the history); None when the
    store cannot say (missing, empty, unreadable). ``verified``: the newest committed version whose file verifies,
    which is what an instance that starts now applies; equal to ``version`` unless that file is damaged; None when
    no committed version verifies (an instance then keeps what it has, or holds if it has nothing). ``damage``: one
    line per problem, e.g. "CURRENT unreadable". ``pristine``: nothing was ever committed (version 0 by absence,
    not by a rollback): an instance that applies a version never drops to 0 because a store looks new.
    """

    version: int | None
    sha256: str
    verified: int | None
    damage: tuple[str, ...] = ()
    pristine: bool = False

    @property
    def degraded(self) -> bool:
        """Whether anything is wrong: damage named, or the committed version not the one that verifies."""
        return bool(self.damage) or self.verified is None or self.verified != self.version



def committable(directions: DirectionSet | LayeredSet, fits: FitCheck | None) -> LayeredSet:
    """What an engine commits: ``directions`` as layered, checked with ``fits`` first (StoreError, nothing
    committed, when it does not fit)."""
    layered = LayeredSet.of(directions)
    if fits is not None:
        try:
            fits(layered)
        except ValueError as exc:
            raise StoreError(f"refused: the set does not fit the served network ({exc}); nothing was committed"
                             ) from None
    return layered


def fits_network(layer_dims: Mapping[str, int], split_layer: str, max_norm: float, max_alpha: float,
                 max_directions: int) -> FitCheck:
    """A check that a version's sets fit the network being served: every layer one it repairs, each set of that
    layer's latent size and within the bounds the control endpoint enforces (ValueError naming the problem)."""

    def check(layered: LayeredSet) -> None:
        for layer, ds in layered.at(split_layer).items():
            if layer not in layer_dims:
                raise ValueError(f"layer {layer!r} is not repaired by this network (it repairs "
                                 f"{', '.join(layer_dims)})")
            try:
                validate_direction_set(ds, layer_dims[layer], max_norm, max_alpha, max_directions)
            except ValueError as exc:
                raise ValueError(f"{layer}: {exc}") from None

    return check


def validate_direction_set(ds: DirectionSet, dim: int, max_norm: float, max_alpha: float, max_directions: int) -> None:
    """Reject anything a repair stage must never apply; raises ValueError naming the problem."""
    if ds.center.shape != (dim,):
        raise ValueError(f"center has shape {ds.center.shape}; the latent has {dim} values")
    if not np.isfinite(ds.center).all():
        raise ValueError("center has NaN or Inf values")
    if len(ds.directions) > max_directions:
        raise ValueError(f"{len(ds.directions)} directions; at most {max_directions}")
    for d in ds.directions:
        beta = d.beta.reshape(-1)
        if beta.numel() != dim:
            raise ValueError(f"direction {d.name!r} has {beta.numel()} values; the latent has {dim}")
        if not bool(torch.isfinite(beta).all()):
            raise ValueError(f"direction {d.name!r} has NaN or Inf values")
        norm = float(beta.norm())
        if not 0.0 < norm <= max_norm:
            raise ValueError(f"direction {d.name!r} has norm {norm:.4g}; allowed (0, {max_norm:g}]")
        if not (np.isfinite(d.alpha) and 0.0 <= d.alpha <= max_alpha):
            raise ValueError(f"direction {d.name!r} has alpha {d.alpha}; allowed [0, {max_alpha:g}]")
        if d.mode not in MODES:
            raise ValueError(f"direction {d.name!r} has mode {d.mode!r}; allowed {MODES}")
        if not np.isfinite(d.threshold):
            raise ValueError(f"direction {d.name!r} has a non-finite threshold")
