"""The defender's reserve as tensors: its clean set, its flagged samples, and poisoned images picked for export.

Which test images are the reserve is one rule, :func:`fire_backend.defaults.reserve_indices` (torch-free, so
the Locust workers and `fire infer --digits` draw the same split): ``RESERVE`` test images in a seeded,
class-stratified random order. From that order the defender takes

- the clean set (the centroid): the first ``n_clean`` reserve images, whatever their class;
- the flagged samples: the first ``n_flagged`` reserve images whose label is not the attack's target and that
  the attack actually changes (a stored attack leaves the images it has no copy of unchanged): never a clean
  image passed off as poisoned, and a clear error when the reserve holds too few.

Everything else in the test split is evaluated (:func:`fire_backend.defaults.evaluation_indices`), so no
figure is measured on an image the defender learned from. Only the reserve images actually used are read
through the attack (a repository build touches about a hundred images).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fire_backend.data.attacks import Attack, apply_trigger, attack_name
from fire_backend.data.datasets import to_tensor
from fire_backend.defaults import RESERVE, RESERVE_SEED, reserve_indices

#: images run through the attack at a time while looking for usable ones
PICK_CHUNK = 256


@dataclass(frozen=True)
class PoisonedPick:
    """Poisoned images picked in a given order, with their clean originals and where they came from."""

    poisoned: torch.Tensor  # float NCHW in [0, 1]
    clean: torch.Tensor
    labels: np.ndarray  # true labels
    index: np.ndarray  # positions in the split
    excluded: int  # candidates looked at and dropped: the attack left them unchanged

    def __len__(self) -> int:
        return len(self.index)


def pick_poisoned(x: np.ndarray, y: np.ndarray, order: np.ndarray, attack: Attack, target: int,
                  n: int | None = None) -> PoisonedPick:
    """At most ``n`` images (all when None), walking ``order``, whose label is not ``target`` and that the
    attack changes; the attack sees only as many images as it takes to find them."""
    candidates = order[np.asarray(y)[order] != target]
    want = len(candidates) if n is None else n
    poisoned, clean, index, excluded, start, found = [], [], [], 0, 0, 0
    while found < want and start < len(candidates):
        chunk = candidates[start : start + min(PICK_CHUNK, want - found)]
        start += len(chunk)
        originals = to_tensor(x[chunk])
        out, changed = apply_trigger(attack, originals)
        keep = changed.numpy()
        excluded += int((~keep).sum())
        poisoned.append(out[torch.from_numpy(keep)])
        clean.append(originals[torch.from_numpy(keep)])
        index.append(chunk[keep])
        found += int(keep.sum())
    shape = (0, x.shape[3], x.shape[1], x.shape[2])
    taken = np.concatenate(index) if index else np.zeros(0, dtype=np.int64)
    return PoisonedPick(
        poisoned=torch.cat(poisoned) if poisoned else torch.zeros(shape),
        clean=torch.cat(clean) if clean else torch.zeros(shape),
        labels=np.asarray(y)[taken].astype(np.int64),
        index=taken,
        excluded=excluded,
    )


def flagged_samples(x: np.ndarray, y: np.ndarray, attack: Attack, target: int, n: int,
                    at_least: int | None = None) -> PoisonedPick:
    """The defender's first ``n`` flagged samples from the reserve (see the module docstring); a ValueError
    naming what is short when the reserve holds fewer than ``at_least`` (default ``n``) usable images."""
    pick = pick_poisoned(x, y, reserve_indices(y), attack, target, n)
    needed = n if at_least is None else at_least
    if len(pick) < needed:
        raise ValueError(
            f"the defender's reserve ({RESERVE} test images, class-stratified, seed {RESERVE_SEED}) holds only "
            f"{len(pick)} images usable as flagged samples (label not the target {target} and changed by the attack "
            f"{attack_name(attack)}; {pick.excluded} non-target images were left unchanged), {needed} needed: ask for "
            f"at most {len(pick)}, or use a data set whose test split has more non-target images the attack covers"
        )
    return pick


@dataclass(frozen=True)
class DefenderSamples:
    """The defender's few samples from the reserve, as [0, 1] NCHW tensors."""

    clean: torch.Tensor  # the clean set: the centroid's images
    flagged: torch.Tensor  # flagged poisoned samples
    flagged_clean: torch.Tensor  # their clean originals (the paired estimator only)
    skipped: int  # non-target reserve images passed over because the attack left them unchanged

    def describe(self) -> dict:
        """How the samples were drawn, for reports and repository settings (enough to draw them again)."""
        return {"reserve": RESERVE, "seed": RESERVE_SEED, "clean": len(self.clean), "flagged": len(self.flagged),
                "skipped_unchanged": self.skipped}


def defender_samples(x: np.ndarray, y: np.ndarray, attack: Attack, target: int, n_clean: int,
                     n_flagged: int, at_least: int | None = None) -> DefenderSamples:
    """``n_clean`` clean and ``n_flagged`` flagged samples from the reserve of the test split (x, y); with
    ``at_least``, as many flagged samples up to ``n_flagged`` as the reserve holds, but no fewer than that."""
    if not (1 <= n_clean <= RESERVE and 0 <= n_flagged <= RESERVE):
        raise ValueError(f"need 1 to {RESERVE} clean and 0 to {RESERVE} flagged samples (the defender's reserve "
                         f"is {RESERVE} test images), got {n_clean} clean and {n_flagged} flagged")
    reserve = reserve_indices(y)
    flagged = flagged_samples(x, y, attack, target, n_flagged, at_least) if n_flagged else None
    empty = torch.zeros(0, x.shape[3], x.shape[1], x.shape[2])
    return DefenderSamples(
        clean=to_tensor(x[reserve[:n_clean]]),
        flagged=empty if flagged is None else flagged.poisoned,
        flagged_clean=empty if flagged is None else flagged.clean,
        skipped=0 if flagged is None else flagged.excluded,
    )
