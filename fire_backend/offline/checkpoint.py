"""A trained classifier on disk: ``meta.json`` (how it was made, CA, ASR) + ``model.pt`` (its state dict), and for a
user network its own file (``network.py`` or ``network.pt2``, which carries its weights; see
:mod:`fire_backend.models.spec`).

The directory is what ``fire eval``, ``fire sweep``, ``fire data export``, ``fire repo build``, ``fire bench`` and
``fire import backdoorbench --measure`` take, whichever way it was made (``fire train``, ``fire import model``,
``fire import backdoorbench``); the metadata names the data set and attack so the same trigger is re-created
everywhere. A checkpoint without an attack (``attack`` empty: ``fire import model`` without ``--attack``) has CA
only: no triggered image can be made from it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fire_backend.models.network import Network
from fire_backend.models.spec import EXPORTED_ARCH, ModelSpec

MODEL_FILE = "model.pt"
META_FILE = "meta.json"


@dataclass
class CheckpointMeta:
    spec: ModelSpec
    dataset: str
    attack: str
    target: int
    poison_rate: float
    seed: int
    ca: float | None = None
    asr: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def has_attack(self) -> bool:
        """Whether the attack is known (a trigger to evaluate PA/ASR and to export flagged images with)."""
        return bool(self.attack)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["spec"] = self.spec.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointMeta:
        fields = dict(data)
        fields["spec"] = ModelSpec.from_dict(fields["spec"])
        return cls(**fields)


def save_checkpoint(directory: Path, model: nn.Module | None, meta: CheckpointMeta,
                    source_dir: Path | None = None) -> None:
    """Write ``meta.json`` and ``model.pt`` (``model``'s state dict; none for an exported program, whose file holds
    its weights), and copy a user network's file from ``source_dir``."""
    directory.mkdir(parents=True, exist_ok=True)
    if meta.spec.user:
        if source_dir is None:
            raise ValueError("a user network's checkpoint needs its file: give the directory that holds it")
        meta.spec.copy_source(source_dir, directory)
    if meta.spec.arch != EXPORTED_ARCH:
        if model is None:
            raise ValueError(f"a {meta.spec.arch} checkpoint needs the model's weights")
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, directory / MODEL_FILE)
    (directory / META_FILE).write_text(json.dumps(meta.to_dict(), indent=2) + "\n")


def read_meta(directory: Path) -> CheckpointMeta:
    """The checkpoint's metadata (nothing is unpickled or run)."""
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory}: not a checkpoint (no {META_FILE}; see `fire train` and `fire import`)")
    try:
        return CheckpointMeta.from_dict(json.loads(meta_path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{meta_path}: not a checkpoint's metadata ({type(exc).__name__}: {exc})") from None


def load_state(directory: Path, meta: CheckpointMeta) -> dict[str, torch.Tensor] | None:
    """The checkpoint's state dict (tensors only: weights_only); None for an exported program."""
    if meta.spec.arch == EXPORTED_ARCH:
        return None
    model_path = directory / MODEL_FILE
    if not model_path.is_file():
        raise FileNotFoundError(f"{directory}: not a checkpoint (needs {MODEL_FILE} and {META_FILE}; see `fire train`)")
    return torch.load(model_path, map_location="cpu", weights_only=True)


def load_checkpoint(directory: Path, device: str | torch.device = "cpu") -> tuple[Network, CheckpointMeta]:
    """The network in eval mode on ``device`` and its metadata. A user network's file is run (module) or unpickled
    (program) after its digest is checked; weights are read as tensors only (weights_only)."""
    meta = read_meta(directory)
    return meta.spec.network(directory, load_state(directory, meta), device), meta
