"""Backdoor attacks by name: the built-in triggers (:mod:`fire_backend.data.triggers`), with parameters, and the
triggers kept in files or given as import paths.

A trigger is a plain function, batched NCHW float images in [0, 1] -> triggered images, deterministic and
size-agnostic. Any importable callable with the same signature works wherever a built-in name does. Names:

- ``badnets``, ``blended``, ... (:data:`ATTACKS`), or with keyword parameters of the function:
  ``blended(ratio=0.05)``, ``badnets(size=2)``; the name with its parameters is what a checkpoint records;
- ``trigger:PATH``: a pattern and mask in a file (:mod:`fire_backend.data.trigger_file`; TrojanNN's patch);
- ``stored:PATH``: an attack's own poisoned test images (``fire import backdoorbench``);
- ``package.module:function``: a user's trigger.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from collections.abc import Callable

import torch

import fire_backend.data.triggers as triggers
from fire_backend.data.stored import STORED_PREFIX, StoredAttack, stored_attack
from fire_backend.data.trigger_file import TRIGGER_PREFIX, file_trigger
from fire_backend.defaults import ATTACK_NAMES

Attack = Callable[[torch.Tensor], torch.Tensor]


ATTACKS: dict[str, Attack] = {name: getattr(triggers, name) for name in ATTACK_NAMES}
_CALL = re.compile(r"^\s*([a-z_]+)\s*\((.*)\)\s*$", re.DOTALL)


def _with_parameters(name: str) -> Attack | None:
    """``family(key=value, ...)`` as the built-in trigger with those keyword values (None when ``name`` is not of
    that form); values are numbers, checked against the function's parameters."""
    match = _CALL.match(name)
    if match is None or match.group(1) not in ATTACKS:
        return None
    family, body = match.groups()
    function = ATTACKS[family]
    accepted = [p for p in inspect.signature(function).parameters if p != "x"]
    values: dict[str, float | int] = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, sep, raw = (piece.strip() for piece in item.partition("="))
        if not sep or key not in accepted:
            raise ValueError(f"attack {name!r}: {item!r} is not KEY=VALUE with KEY one of {', '.join(accepted)}")
        try:
            values[key] = int(raw) if re.fullmatch(r"[+-]?\d+", raw) else float(raw)
        except ValueError:
            raise ValueError(f"attack {name!r}: {key} must be a number, not {raw!r}") from None
    bound = functools.partial(function, **values)
    bound.__name__ = name  # type: ignore[attr-defined]
    return bound


def resolve_attack(name: str) -> Attack:
    """A built-in name (with parameters or not), ``trigger:PATH``, ``stored:PATH`` or ``package.module:function``
    (see the module docstring)."""
    if name in ATTACKS:
        return ATTACKS[name]
    bound = _with_parameters(name)
    if bound is not None:
        return bound
    if name.startswith(STORED_PREFIX):
        return stored_attack(name.removeprefix(STORED_PREFIX))
    if name.startswith(TRIGGER_PREFIX):
        return file_trigger(name.removeprefix(TRIGGER_PREFIX))
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
