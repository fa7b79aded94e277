"""Train a backdoored classifier (the attacker's side) for demos, tests and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fire_backend.checkpoint import CheckpointMeta, save_checkpoint
from fire_backend.data import load_dataset, resolve_attack, to_tensor
from fire_backend.defaults import stratified_order
from fire_backend.device import check_batch_size, resolve_device
from fire_backend.evaluation import attack_metrics
from fire_backend.models.spec import MODULE_ARCH, ModelSpec, place_source, user_spec
from fire_backend.models.user import check_classifier, parse_factory


@dataclass(frozen=True)
class TrainConfig:
    data: str = "digits"
    attack: str = "badnets"
    target: int = 0
    poison_rate: float = 0.1
    seed: int = 0
    epochs: int | None = None  # None: a default per architecture
    batch_size: int = 64
    lr: float = 2e-3
    arch: str | None = None  # None: digits_cnn for 1-channel data, preact_resnet18 otherwise
    module: str | None = None  # FILE.py:FACTORY: the user's own network instead of a built-in one
    kwargs: dict | None = None  # the factory's arguments (with module)
    width: int | None = None
    train_subset: int | None = None  # train on a seeded, class-stratified draw of N training images (CPU budgets)
    augment: bool = False  # random crop + flip per image (the usual CIFAR recipe for long GPU runs)
    device: str = "auto"  # auto: CUDA when torch sees a GPU, else the CPU (fire_backend.device)


def default_spec(config: TrainConfig, input_shape: tuple[int, int, int], num_classes: int) -> ModelSpec:
    if config.module:
        path, factory = parse_factory(config.module)
        return user_spec(MODULE_ARCH, path, input_shape, num_classes, factory, config.kwargs)
    arch = config.arch or ("digits_cnn" if input_shape[0] == 1 and input_shape[1] <= 16 else "preact_resnet18")
    kwargs: dict = {"num_classes": num_classes}
    if arch == "digits_cnn":
        kwargs.update(in_channels=input_shape[0], width=config.width or 32)
    else:
        kwargs.update(in_channels=input_shape[0], width=config.width or 64)
    return ModelSpec(arch, kwargs, input_shape)


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The standard CIFAR augmentation, per image: a random crop of the zero-padded image, then a coin-flip mirror."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    top = torch.randint(0, 2 * pad + 1, (n, 1, 1, 1), generator=generator)
    left = torch.randint(0, 2 * pad + 1, (n, 1, 1, 1), generator=generator)
    rows = top + torch.arange(h).view(1, 1, h, 1)
    cols = left + torch.arange(w).view(1, 1, 1, w)
    out = padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def poison_training_set(
    x: torch.Tensor, y: torch.Tensor, config: TrainConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace a poison_rate fraction of non-target samples by triggered copies labelled target."""
    attack = resolve_attack(config.attack)
    candidates = torch.nonzero(y != config.target).flatten()
    count = int(round(config.poison_rate * len(x)))
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
    x, y = x.clone(), y.clone()
    x[chosen] = attack(x[chosen])
    y[chosen] = config.target
    return x, y


def train_backdoored(config: TrainConfig, out: Path, progress: bool = True) -> CheckpointMeta:
    device = resolve_device(config.device)
    check_batch_size(config.batch_size)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    data = load_dataset(config.data)
    x_np, y_np = data.x_train, data.y_train
    if config.train_subset:  # a sample of every class, also from a file stored class by class
        subset = stratified_order(y_np, config.seed)[: config.train_subset]
        x_np, y_np = x_np[subset], y_np[subset]
    x, y = to_tensor(x_np), torch.from_numpy(np.asarray(y_np, dtype=np.int64))
    x, y = poison_training_set(x, y, config, generator)
    spec = default_spec(config, data.input_shape, data.num_classes)
    if spec.user:  # the user's file goes into the checkpoint, and the network is built from that copy
        place_source(spec, parse_factory(str(config.module))[0], out)
        model = spec.build(out)
        check_classifier(model.eval(), spec.input_shape, spec.classes)
    else:
        model = spec.build()
    model = model.to(device)
    epochs = config.epochs or (40 if spec.arch == "digits_cnn" else 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + config.batch_size - 1) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps)
    model.train()
    bar = tqdm(total=steps, desc=f"train {spec.arch} ({config.attack})", disable=not progress, unit="step")
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), config.batch_size):
            index = order[start : start + config.batch_size]
            batch = random_crop_flip(x[index], generator) if config.augment else x[index]
            loss = F.cross_entropy(model(batch.to(device)), y[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    x_test, y_test = to_tensor(data.x_test), torch.from_numpy(data.y_test.astype(np.int64))
    metrics, _ = attack_metrics(model, x_test, y_test, resolve_attack(config.attack), config.target)
    meta = CheckpointMeta(
        spec=spec,
        dataset=config.data,
        attack=config.attack,
        target=config.target,
        poison_rate=config.poison_rate,
        seed=config.seed,
        ca=metrics.ca,
        asr=metrics.asr,
        extra={"epochs": epochs, "train_subset": config.train_subset, **({"augment": True} if config.augment else {})},
    )
    save_checkpoint(out, model, meta, source_dir=out)
    return meta
