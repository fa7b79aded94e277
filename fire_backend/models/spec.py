"""How to rebuild a network (:class:`ModelSpec`), and the repository's one network file that every stage loads.

A spec names a built-in architecture (``digits_cnn``, ``preact_resnet18``, ``vgg19_bn``, ``mobilenet_v3_large``)
with its constructor arguments, or a user network whose file sits beside the spec: ``module`` (a module file, a
factory in it and its arguments; the weights are a state dict) or ``exported`` (a ``torch.export`` program, weights
included). ``source`` records that file's name and SHA-256, so a checkpoint directory and a repository's
``artifacts/`` are self-contained and run the very file they were built from.

The network file (``artifacts/full.pt``, format ``fire-backend/part/v1``) is the spec, the split layer and the
weights; a repository built before user networks existed has the same file, so it keeps loading.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fire_backend.models import build_model
from fire_backend.models.network import Network
from fire_backend.models.user import (
    MODULE_FILE,
    PROGRAM_FILE,
    UserModelError,
    build_from_file,
    check_sha256,
    file_sha256,
    load_program,
    load_strict,
)

#: the ``arch`` of user networks: a module file with a factory, or a torch.export program
MODULE_ARCH, EXPORTED_ARCH = "module", "exported"
PART_FORMAT = "fire-backend/part/v1"


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a network: architecture, constructor arguments, input shape, and for a user
    network its file (``source``: ``file``, ``sha256``, and ``factory`` for a module) and class count."""

    arch: str
    kwargs: dict[str, Any]
    input_shape: tuple[int, int, int]  # C, H, W
    source: dict[str, str] = field(default_factory=dict)
    num_classes: int | None = None

    @property
    def classes(self) -> int:
        return int(self.num_classes if self.num_classes is not None else self.kwargs.get("num_classes", 10))

    @property
    def user(self) -> bool:
        return self.arch in (MODULE_ARCH, EXPORTED_ARCH)

    @property
    def label(self) -> str:
        """How reports name the network: the architecture, or the user's factory / program file."""
        if self.arch == MODULE_ARCH:
            return f"{self.source.get('factory', 'module')} (module)"
        if self.arch == EXPORTED_ARCH:
            return "torch.export program"
        return self.arch

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"arch": self.arch, "kwargs": dict(self.kwargs), "input_shape": list(self.input_shape)}
        if self.source:
            data["source"] = dict(self.source)
        if self.num_classes is not None:
            data["num_classes"] = self.num_classes
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        classes = data.get("num_classes")
        return cls(str(data["arch"]), dict(data["kwargs"]), tuple(int(v) for v in data["input_shape"]),
                   dict(data.get("source") or {}), None if classes is None else int(classes))

    def source_file(self, directory: Path) -> Path | None:
        return Path(directory) / self.source["file"] if self.user else None

    def build(self, directory: Path | None = None) -> nn.Module:
        """A fresh (untrained) ``nn.Module`` of this spec; a user module's file is read from ``directory``."""
        if self.arch == MODULE_ARCH:
            if directory is None:
                raise ValueError("a user module is rebuilt from its file: give the directory that holds it")
            return build_from_file(Path(directory) / self.source["file"], self.source["factory"], self.kwargs,
                                   self.source.get("sha256"))
        if self.arch == EXPORTED_ARCH:
            raise UserModelError("an exported program has no trainable module: train the nn.Module, then export it")
        return build_model(self.arch, **self.kwargs)

    def network(self, directory: Path | None, state_dict: dict[str, torch.Tensor] | None,
                device: str | torch.device = "cpu") -> Network:
        """The trained network, in eval mode on ``device``: weights from ``state_dict`` (a program carries its own)."""
        if self.arch == EXPORTED_ARCH:
            if directory is None:
                raise ValueError("an exported program is read from its file: give the directory that holds it")
            program = load_program(Path(directory) / self.source["file"], self.source.get("sha256"))
            return Network.from_graph(program.module().to(device), self.input_shape)
        model = self.build(directory)
        load_strict(model, state_dict or {}, "the weights")
        return Network.from_module(model.to(device), self.input_shape)

    def copy_source(self, source_dir: Path, directory: Path) -> None:
        """Put the user network's file (from ``source_dir``) into ``directory``, checked against its digest."""
        if not self.user:
            return
        src, dst = Path(source_dir) / self.source["file"], Path(directory) / self.source["file"]
        check_sha256(src, self.source.get("sha256"))
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)


def user_spec(arch: str, path: Path, input_shape: tuple[int, int, int], classes: int, factory: str | None = None,
              kwargs: dict[str, Any] | None = None) -> ModelSpec:
    """The spec of a user network whose file is ``path`` (``module``: a factory in it and its arguments), recording
    the name the file takes in a checkpoint or repository and its SHA-256."""
    if arch not in (MODULE_ARCH, EXPORTED_ARCH):
        raise ValueError(f"a user network is a {MODULE_ARCH} or an {EXPORTED_ARCH} program, not {arch!r}")
    if not Path(path).is_file():
        raise UserModelError(f"{path}: no such file")
    source = {"file": MODULE_FILE if arch == MODULE_ARCH else PROGRAM_FILE, "sha256": file_sha256(path)}
    if arch == MODULE_ARCH:
        source["factory"] = str(factory)
    return ModelSpec(arch, dict(kwargs or {}), input_shape, source, int(classes))


def place_source(spec: ModelSpec, path: Path, directory: Path) -> None:
    """Copy the user's file ``path`` into ``directory`` under the name ``spec`` gives it."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    check_sha256(path, spec.source.get("sha256"))
    target = Path(directory) / spec.source["file"]
    if Path(path).resolve() != target.resolve():
        shutil.copyfile(path, target)


def save_network_file(path: Path, spec: ModelSpec, layer: str, state_dict: dict[str, torch.Tensor],
                      source_dir: Path | None = None) -> None:
    """Write the repository's network file (spec, split layer, weights), and the user network's file beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if spec.user:
        if source_dir is None:
            raise ValueError("a user network's file must come with it: give the directory that holds it")
        spec.copy_source(source_dir, path.parent)
    payload = {"format": PART_FORMAT, "role": "full", "layer": layer, "spec": spec.to_dict(),
               "state_dict": {} if spec.arch == EXPORTED_ARCH else
               {k: v.detach().cpu() for k, v in state_dict.items()}}
    torch.save(payload, path)


def _payload(path: Path) -> dict[str, Any]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != PART_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path}: not a fire-backend network file (format {found!r})")
    if payload.get("role") != "full":
        raise ValueError(f"{path}: a {payload.get('role')!r} part of an old layout; rebuild with `fire repo build`")
    return payload


def load_network_spec(path: Path) -> tuple[ModelSpec, str]:
    """The spec and split layer of a repository's network file (tensors only are unpickled; nothing is run)."""
    payload = _payload(path)
    return ModelSpec.from_dict(payload["spec"]), str(payload["layer"])


def load_network_file(path: Path, device: str | torch.device = "cpu") -> tuple[Network, ModelSpec, str]:
    """The network of a repository's network file, in eval mode on ``device``, with its spec and split layer."""
    payload = _payload(path)
    spec = ModelSpec.from_dict(payload["spec"])
    try:
        network = spec.network(path.parent, payload["state_dict"], device)
    except UserModelError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return network, spec, str(payload["layer"])
