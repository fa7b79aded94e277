"""Candidate layers of a network, by module path: what they are, which are its stages, and the errors that name them.

Shared by the two ways a network is read, a probe of an ``nn.Module`` (:mod:`.network`) and an exported
graph (:mod:`fire_backend.models.split`), so both name, classify and order layers by one rule. See
:mod:`fire_backend.models.network` for what a candidate layer and a stage are.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: module types that only hold others in order (their children are walked through, not a block of their own, when
#: they hold more than one weight layer)
SEQUENCE_TYPES = ("Sequential", "ModuleList", "ModuleDict")
#: preference among names of one latent: a block, then a single layer, then a sequence (which is walked through, so
#: its last layer is the stage: VGG's features.52 rather than features)
KIND_ORDER = {"block": 0, "leaf": 1, "sequence": 2}


class LayerError(ValueError):
    """A layer name the network has no candidate for (the message lists the near matches)."""


class CutError(ValueError):
    """The network cannot be cut in two at this layer (the message says why); the fused layout still serves it."""


@dataclass(frozen=True)
class Layer:
    """A candidate layer: module path, per-sample output shape, and where it sits in the network."""

    name: str
    shape: tuple[int, ...]
    module_type: str
    #: "block" (a module with submodules, or a sequence with at most one weight layer), "sequence" (a sequence of
    #: several weight layers or blocks), or "leaf" (one layer)
    kind: str
    #: one of the network's stages (the block-level view; see the module docstring)
    stage: bool
    #: the preferred name of the same latent, when this name is an alias of it ("" otherwise)
    alias_of: str = ""

    @property
    def dim(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def spatial(self) -> int | None:
        """H x W of a C x H x W latent, else None."""
        return self.shape[1] * self.shape[2] if len(self.shape) == 3 else None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "type": self.module_type, "kind": self.kind,
                "stage": self.stage, "alias_of": self.alias_of}


@dataclass(frozen=True)
class ModuleInfo:
    """What the stage rule needs to know of one module of the network."""

    type_name: str
    leaf: bool
    #: convolution and linear layers in it (itself included)
    weights: int


@dataclass(frozen=True)
class RawCandidate:
    """A module output found by a probe or in a graph, before names are classified (``group``: same latent)."""

    name: str
    shape: tuple[int, ...]
    group: int


def module_kind(info: ModuleInfo) -> str:
    if info.leaf:
        return "leaf"
    sequence = info.type_name.rsplit(".", 1)[-1] in SEQUENCE_TYPES
    return "sequence" if sequence and info.weights > 1 else "block"


def classify(raw: Sequence[RawCandidate], modules: Mapping[str, ModuleInfo]) -> tuple[Layer, ...]:
    """Layers with their kinds, aliases and stages from the raw candidates (in execution order)."""
    def kind(name: str) -> str:
        return module_kind(modules[name])

    preferred: dict[int, str] = {}
    for candidate in raw:  # per latent: a block, then a leaf, then a sequence; then the outermost; then the first
        best = preferred.get(candidate.group)
        key = (KIND_ORDER[kind(candidate.name)], candidate.name.count("."))
        if best is None or key < (KIND_ORDER[kind(best)], best.count(".")):
            preferred[candidate.group] = candidate.name
    blocks = {preferred[c.group] for c in raw if preferred[c.group] == c.name and kind(c.name) == "block"}

    def inside_block(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in blocks for i in range(1, len(parts)))

    layers = []
    for c in raw:
        main = preferred[c.group]
        stage = main == c.name and kind(c.name) != "sequence" and not inside_block(c.name)
        layers.append(Layer(c.name, c.shape, modules[c.name].type_name.rsplit(".", 1)[-1], kind(c.name), stage,
                            "" if main == c.name else main))
    return tuple(layers)


def near(name: str, names: Iterable[str], n: int = 5) -> list[str]:
    """The names closest to ``name`` (difflib), for error messages."""
    names = list(names)
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.5)
    if not close:  # a prefix typed short of a path ("layer3" for "layer3.0") is still a near match
        close = [candidate for candidate in names if candidate.startswith(name)][:n]
    return close
