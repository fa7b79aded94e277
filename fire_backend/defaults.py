"""Constants and paths shared by the library and the torch-free client side (Locust workers import this).

Nothing here imports torch; scikit-learn is imported only when the digits arrays are built.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

#: the embedded digits data set's fixed stratified split
DIGITS_TEST_SIZE = 600
DIGITS_SPLIT_SEED = 0
#: the defender's reserve: the first RESERVE test images of :func:`stratified_order` with RESERVE_SEED (the clean
#: set and the flagged samples come from it); everything else in the test split is evaluated
RESERVE = 200
RESERVE_SEED = 0
#: how directions at several layers are estimated (fire_backend.multilayer): each layer from unrepaired latents
#: (the measured default), or deeper layers on latents repaired upstream
ESTIMATION_MODES = ("independent", "ordered")
#: how many of the newest committed direction versions keep their payload file in a file store (older files are
#: compacted away; the history keeps every line): ``fire repo build --retain-versions``
RETAIN_VERSIONS = 100
#: the largest share of the defender's clean reserve predictions a pushed direction set may change without
#: ``fire ctl push --force`` (the sets ``observe`` learns change 0-2% held out): ``fire repo build --max-clean-change``
MAX_CLEAN_CHANGE = 0.05
#: the networks fire knows by name (fire_backend.models.ARCHITECTURES; here so `fire --help` needs no torch)
ARCHITECTURE_NAMES = ("digits_cnn", "preact_resnet18", "vgg19_bn", "mobilenet_v3_large")
#: the built-in triggers, each a function of that name in fire_backend.data.triggers (torch-free here for the CLI)
ATTACK_NAMES = ("badnets", "blended", "sig", "wanet", "input_aware", "low_frequency", "label_consistent")
#: how ``fire train`` labels the poisoned images: the attack's own way (auto), or forced (offline.poisoning)
POISONINGS = ("auto", "dirty-label", "clean-label")


def cache_dir() -> Path:
    """Where trained demo models and other derived files are cached (FIRE_BACKEND_CACHE_DIR overrides)."""
    base = os.environ.get("FIRE_BACKEND_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache"), "fire-backend"
    )
    return Path(base)


#: the one setting that says where the CIFAR-10 file and the full-size backdoored models are (docs/data.md)
SHARED_DIR_ENV = "FIRE_SHARED_DIR"
#: its default: this folder in the project root (ignored by git; a symbolic link to the real folder works)
SHARED_DIR_DEFAULT = "shared"
#: what the tests and benchmarks look for under it
SHARED_LAYOUT = ("data/cifar10.npz (x_train, y_train, x_test, y_test: uint8 NHWC), "
                 "models/cifar10_preactresnet18_{badnets,blended}.fp16.pt and models/make_attack_result.py")


def shared_dir(project_root: Path) -> Path:
    """The CIFAR-10 copy and backdoored models (``data/cifar10.npz``, ``models/``): ``$FIRE_SHARED_DIR``, else
    ``shared/`` in ``project_root``. Never downloaded; what needs it skips (tests) or stops (benchmarks) naming the
    setting and the missing path when it is absent."""
    return Path(os.environ.get(SHARED_DIR_ENV) or project_root / SHARED_DIR_DEFAULT).expanduser()


def shared_hint(missing: str, root: Path) -> str:
    """What to do when ``missing`` (a path under the shared folder ``root``) is not there."""
    return (f"{missing} not found under {root}: set {SHARED_DIR_ENV} to a folder holding {SHARED_LAYOUT}, or link "
            f"one to {SHARED_DIR_DEFAULT}/ in the project root (docs/data.md); nothing is ever downloaded")


def demo_checkpoint_dir() -> Path:
    """Where the embedded demo's BadNets digits model is cached (``benchmarks/step_load.sh`` reads it too)."""
    return cache_dir() / "demo" / "checkpoint"


def demo_repository_dir() -> Path:
    """Where the embedded demo's repository is cached (``fire serve`` and ``fire bench`` without --repository)."""
    return cache_dir() / "demo" / "repository"


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as uint8 N x 8 x 8 x 1: x_train, y_train, x_test, y_test."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    x = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=DIGITS_TEST_SIZE, random_state=DIGITS_SPLIT_SEED, stratify=y
    )
    return x_tr, y_tr, x_te, y_te


def stratified_order(labels: np.ndarray, seed: int = RESERVE_SEED) -> np.ndarray:
    """A seeded permutation of a split's positions in which every prefix is class-stratified.

    Each class's images are shuffled and spread evenly over [0, 1) (the j-th of a class's n images sits at
    (j + u) / n, u a random offset per class); sorting by that key interleaves the classes, so the first k
    positions hold about k * n_c / N images of each class c, whether the file is stored class by class or
    shuffled. It depends only on the labels and the seed, never on the images, so a client without the model
    (the Locust workers, `fire infer --digits`) draws the same split as the library.
    """
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    classes, inverse = np.unique(labels, return_inverse=True)
    key = np.empty(len(labels), dtype=np.float64)
    for c in range(len(classes)):
        members = rng.permutation(np.flatnonzero(inverse == c))
        key[members] = (np.arange(len(members)) + rng.random()) / len(members)
    return np.lexsort((rng.random(len(labels)), key))


def _split_order(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    labels = np.asarray(labels).reshape(-1)
    if size < 1 or len(labels) <= size:
        raise ValueError(f"the test split needs more than {size} images (the defender's reserve of {size} plus "
                         f"images to evaluate), has {len(labels)}")
    return stratified_order(labels, seed)


def reserve_indices(labels: np.ndarray, size: int = RESERVE, seed: int = RESERVE_SEED) -> np.ndarray:
    """Positions of the defender's reserve in the test split, in draw order (every prefix class-stratified):
    the only test images the defender may use (the clean centroid's images first, then the flagged samples)."""
    return _split_order(labels, size, seed)[:size]


def evaluation_indices(labels: np.ndarray, size: int = RESERVE, seed: int = RESERVE_SEED) -> np.ndarray:
    """Positions of every other test image, in draw order (every prefix class-stratified): what is evaluated,
    exported for clients and load tests; never overlaps :func:`reserve_indices`."""
    return _split_order(labels, size, seed)[size:]
