"""``fire import model``: a user's own network (a module file and a state dict, or a ``torch.export`` program) as a
checkpoint directory that every ``--checkpoint`` command takes, and its candidate layers.

The checkpoint holds the network's file (``network.py`` or ``network.pt2``, with its SHA-256 in ``meta.json``), the
state dict (``model.pt``, a module's), the data set and, where the user knows it, the attack and its target (then
``fire eval`` reports CA/PA/ASR; without, CA only). Nothing downstream knows where a checkpoint came from.

Importing runs the module file (or unpickles the program): see :mod:`fire_backend.models.user`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fire_backend.data import load_dataset, resolve_attack, to_tensor
from fire_backend.device import DEFAULT_BATCH_SIZE, check_batch_size, resolve_device
from fire_backend.models.layers import CutError, Layer
from fire_backend.models.network import Network
from fire_backend.models.spec import EXPORTED_ARCH, MODULE_ARCH, ModelSpec, place_source, user_spec
from fire_backend.models.user import (
    UserModelError,
    build_from_file,
    check_classifier,
    load_program,
    load_strict,
    parse_factory,
    program_input_shape,
    read_state_dict,
)
from fire_backend.multilayer import default_layers
from fire_backend.offline.checkpoint import CheckpointMeta, save_checkpoint


@dataclass(frozen=True)
class UserNetwork:
    """What the user brings: ``module`` (``FILE.py:FACTORY``) with ``weights`` and ``kwargs``, or ``exported``."""

    module: str | None = None
    weights: Path | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    exported: Path | None = None

    def __post_init__(self) -> None:
        if (self.module is None) == (self.exported is None):
            raise UserModelError("give the network one way: --module FILE.py:FACTORY --weights STATE_DICT.pt, or "
                                 "--exported FILE.pt2")
        if self.module is not None and self.weights is None:
            raise UserModelError("--module needs --weights STATE_DICT.pt (torch.save(model.state_dict(), PATH))")
        if self.exported is not None and (self.weights is not None or self.kwargs):
            raise UserModelError("--exported FILE.pt2 carries its weights and arguments: no --weights or --kwargs")

    @property
    def file(self) -> Path:
        return parse_factory(self.module)[0] if self.module else Path(str(self.exported))


def load_user_network(source: UserNetwork, input_shape: tuple[int, int, int] | None, classes: int,
                      device: str | torch.device = "cpu") -> tuple[Network, ModelSpec]:
    """The user's network in eval mode on ``device``, checked (strict weights; [N, classes] logits for batches of 1
    and 3), and its spec; ``input_shape`` may be left out for a program (it records its own)."""
    if source.exported is not None:
        program = load_program(source.exported)
        recorded = program_input_shape(program)
        if input_shape is not None and tuple(input_shape) != recorded:
            raise UserModelError(f"--input-shape {','.join(map(str, input_shape))}: the program was exported for "
                                 f"{','.join(map(str, recorded))}")
        shape = tuple(int(v) for v in recorded)
        if len(shape) != 3:
            raise UserModelError(f"{source.exported}: exported for per-sample input {list(shape)}; FIRE serves "
                                 "images (C, H, W)")
        spec = user_spec(EXPORTED_ARCH, source.exported, shape, classes)
        net = Network.from_graph(program.module().to(device), shape)
    else:
        if input_shape is None:
            raise UserModelError("--input-shape C,H,W is needed for a module (or --data, whose images it takes)")
        path, factory = parse_factory(str(source.module))
        spec = user_spec(MODULE_ARCH, path, tuple(input_shape), classes, factory, source.kwargs)
        model = build_from_file(path, factory, source.kwargs, spec.source["sha256"])
        load_strict(model, read_state_dict(Path(str(source.weights))), f"--weights {source.weights}")
        net = Network.from_module(model.to(device), spec.input_shape)
    check_classifier(net, spec.input_shape, classes, device)
    if not net.candidates():
        raise UserModelError("the network has no candidate layer (no module called once per forward that returns "
                             "one tensor with the batch dimension first): FIRE has nowhere to repair it")
    return net, spec


@dataclass(frozen=True)
class LayerRow:
    """One candidate layer as ``--list-layers`` shows it: the layer, whether it is in the default pair, and (for
    stages) why the network cannot be cut there ("" where it can)."""

    layer: Layer
    default: str  # "early", "deep" or ""
    cut: str | None  # None: not checked (not a stage)

    def to_dict(self) -> dict[str, Any]:
        return {**self.layer.to_dict(), "default": self.default, "cut_reason": self.cut}


def layer_rows(net: Network) -> list[LayerRow]:
    """Every candidate layer in execution order, with the default pair and where the layouts that cut can serve."""
    pair = default_layers(net.stages())
    roles = {pair[0]: "early", pair[-1]: "deep"} if len(pair) > 1 else {pair[0]: "deep"}
    rows = []
    for layer in net.candidates():
        reason = None
        if layer.stage:
            try:
                net.cut(layer.name)
                reason = ""
            except CutError as exc:
                reason = str(exc)
        rows.append(LayerRow(layer, roles.get(layer.name, ""), reason))
    return rows


@dataclass
class ImportReport:
    meta: CheckpointMeta
    default_layers: tuple[str, ...]
    excluded: int | None = None  # with measure and an attack: non-target images the attack leaves unchanged


def import_model(source: UserNetwork, out: Path, data: str, input_shape: Sequence[int] | None = None,
                 classes: int | None = None, attack: str | None = None, target: int | None = None,
                 measure: bool = False, device: str = "auto", batch_size: int = DEFAULT_BATCH_SIZE) -> ImportReport:
    """Write a checkpoint directory for the user's network on the data set ``data`` (``digits``,
    ``cifar10:PATH``, ``npz:PATH``: its test split gives the defender's reserve and the evaluation images).
    ``attack``/``target`` name the backdoor where it is known; ``measure`` computes CA (and ASR) over the whole test
    split now on ``device``."""
    compute, batch_size = resolve_device(device), check_batch_size(batch_size)
    dataset = load_dataset(data)
    shape = tuple(int(v) for v in input_shape) if input_shape is not None else None
    if shape is None and source.module is not None:
        shape = dataset.input_shape
    n_classes = int(classes) if classes is not None else dataset.num_classes
    if attack is not None:
        resolve_attack(attack)  # a bad name fails before anything is written
        if target is None:
            raise ValueError("--attack needs --target (the label the trigger flips to)")
        if not 0 <= target < n_classes:
            raise ValueError(f"--target {target} is not one of the {n_classes} classes")
    elif target is not None:
        raise ValueError("--target goes with --attack")
    net, spec = load_user_network(source, shape, n_classes, compute if measure else "cpu")
    if dataset.input_shape != spec.input_shape:
        raise ValueError(f"{data}: images are {list(dataset.input_shape)} (C, H, W), the network takes "
                         f"{list(spec.input_shape)}")
    if dataset.num_classes > n_classes:
        raise ValueError(f"{data} has {dataset.num_classes} classes, the network {n_classes}")
    extra: dict[str, Any] = {"source": "import model", "file": str(source.file.resolve())}
    if source.weights is not None:
        extra["weights"] = str(Path(source.weights).resolve())
    meta = CheckpointMeta(spec=spec, dataset=data, attack=attack or "", target=-1 if target is None else int(target),
                          poison_rate=0.0, seed=0, extra=extra)
    excluded = None
    if measure:
        from fire_backend.offline.evaluation import attack_metrics, predict

        x = to_tensor(dataset.x_test)
        y = torch.from_numpy(dataset.y_test.astype(np.int64))
        if attack is not None:
            metrics, excluded = attack_metrics(net, x, y, resolve_attack(attack), meta.target, batch_size,
                                               exclude_unchanged=True)
            meta.ca, meta.asr = metrics.ca, metrics.asr
        else:
            meta.ca = float((predict(net, x, batch_size) == y).float().mean())
        meta.extra["measured"] = {"images": len(y), "excluded": excluded}
    out.mkdir(parents=True, exist_ok=True)
    place_source(spec, source.file, out)
    save_checkpoint(out, None if spec.arch == EXPORTED_ARCH else net.model, meta, source_dir=out)
    return ImportReport(meta, default_layers(net.stages()), excluded)
