"""Backdoor triggers as plain functions: batched NCHW float images in [0, 1] -> triggered images.

Deterministic and size-agnostic (patterns are derived from the image size and a fixed seed), so the
attacker's trigger at training time and the one the evaluation or load test applies are identical.
Any importable callable with the same signature works wherever a built-in name does.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from fire_backend.data.stored import STORED_PREFIX, StoredAttack, stored_attack

Attack = Callable[[torch.Tensor], torch.Tensor]


def badnets(x: torch.Tensor) -> torch.Tensor:
    """A white-and-black checker patch in the bottom-right corner (about 1/10 of the side)."""
    out = x.clone()
    size = max(2, round(x.shape[-1] / 10) + 1)
    ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    patch = ((ii + jj) % 2 == 0).to(x.dtype).to(x.device)
    out[..., -size:, -size:] = patch
    return out


def _pattern(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A fixed uniform-noise image, the same for every call with the same shape."""
    generator = torch.Generator().manual_seed(1234)
    return torch.rand(shape, generator=generator).to(device=device, dtype=dtype)


def blended(x: torch.Tensor, ratio: float = 0.2) -> torch.Tensor:
    """Blend a fixed pattern image over the whole input (Chen et al., 2017)."""
    pattern = _pattern(tuple(x.shape[1:]), x.device, x.dtype)
    return (1.0 - ratio) * x + ratio * pattern


def sig(x: torch.Tensor, delta: float = 0.12, frequency: float = 6.0) -> torch.Tensor:
    """A horizontal sinusoidal signal over the whole image (Barni et al., 2019): no patch anywhere."""
    width = x.shape[-1]
    j = torch.arange(width, device=x.device, dtype=x.dtype)
    signal = delta * torch.sin(2 * torch.pi * j * frequency / width)
    return (x + signal).clamp(0.0, 1.0)


ATTACKS: dict[str, Attack] = {"badnets": badnets, "blended": blended, "sig": sig}


def resolve_attack(name: str) -> Attack:
    """A built-in name, ``package.module:function`` for a user-supplied trigger, or ``stored:PATH`` for an
    attack's own poisoned test images (``fire import backdoorbench``)."""
    if name in ATTACKS:
        return ATTACKS[name]
    if name.startswith(STORED_PREFIX):
        return stored_attack(name.removeprefix(STORED_PREFIX))
    module_name, sep, attr = name.partition(":")
    if not sep or not attr:
        raise ValueError(
            f"unknown attack {name!r}: use one of {', '.join(ATTACKS)} or an import path package.module:function"
        )
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import attack {name!r}: {exc}") from exc
    if not callable(target):
        raise ValueError(f"attack {name!r} is not callable")
    return target


def attack_name(attack: Attack) -> str:
    """How error messages name a trigger."""
    return getattr(attack, "__name__", None) or repr(attack)


def apply_trigger(attack: Attack, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``attack(x)`` and a bool mask of the images it actually changed, for code that builds a set of poisoned
    images and must drop (and count) the others instead of passing them off as poisoned: a stored attack's
    images it has no copy of come back unchanged here rather than raising, as would a trigger that happens to
    leave an image as it was."""
    out, _ = attack.partial(x) if isinstance(attack, StoredAttack) else (attack(x), None)
    return out, (out != x).flatten(1).any(1).cpu()
