"""``stored:PATH`` attacks: an attack's own poisoned images, kept beside a checkpoint, used as a trigger.

An importer (``fire import backdoorbench``) writes the attacker's poisoned copies of clean test images with
:func:`write_stored_set`; :class:`StoredAttack` then replaces each clean image it recognises (by a digest of
its uint8 pixels) with the attacker's copy, so evaluation, exports and repository builds use the attack's
actual trigger without knowing how it was made.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import torch

from fire_backend.data.datasets import read_arrays, to_tensor, to_uint8

#: attack-name prefix of a stored poisoned set: ``stored:/abs/path/poisoned_test.npz``
STORED_PREFIX = "stored:"
DIGEST_SIZE = 16


def image_digest(image: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=DIGEST_SIZE).digest()


def write_stored_set(path: Path, x: np.ndarray, y: np.ndarray, index: np.ndarray, clean_x: np.ndarray) -> None:
    """``x`` (uint8 NHWC poisoned images), ``y`` (true labels), ``index`` (positions in the clean test split) and
    ``key`` (the digest of each image's clean original, ``clean_x``)."""
    keys = np.frombuffer(b"".join(image_digest(img) for img in clean_x), dtype=np.uint8).reshape(-1, DIGEST_SIZE)
    np.savez_compressed(path, x=x, y=y, index=index, key=keys)
    _stored.cache_clear()  # a cached reader of an earlier file at this path is stale now


class StoredAttack:
    """Replaces each clean image of the stored set by the attacker's poisoned copy.

    Images are matched by content (a digest of the uint8 image), so this works wherever the clean test
    images flow: the defender's reserve, the evaluation split, exports. An image the set does not cover (the
    target class, which an all-to-one attack does not poison, or any image from elsewhere) has no poisoned
    copy: calling the attack on it is an error, never a silently clean "poisoned" image. Code that builds a set
    (flagged samples, exports) asks :meth:`partial` instead and drops and counts what is not covered.
    """

    def __init__(self, path: Path) -> None:
        arrays = read_arrays(path, ("x", "y", "index", "key"),
                             "stored poisoned set (written by `fire import backdoorbench`)")
        self.x, self.y, self.index, keys = arrays["x"], arrays["y"], arrays["index"], arrays["key"]
        if self.x.dtype != np.uint8 or self.x.ndim != 4 or keys.shape != (len(self.x), DIGEST_SIZE):
            raise ValueError(f"{path}: malformed stored poisoned set")
        self.path = path
        self.rows = {bytes(k): i for i, k in enumerate(keys)}

    def _rows(self, x: torch.Tensor) -> np.ndarray:
        """The stored row of each image, -1 where the set has no poisoned copy of it."""
        return np.array([self.rows.get(image_digest(img), -1) for img in to_uint8(x.detach().cpu())], dtype=np.int64)

    def _replace(self, x: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        out = x.clone()
        hits = np.flatnonzero(rows >= 0)
        if len(hits):
            out[torch.from_numpy(hits)] = to_tensor(self.x[rows[hits]]).to(device=x.device, dtype=x.dtype)
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The attacker's poisoned copy of every image; a ValueError if the set lacks any of them."""
        rows = self._rows(x)
        missing = int((rows < 0).sum())
        if missing:
            raise ValueError(
                f"{missing} of {len(rows)} images have no poisoned copy in the stored attack {self.path}: it holds "
                "only the test images the attack poisoned (not the target class, nothing from other data). Use "
                "images it covers, or re-import with --attack NAME --target N for a trigger fire applies itself"
            )
        return self._replace(x, rows)

    def partial(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The poisoned copies of the images the set covers, the others unchanged, and the covered mask."""
        rows = self._rows(x)
        return self._replace(x, rows), torch.from_numpy(rows >= 0)

    def __repr__(self) -> str:
        return f"StoredAttack({str(self.path)!r}, {len(self.x)} images)"


@functools.lru_cache(maxsize=8)
def _stored(path: str) -> StoredAttack:
    return StoredAttack(Path(path))


def stored_attack(path: str | Path) -> StoredAttack:
    """The ``stored:PATH`` trigger (cached per file)."""
    return _stored(str(Path(path).expanduser().resolve()))
