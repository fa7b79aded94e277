"""The layout of a served repository, and the artifacts it loads: model halves, settings, centroid, store.

A repository is ``<repo>/models/<model>/...`` (what tritonserver is pointed at: models only, so Triton's poll
mode can watch it) beside ``<repo>/artifacts/`` (halves, serving settings, clean centroid, direction store).
``fire repo build`` writes them; the launcher and every Triton stage find them through this module, so the layout
is defined once. Nothing here imports Triton.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fire_backend.defaults import MAX_CLEAN_CHANGE, RESERVE, RESERVE_SEED, RETAIN_VERSIONS
from fire_backend.stores.instances import INSTANCES_DIR
from fire_backend.wire.names import FIRE_ENSEMBLE, MAX_CONTROL_REQUEST_BYTES

if TYPE_CHECKING:
    from fire_backend.stores.backends import StoreBackend
    from fire_backend.stores.damage import DamageListener

#: the folder of a repository that tritonserver serves (``--model-repository``): model directories only
MODELS_DIR = "models"
#: the artifacts folder beside it (each stage's ``artifacts_dir`` parameter, relative to the repository root)
ARTIFACTS_DIR = "artifacts"
#: the whole network (spec + weights; a user network's file sits beside it); every stage takes its part at start
FULL_FILE = "full.pt"
SETTINGS_FILE = "serving.json"
#: the clean centroid the store starts from (version 0) and its sample count
CENTROID_FILE = "centroid.npz"
STORE_DIR = "store"
#: the defender's clean reserve images the centroid came from (uint8 N x H x W x C): the control endpoint's clean
#: evidence when it estimates several layers and ranks them
RESERVE_FILE = "reserve.npz"

#: config parameter: "true" makes a plain head check fire_bypass credentials (the separate layout's head, which
#: alone sees the request's IMAGE; the repair stage behind it then honours the flag)
GUARD_PARAMETER = "bypass_guard"


@dataclass(frozen=True)
class Limits:
    """Bounds on what the control endpoint accepts (a pushed or learned set outside them is refused)."""

    max_direction_norm: float = 1e4
    max_alpha: float = 10.0
    max_directions: int = 8
    max_observe_images: int = 256
    #: REQUEST and IMAGES bytes of one control request together; never more than MAX_CONTROL_REQUEST_BYTES, whatever
    #: a repository's settings say (the stubs' regions are sized for that)
    max_request_bytes: int = MAX_CONTROL_REQUEST_BYTES
    #: a push changing more of the clean reserve's predictions than this share is refused unless forced
    max_clean_change: float = MAX_CLEAN_CHANGE


#: how ``fire_ensemble`` runs the network (see docs/architecture.md):
#: fused -- one Python model runs the whole network, repairing in-process at each configured layer (one hop);
#: inline -- ensemble of a head that repairs in-process and a tail (the undefended split's hops);
#: separate -- ensemble of head -> repair -> tail (the repair scales on its own; one repair layer).
LAYOUTS = ("fused", "inline", "separate")
DEFAULT_LAYOUT = "fused"
#: the layout of a repository whose settings name none (written before layouts existed)
LEGACY_LAYOUT = "separate"


@dataclass(frozen=True)
class ServingSettings:
    """What the stages need to know about the model and its repair (written once, read by every stage).

    ``layer`` is the split layer: the deepest repaired layer, where the head ends in ``inline`` and ``separate``
    and where today's store versions apply their directions. ``repair_layers`` are every layer the network repairs
    at, in stage order (``layer`` last); ``layer_shapes`` their per-sample latent shapes.
    """

    layer: str
    input_shape: tuple[int, int, int]
    latent_shape: tuple[int, ...]
    num_classes: int
    arch: str
    attack: str = ""
    target: int = -1
    dataset: str = ""
    default_alpha: float = 1.0
    default_threshold: float = 0.5
    estimator: str = "unpaired"
    publish_every: int = 1
    #: how ``observe`` estimates a repository with several repair layers (fire_backend.multilayer): ``independent``
    #: (every layer from unrepaired latents, the measured default) or ``ordered`` (deeper layers on latents repaired
    #: upstream); the Welch z-score filter (0, the default: the plain shift; fire_backend.fire.UnpairedOptions says
    #: why) and the non-target clean reference
    estimation: str = "independent"
    estimation_z: float = 0.0
    nontarget_reference: bool = True
    limits: Limits = field(default_factory=Limits)
    layout: str = LEGACY_LAYOUT
    repair_layers: tuple[str, ...] = ()
    layer_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: whether ``fire_bypass`` may be honoured at all (it also needs a credential signed with the control token)
    allow_bypass: bool = False
    #: the largest batch a stage runs (the control stage computes observed latents in chunks of it)
    max_batch_size: int = 64
    #: the options the repository was built with (``fire bench`` rebuilds the same configuration from them)
    build: dict = field(default_factory=dict)

    #: the defender's reserve the centroid and flagged samples came from (fire_backend.defaults.reserve_indices):
    #: a served check evaluates on the other test images, drawn by the same rule
    reserve_size: int = RESERVE
    reserve_seed: int = RESERVE_SEED
    #: the direction store's URL (fire_backend.stores.backends); empty: the file store in ``artifacts/store``
    store: str = ""
    #: how many of the newest committed versions keep their payload file in a file store (compaction)
    retain_versions: int = RETAIN_VERSIONS
    #: why the network cannot be cut at ``layer`` (empty: it can, or it was not asked): then only the fused layout
    #: and the monolithic baseline serve it
    cut_reason: str = ""

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {self.layout!r}")
        layers = tuple(self.repair_layers) or (self.layer,)
        if layers[-1] != self.layer:
            raise ValueError(f"the split layer {self.layer!r} must be the deepest repaired layer ({layers[-1]!r})")
        shapes = {name: tuple(int(v) for v in shape) for name, shape in self.layer_shapes.items()}
        shapes.setdefault(self.layer, tuple(self.latent_shape))
        missing = [name for name in layers if name not in shapes]
        if missing:
            raise ValueError(f"no latent shape for repaired layers {', '.join(missing)}")
        object.__setattr__(self, "repair_layers", layers)
        object.__setattr__(self, "layer_shapes", shapes)

    @property
    def latent_dim(self) -> int:
        return self.layer_dims[self.layer]

    @property
    def layer_dims(self) -> dict[str, int]:
        """Flattened latent size per repaired layer."""
        return {name: math.prod(self.layer_shapes[name]) for name in self.repair_layers}

    def write(self, directory: Path) -> None:
        (directory / SETTINGS_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> ServingSettings:
        """The settings in ``directory``; also those of a repository built before layouts existed (``separate``)."""
        data = json.loads((directory / SETTINGS_FILE).read_text())
        data["input_shape"] = tuple(data["input_shape"])
        data["latent_shape"] = tuple(data["latent_shape"])
        data["repair_layers"] = tuple(data.get("repair_layers", ()))
        data["limits"] = Limits(**data.get("limits", {}))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{directory / SETTINGS_FILE}: unknown settings {', '.join(unknown)}: written by a newer "
                             "fire-backend? rebuild the repository with `fire repo build`")
        return cls(**data)


def models_dir(repository: Path) -> Path:
    """Where tritonserver finds the models of ``repository``."""
    return Path(repository) / MODELS_DIR


def old_layout_error(repository: Path) -> str | None:
    """The message for a repository written before models moved under ``models/`` (None if it is not one)."""
    repository = Path(repository)
    if models_dir(repository).is_dir() or not any(repository.glob("*/config.pbtxt")):
        return None
    return (f"{repository}: models sit at the repository root, an older layout that tritonserver's poll mode "
            f"cannot serve; rebuild it with `fire repo build --out {repository}` (models go to {MODELS_DIR}/, "
            f"beside {ARTIFACTS_DIR}/)")


def is_fire_repository(repository: Path) -> bool:
    return (models_dir(repository) / FIRE_ENSEMBLE / "config.pbtxt").is_file()


def require_fire_repository(repository: Path) -> Path:
    """``repository`` if it is one ``fire repo build`` wrote; else a ValueError naming the fix."""
    if not is_fire_repository(repository):
        raise ValueError(old_layout_error(repository)
                         or f"{repository}: not a FIRE model repository (build one with `fire repo build`)")
    return repository


def resolve_artifacts(model_repository: str, configured: str) -> Path:
    """A stage's ``artifacts_dir`` parameter; relative paths are taken from the repository root.

    ``model_repository`` is what Triton passes a stage: its model directory, ``<repo>/models/<model>``.
    """
    path = Path(configured).expanduser()
    if not path.is_absolute():
        path = Path(model_repository).resolve().parent.parent / path
    if not (path / SETTINGS_FILE).is_file():
        raise FileNotFoundError(f"{path}: no {SETTINGS_FILE}; build the repository with `fire repo build`")
    return path


def repository_store(artifacts: Path, settings: ServingSettings,
                     on_damage: DamageListener | None = None) -> StoreBackend:
    """The direction store a repository's stages and control endpoint share: ``$FIRE_STORE_URL`` (``fire serve
    --store``) if set, else the one it was built with (``fire repo build --store``), else ``artifacts/store``.
    ``on_damage`` hears of the damage it meets (a stage's metrics). Every version read or committed through it is
    checked against the repository's network (layer names, latent sizes, bounds); the repair instances record what
    they apply in ``artifacts/instances``, beside the store rather than in it."""
    from fire_backend.stores.backends import STORE_URL_ENV, open_store
    from fire_backend.stores.format import fits_network

    limits = settings.limits
    fits = fits_network(settings.layer_dims, settings.layer, limits.max_direction_norm, limits.max_alpha,
                        limits.max_directions)
    return open_store(os.environ.get(STORE_URL_ENV) or settings.store, artifacts / STORE_DIR, on_damage, fits=fits,
                      registry_dir=artifacts / INSTANCES_DIR, retain=settings.retain_versions)


def save_centroid(artifacts: Path, center: np.ndarray, count: int) -> None:
    np.savez(artifacts / CENTROID_FILE, center=np.asarray(center, dtype=np.float32), count=np.array(count))


def save_reserve(artifacts: Path, clean: np.ndarray) -> None:
    np.savez(artifacts / RESERVE_FILE, clean=np.asarray(clean, dtype=np.uint8))


def load_reserve(artifacts: Path) -> np.ndarray:
    """The clean reserve images (uint8 N x H x W x C) a repository was built with."""
    path = artifacts / RESERVE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; rebuild the repository with `fire repo build`")
    with np.load(path) as data:
        return data["clean"].copy()


def load_centroid(artifacts: Path) -> tuple[np.ndarray, int]:
    """The clean centroid (float32, flattened latent) and how many clean samples it averages."""
    with np.load(artifacts / CENTROID_FILE) as data:
        return data["center"].copy(), int(data["count"])
