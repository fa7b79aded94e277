"""Train a backdoored classifier (the attacker's side) for demos, tests and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fire_backend.data import load_dataset, resolve_attack, to_tensor
from fire_backend.defaults import stratified_order
from fire_backend.device import check_batch_size, resolve_device
from fire_backend.models.spec import MODULE_ARCH, ModelSpec, place_source, user_spec
from fire_backend.models.user import check_classifier, parse_factory
from fire_backend.offline.checkpoint import CheckpointMeta, save_checkpoint
from fire_backend.offline.evaluation import attack_metrics
from fire_backend.offline.poisoning import BatchNoise, label_style, poison, poison_for_training


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
    poisoning: str = "auto"  # auto (the attack's own) | dirty-label | clean-label (fire_backend.offline.poisoning)
    also: tuple[tuple[str, int], ...] = ()  # further (attack, target) pairs poisoned into the same model
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
    """Trigger a poison_rate fraction of the training set as the attack's label style says (dirty-label: non-target
    images relabelled target; clean-label: target-class images, labels kept; :mod:`fire_backend.offline.poisoning`)."""
    style = label_style(config.attack, config.poisoning)
    x, y, _ = poison(x, y, resolve_attack(config.attack), config.target, config.poison_rate, style, generator)
    return x, y


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, config: TrainConfig,
        generator: torch.Generator, device: torch.device, progress: bool, desc: str,
        noise: BatchNoise | None = None, poisoned: torch.Tensor | None = None) -> None:
    """Adam with a one-cycle schedule over ``epochs`` shuffled passes; ``noise`` transforms some unpoisoned images
    of each batch (an attack's noise or cross mode, :mod:`fire_backend.offline.poisoning`)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + config.batch_size - 1) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps)
    model.train()
    bar = tqdm(total=steps, desc=desc, disable=not progress, unit="step")
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), config.batch_size):
            index = order[start : start + config.batch_size]
            batch = x[index] if noise is None else noise(x[index], poisoned[index], generator)
            batch = random_crop_flip(batch, generator) if config.augment else batch
            loss = F.cross_entropy(model(batch.to(device)), y[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()


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
    spec = default_spec(config, data.input_shape, data.num_classes)
    if spec.user:  # the user's file goes into the checkpoint, and the network is built from that copy
        place_source(spec, parse_factory(str(config.module))[0], out)

    def build() -> nn.Module:
        """A fresh, untrained network of ``spec`` on the device (a user's: from the checkpoint's copy, checked)."""
        if not spec.user:
            return spec.build().to(device)
        model = spec.build(out)
        check_classifier(model.eval(), spec.input_shape, spec.classes)
        return model.to(device)

    epochs = config.epochs or (40 if spec.arch == "digits_cnn" else 10)

    def surrogate(surrogate_epochs: int) -> nn.Module:
        model = build()
        fit(model, x, y, surrogate_epochs, config, generator, device, progress, f"train {spec.arch} (clean surrogate)")
        return model

    poisoned = poison_for_training(x, y, config.attack, config.target, config.poison_rate, config.poisoning,
                                   generator, surrogate, out, max(1, epochs // 2), config.also)
    model = build()
    if poisoned.initial_state is not None:
        model.load_state_dict(poisoned.initial_state)
    fit(model, poisoned.x, poisoned.y, epochs, config, generator, device, progress,
        f"train {spec.arch} ({config.attack})", poisoned.noise, poisoned.poisoned)
    x_test, y_test = to_tensor(data.x_test), torch.from_numpy(data.y_test.astype(np.int64))
    metrics, _ = attack_metrics(model, x_test, y_test, resolve_attack(poisoned.attack), config.target)
    also = [{**entry, "asr": attack_metrics(model, x_test, y_test, resolve_attack(entry["attack"]),
                                            entry["target"])[0].asr} for entry in poisoned.also]
    recipe = {"poisoning": poisoned.style} if poisoned.style != "dirty-label" or config.poisoning != "auto" else {}
    if poisoned.attack != config.attack:
        recipe["attack_family"] = config.attack
    meta = CheckpointMeta(
        spec=spec,
        dataset=config.data,
        attack=poisoned.attack,
        target=config.target,
        poison_rate=config.poison_rate,
        seed=config.seed,
        ca=metrics.ca,
        asr=metrics.asr,
        extra={"epochs": epochs, "train_subset": config.train_subset, **({"augment": True} if config.augment else {}),
               **recipe, **poisoned.notes, **({"also": also} if also else {})},
    )
    save_checkpoint(out, model, meta, source_dir=out)
    return meta
