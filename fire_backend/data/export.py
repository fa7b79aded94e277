"""Images for clients, Locust and ``fire ctl observe``: clean or triggered, from a data set's split, as .npz.

The one place that decides which images a client-side file holds (``fire data export``, ``fire bench``'s and
``fire demo``'s traffic): on the test split the defender's reserve is kept apart from the evaluation images
(see :mod:`fire_backend.data.reserve`); images come in the split's seeded, class-stratified draw order, so
"the first N" is a sample of every class even in a file stored class by class; triggered images are taken only
from images whose true label is not the attack's target and that the attack changes (the others, e.g. images a
stored attack has no copy of, are dropped and counted in ``excluded``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fire_backend.data.attacks import resolve_attack
from fire_backend.data.datasets import Dataset, to_uint8
from fire_backend.data.reserve import flagged_samples, pick_poisoned
from fire_backend.defaults import evaluation_indices, reserve_indices, stratified_order

#: which test images: all but the defender's reserve (what is evaluated), the reserve itself, or all of them
PARTS = ("evaluation", "reserve", "all")
CLEAN_FILE = "clean.npz"
POISONED_FILE = "poisoned.npz"


@dataclass(frozen=True)
class ExportedImages:
    """uint8 N x H x W x C images, their true labels, and whether they carry the trigger."""

    x: np.ndarray
    y: np.ndarray
    poisoned: bool
    excluded: int = 0  # candidates dropped because the attack left them unchanged (poisoned exports)

    def __len__(self) -> int:
        return len(self.x)

    def save(self, path: Path) -> Path:
        """Write ``x``, ``y`` and a per-image ``poisoned`` flag, the layout every client reads."""
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, x=self.x, y=self.y, poisoned=np.full(len(self.x), self.poisoned))
        return path


def export_images(data: Dataset, attack: str, target: int, *, split: str = "test", poisoned: bool = False,
                  n: int | None = None, part: str = "evaluation") -> ExportedImages:
    """At most ``n`` images of ``split`` (for the test split: of ``part``) in its draw order, with ``attack``'s
    trigger if ``poisoned`` (then only images whose true label is not ``target`` and that the attack changes;
    from the reserve, exactly the defender's flagged samples, an error when it holds fewer than ``n``)."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}, not {part!r}")
    x, y = data.split(split)
    if split == "train" or part == "all":
        order = stratified_order(y)
    else:
        order = evaluation_indices(y) if part == "evaluation" else reserve_indices(y)
    if not poisoned:
        order = order[:n]
        return ExportedImages(x[order], y[order].astype(np.int64), False)
    trigger = resolve_attack(attack)
    if split == "test" and part == "reserve" and n is not None:
        pick = flagged_samples(x, y, trigger, target, n)
    else:
        pick = pick_poisoned(x, y, order, trigger, target, n)
    return ExportedImages(to_uint8(pick.poisoned), pick.labels, True, pick.excluded)


def write_traffic(data: Dataset, attack: str, target: int, out: Path,
                  n: int | None = None) -> tuple[Path, Path | None]:
    """``clean.npz`` and (with an attack) ``poisoned.npz`` of evaluation images in ``out``: the two pools of a
    Locust run. Returns their paths (poisoned None without an attack)."""
    clean = export_images(data, attack, target, n=n).save(out / CLEAN_FILE)
    if not attack:
        return clean, None
    return clean, export_images(data, attack, target, poisoned=True, n=n).save(out / POISONED_FILE)
