"""The attacker's training-set poisoning (``fire train``): which images carry a trigger, with what label, and the
training-time parts some attacks need beyond their trigger function.

Two label styles, as the attacks' papers describe them:

- ``dirty-label`` (BadNets, Blended, WaNet, input-aware, LF, TrojanNN): a ``poison_rate`` fraction of the training
  set, drawn from the images whose class is not the target, gets the trigger and the target label;
- ``clean-label`` (SIG, label-consistent): the trigger goes onto target-class training images only and every label
  stays true; ``poison_rate`` is still a fraction of the whole training set (BackdoorBench's ``pratio``), capped at
  the target class's size.

``auto`` picks the attack's own style (:data:`CLEAN_LABEL_ATTACKS`); naming a style overrides it: ``--attack sig
--poisoning dirty-label`` is the poison-label SIG that ``fire train`` ran before it followed the paper (kept because
it is a stronger SIG backdoor on a short CPU training, and the setting earlier results were measured on).

What the attacks add to their trigger (each from its paper's description):

- WaNet's noise mode: in every batch, ``2 x poison_rate`` of the unpoisoned images get the warp plus random jitter
  and keep their label (BackdoorBench's cross ratio 2), so the network learns the exact warp;
- input-aware's cross-trigger mode: ``poison_rate`` of each batch's unpoisoned images carry another image's trigger
  and keep their label, so only an image's own trigger fires;
- label-consistent: the target-class images first get an untargeted PGD perturbation (L-inf 16/255, 10 steps)
  against a clean surrogate model, so that the network must lean on the trigger to classify them;
- TrojanNN (``trojannn``): a patch optimised on a clean surrogate model to excite the internal neuron with the
  strongest incoming weights, saved as ``trigger.npz`` beside the checkpoint (the checkpoint's attack is then
  ``trigger:PATH``), and the surrogate retrained on the poisoned set (the paper retrains the pre-trained model).

Several attacks with their own targets in one model (``also``): each gets its own disjoint rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fire_backend.data.attacks import Attack, resolve_attack
from fire_backend.data.trigger_file import TRIGGER_PREFIX, write_trigger
from fire_backend.data.triggers import input_aware_cross, wanet_noise
from fire_backend.defaults import POISONINGS
from fire_backend.models.network import Network

#: attacks whose papers poison without touching a label
CLEAN_LABEL_ATTACKS = frozenset({"sig", "label_consistent"})
#: attacks that are a training recipe producing their trigger, not a trigger function
RECIPES = frozenset({"trojannn"})
#: label-consistent's adversarial perturbation (Turner et al. found 16/255 the more effective of their budgets)
LC_EPSILON, LC_STEPS, LC_STEP = 16 / 255, 10, 4 / 255
#: TrojanNN: the patch's side as a share of the image side, and the optimisation's steps and learning rate
TROJAN_SIDE, TROJAN_STEPS, TROJAN_LR = 0.2, 200, 0.1
TRIGGER_FILE = "trigger.npz"

#: a per-batch transform of some unpoisoned training images (their labels kept): images, which rows are poisoned
BatchNoise = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]
#: trains a fresh clean model of the checkpoint's architecture for the given epochs (the attacker's surrogate)
Surrogate = Callable[[int], nn.Module]


def attack_family(attack: str) -> str:
    """The built-in attack a name stands for, without its parameters (``blended(ratio=0.05)`` -> ``blended``)."""
    return attack.split("(", 1)[0].strip()


def label_style(attack: str, poisoning: str = "auto") -> str:
    """``dirty-label`` or ``clean-label``: ``poisoning`` unless it is ``auto``, then the attack's own style."""
    if poisoning not in POISONINGS:
        raise ValueError(f"poisoning must be one of {', '.join(POISONINGS)}, not {poisoning!r}")
    if poisoning != "auto":
        return poisoning
    return "clean-label" if attack_family(attack) in CLEAN_LABEL_ATTACKS else "dirty-label"


def poisoned_rows(y: torch.Tensor, target: int, rate: float, style: str, generator: torch.Generator,
                  taken: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of the training images that get the trigger: a seeded draw of ``round(rate x len(y))`` among the
    non-target images (dirty-label) or the target-class ones (clean-label; at most all of them), never one of
    ``taken``."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"the poison rate must be in (0, 1), got {rate}")
    eligible = (y == target) if style == "clean-label" else (y != target)
    if taken is not None:
        eligible[taken] = False
    pool = torch.nonzero(eligible).flatten()
    if len(pool) == 0:
        kind = "target-class" if style == "clean-label" else "non-target"
        raise ValueError(f"no training image to poison: no free {kind} image (target {target})")
    count = min(int(round(rate * len(y))), len(pool))
    return pool[torch.randperm(len(pool), generator=generator)[:count]]


def poison(x: torch.Tensor, y: torch.Tensor, attack: Attack, target: int, rate: float, style: str,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copies of ``x``/``y`` with the chosen rows triggered (and relabelled ``target`` when dirty-label), and the
    rows."""
    rows = poisoned_rows(y, target, rate, style, generator)
    x, y = x.clone(), y.clone()
    x[rows] = attack(x[rows])
    if style == "dirty-label":
        y[rows] = target
    return x, y, rows


@dataclass
class PoisonedSet:
    """The poisoned training set and what training needs beside it."""

    x: torch.Tensor
    y: torch.Tensor
    poisoned: torch.Tensor  # bool per row: carries a trigger
    attack: str  # the trigger a checkpoint records for the first attack (TrojanNN: trigger:PATH)
    style: str
    noise: BatchNoise | None = None
    initial_state: dict[str, torch.Tensor] | None = None  # start training here (TrojanNN retrains its surrogate)
    also: list[dict] = field(default_factory=list)  # the further attacks: {"attack", "target"}
    notes: dict = field(default_factory=dict)  # what the recipe did, for the checkpoint's metadata


def _noise_share(noise: Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor], share: float
                 ) -> BatchNoise:
    """A :data:`BatchNoise` applying ``noise(images, batch, generator)`` to about ``share`` of each batch's
    unpoisoned rows."""
    def apply(batch: torch.Tensor, poisoned: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        chosen = (~poisoned) & (torch.rand(len(batch), generator=generator) < share)
        if not bool(chosen.any()):
            return batch
        out = batch.clone()
        out[chosen] = noise(batch[chosen], batch, generator)
        return out
    return apply


def _wanet_noise(attack: str, rate: float) -> BatchNoise:
    params = resolve_attack(attack)
    keywords = getattr(params, "keywords", {})
    return _noise_share(lambda images, _, g: wanet_noise(images, g, **keywords), min(1.0, 2 * rate))


def _input_aware_cross(attack: str, rate: float) -> BatchNoise:
    keywords = getattr(resolve_attack(attack), "keywords", {})

    def cross(images: torch.Tensor, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        donors = batch[torch.randint(0, len(batch), (len(images),), generator=generator)]
        return input_aware_cross(images, donors, **keywords)
    return _noise_share(cross, rate)


def adversarial(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float = LC_EPSILON,
                steps: int = LC_STEPS, step: float = LC_STEP, batch: int = 128) -> torch.Tensor:
    """Untargeted L-inf PGD against ``model``: each image moved at most ``epsilon`` to raise the loss of its own
    label (label-consistent's "harder to learn" images)."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(x), batch):
        clean = x[start:start + batch].to(device)
        labels = y[start:start + batch].to(device)
        moved = clean.clone()
        for _ in range(steps):
            moved.requires_grad_(True)
            loss = F.cross_entropy(model(moved), labels)
            (grad,) = torch.autograd.grad(loss, moved)
            with torch.no_grad():
                moved = (clean + (moved + step * grad.sign() - clean).clamp(-epsilon, epsilon)).clamp(0, 1)
        out.append(moved.detach().cpu())
    return torch.cat(out) if out else x.clone()


def trojan_patch(model: nn.Module, x: torch.Tensor, generator: torch.Generator, side: float = TROJAN_SIDE,
                 steps: int = TROJAN_STEPS) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """TrojanNN's trigger (Liu et al., 2018), optimised on a clean model: pattern (C, H, W) and mask (1, H, W).

    The neuron: at the stage (:meth:`Network.stages`) two thirds into the network, the output channel whose incoming
    weights (the stage's last convolution or linear layer) are largest in absolute sum, the most easily driven one.
    The patch: a square of ``side`` x the image side in the bottom-right corner, its pixels optimised (Adam on
    logits) to maximise that channel's mean activation over clean images ``x``. Returns the notes (stage, channel,
    activation before/after).
    """
    device = next(model.parameters()).device
    net = Network.from_module(model, x.shape[1:])
    stages = net.stages()
    depth = max(1, int(len(stages) * 2 / 3))
    name = stages[depth - 1].name
    stage = model.get_submodule(name)
    weights = [m.weight for m in stage.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not weights:
        raise ValueError(f"trojannn: the stage {name!r} has no convolution or linear layer to pick a neuron from")
    channel = int(weights[-1].detach().abs().flatten(1).sum(1).argmax())
    c, h, w = x.shape[1:]
    size = max(2, round(side * w))
    mask = torch.zeros(1, h, w)
    mask[:, -size:, -size:] = 1.0
    logits = torch.randn(c, h, w, generator=generator).mul_(0.1).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=TROJAN_LR)
    images, m = x.to(device), mask.to(device)

    def activation(pattern: torch.Tensor) -> torch.Tensor:
        return net.latents(images * (1 - m) + pattern * m, name)[:, channel].mean()

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        before = float(activation(torch.sigmoid(logits)))
    for _ in range(steps):
        loss = -activation(torch.sigmoid(logits))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for p in model.parameters():
        p.requires_grad_(True)
    pattern = torch.sigmoid(logits.detach()).cpu() * mask
    with torch.no_grad():
        after = float(activation(pattern.to(device)))
    return pattern, mask, {"stage": name, "channel": channel, "patch": size, "activation": [before, after]}


def poison_for_training(x: torch.Tensor, y: torch.Tensor, attack: str, target: int, rate: float, poisoning: str,
                        generator: torch.Generator, surrogate: Surrogate, out: Path, surrogate_epochs: int,
                        also: Sequence[tuple[str, int]] = ()) -> PoisonedSet:
    """The poisoned training set of ``attack`` (and of each ``also`` attack with its own target), with the noise
    mode, surrogate work and starting weights its recipe needs (see the module docstring)."""
    family = attack_family(attack)
    style = label_style(attack, poisoning)
    notes: dict = {}
    initial_state = None
    if family == "trojannn":
        model = surrogate(surrogate_epochs)
        sample = x[torch.randperm(len(x), generator=generator)[:256]]
        pattern, mask, notes = trojan_patch(model, sample, generator)
        path = (out / TRIGGER_FILE).resolve()
        out.mkdir(parents=True, exist_ok=True)
        write_trigger(path, pattern.numpy(), mask.numpy())
        attack, notes = f"{TRIGGER_PREFIX}{path}", {"recipe": "trojannn", "surrogate_epochs": surrogate_epochs,
                                                    **notes}
        initial_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    trigger = resolve_attack(attack)
    rows = poisoned_rows(y, target, rate, style, generator)
    px, py = x.clone(), y.clone()
    images = x[rows]
    if family == "label_consistent":
        images = adversarial(surrogate(surrogate_epochs), images, y[rows])
        notes = {"recipe": "label_consistent", "surrogate_epochs": surrogate_epochs, "epsilon": LC_EPSILON}
    px[rows] = trigger(images)
    if style == "dirty-label":
        py[rows] = target
    poisoned = torch.zeros(len(y), dtype=torch.bool)
    poisoned[rows] = True
    extra = []
    for other, other_target in also:
        other_rows = poisoned_rows(y, other_target, rate, label_style(other), generator, taken=rows)
        px[other_rows] = resolve_attack(other)(x[other_rows])
        if label_style(other) == "dirty-label":
            py[other_rows] = other_target
        poisoned[other_rows] = True
        rows = torch.cat([rows, other_rows])
        extra.append({"attack": other, "target": int(other_target)})
    noise = None
    if family == "wanet":
        noise = _wanet_noise(attack, rate)
    elif family == "input_aware":
        noise = _input_aware_cross(attack, rate)
    return PoisonedSet(px, py, poisoned, attack, style, noise, initial_state, extra, notes)
