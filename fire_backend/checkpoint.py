"""A trained classifier on disk: ``model.pt`` (weights) + ``meta.json`` (how it was made, CA, ASR).

The directory is what ``fire eval``, ``fire sweep``, ``fire data export`` and ``fire repo build``
take; the metadata names the data set and attack so the same trigger is re-created everywhere.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fire_backend.split import ModelSpec

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

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["spec"] = self.spec.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointMeta:
        fields = dict(data)
        fields["spec"] = ModelSpec.from_dict(fields["spec"])
        return cls(**fields)


def save_checkpoint(directory: Path, model: nn.Module, meta: CheckpointMeta) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, directory / MODEL_FILE)
    (directory / META_FILE).write_text(json.dumps(meta.to_dict(), indent=2) + "\n")


def load_checkpoint(directory: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, CheckpointMeta]:
    """The model in eval mode and its metadata; only tensors are unpickled (weights_only)."""
    meta_path, model_path = directory / META_FILE, directory / MODEL_FILE
    if not meta_path.is_file() or not model_path.is_file():
        raise FileNotFoundError(f"{directory}: not a checkpoint (needs {MODEL_FILE} and {META_FILE}; see `fire train`)")
    meta = CheckpointMeta.from_dict(json.loads(meta_path.read_text()))
    model = meta.spec.build()
    model.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
    return model.to(device).eval(), meta
