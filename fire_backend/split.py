"""Cut a staged model into a head (input -> latent) and a tail (latent -> logits) at a named layer.

The halves are what the Triton head and tail stages run; FIRE repairs the latent in between. The cut
is exact because both halves call the very stage modules of the original forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fire_backend.models import build_model

PART_FORMAT = "fire-backend/part/v1"


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model: architecture name, constructor arguments, input shape."""

    arch: str
    kwargs: dict[str, Any]
    input_shape: tuple[int, int, int]  # C, H, W

    def build(self) -> nn.Module:
        return build_model(self.arch, **self.kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "kwargs": dict(self.kwargs), "input_shape": list(self.input_shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(str(data["arch"]), dict(data["kwargs"]), tuple(int(v) for v in data["input_shape"]))


class Part(nn.Module):
    """A contiguous run of a model's stages (a head, a tail, or the whole model)."""

    def __init__(self, model: nn.Module, start: int, stop: int) -> None:
        super().__init__()
        self.model = model
        self._steps = list(model.stages()[start:stop])

    @property
    def layers(self) -> tuple[str, ...]:
        """The names of this part's stages, in order (a hook can sit after any of them)."""
        return tuple(name for name, _ in self._steps)

    def forward(self, x: torch.Tensor, hooks: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None
                ) -> torch.Tensor:
        """Run the stages; ``hooks[name]`` (if any) replaces the latent after stage ``name`` (in-process repair)."""
        if not hooks:
            for _, step in self._steps:
                x = step(x)
            return x
        for name, step in self._steps:
            x = step(x)
            hook = hooks.get(name)
            if hook is not None:
                x = hook(x)
        return x

    def check_hooks(self, layers: Iterable[str]) -> None:
        """ValueError naming the part's layers when a hook could never run here."""
        missing = [layer for layer in layers if layer not in self.layers]
        if missing:
            raise ValueError(f"layers {', '.join(missing)} are not in this part; its layers: {', '.join(self.layers)}")

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the weights this part uses, under the full model's key names."""
        owned = {id(t) for _, step in self._steps for t in (*step.parameters(), *step.buffers())}
        return {k: v for k, v in self.model.state_dict(keep_vars=True).items() if id(v) in owned}


def stage_names(model: nn.Module) -> list[str]:
    if not hasattr(model, "stages"):
        raise TypeError(f"{type(model).__name__} has no stages(); supported models are in fire_backend.models")
    return [name for name, _ in model.stages()]


def candidate_layers(model: nn.Module, input_shape: tuple[int, int, int]) -> list[tuple[str, tuple[int, ...]]]:
    """Layers after which the model can be cut (all but the last stage), with per-sample latent shapes."""
    names = stage_names(model)
    device = next(model.parameters()).device
    x = torch.zeros(1, *input_shape, device=device)
    shapes: list[tuple[str, tuple[int, ...]]] = []
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for name, step in model.stages()[:-1]:
            x = step(x)
            shapes.append((name, tuple(x.shape[1:])))
    model.train(was_training)
    assert len(shapes) == len(names) - 1
    return shapes


def split(model: nn.Module, layer: str) -> tuple[Part, Part]:
    """Head runs up to and including ``layer``; tail runs the rest."""
    names = stage_names(model)
    if layer not in names[:-1]:
        raise ValueError(f"cannot split after {layer!r}; candidate layers: {', '.join(names[:-1])}")
    index = names.index(layer) + 1
    return Part(model, 0, index), Part(model, index, len(names))


def save_part(part: Part, spec: ModelSpec, layer: str, role: str, path: Path) -> None:
    """Write one half as spec + its own weights, loadable without the training code's objects."""
    payload = {
        "format": PART_FORMAT,
        "role": role,
        "layer": layer,
        "spec": spec.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in part.own_state_dict().items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)


def load_part(path: Path, device: str | torch.device = "cpu") -> tuple[Part, dict[str, Any]]:
    """Rebuild a saved head or tail in eval mode on ``device``; returns it with its metadata."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != PART_FORMAT:
        raise ValueError(f"{path}: not a fire-backend model part (format {payload.get('format')!r})")
    spec = ModelSpec.from_dict(payload["spec"])
    model = spec.build()
    role = payload.get("role")
    if role not in ("head", "tail", "full"):
        raise ValueError(f"{path}: unknown part role {role!r}")
    if role == "full":
        part = Part(model, 0, len(stage_names(model)))
    else:
        head, tail = split(model, payload["layer"])
        part = head if role == "head" else tail
    expected = set(part.own_state_dict())
    given = set(payload["state_dict"])
    if expected != given:
        raise ValueError(f"{path}: weights do not match the {payload['role']} of {spec.arch} at {payload['layer']}")
    try:
        model.load_state_dict(payload["state_dict"], strict=False)
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit {spec.arch} {spec.kwargs}: {exc}") from None
    part.to(device).eval()
    meta = {"role": payload["role"], "layer": payload["layer"], "spec": spec}
    return part, meta
