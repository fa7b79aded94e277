"""The defender's reserve (one seeded, class-stratified draw from the test split), flagged samples only from images
the attack changes, stored attacks that never pass a clean image off as poisoned, and repository builds that touch
only the reserve images they use. On a class-ordered file (as shared/data/cifar10.npz is) and a shuffled one.

The command-line checks run the `fire` console script.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._subclasses import FakeTensor

from fire_backend.data import load_dataset, resolve_attack, to_tensor, to_uint8
from fire_backend.data.reserve import defender_samples, flagged_samples
from fire_backend.data.stored import write_stored_set
from fire_backend.defaults import RESERVE, RESERVE_SEED, evaluation_indices, reserve_indices, stratified_order
from fire_backend.models.network import PROBE_BATCH
from fire_backend.offline.checkpoint import META_FILE, load_checkpoint
from fire_backend.offline.evaluation import LayerView, evaluation_set
from fire_backend.offline.training import TrainConfig, train_backdoored
from fire_backend.repository.layout import ARTIFACTS_DIR, STORE_DIR, ServingSettings
from fire_backend.stores.files import DirectionStore

HERE = Path(__file__).resolve().parent
FIRE = Path(sys.executable).with_name("fire")
TARGET = 0


def class_ordered_labels(per_class: list[int]) -> np.ndarray:
    return np.repeat(np.arange(len(per_class)), per_class)


# --- the rule (torch-free) -----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["class-ordered", "shuffled"])
def test_the_reserve_holds_every_class_in_proportion(layout: str) -> None:
    y = class_ordered_labels([1000] * 10)
    if layout == "shuffled":
        y = y[np.random.default_rng(5).permutation(len(y))]
    reserve = reserve_indices(y)
    assert len(reserve) == len(set(reserve.tolist())) == RESERVE
    assert np.bincount(y[reserve], minlength=10).tolist() == [20] * 10
    # Every prefix is stratified too: the centroid's 100 images, the first flagged samples.
    assert np.bincount(y[reserve[:100]], minlength=10).tolist() == [10] * 10
    assert set(np.bincount(y[reserve[:37]], minlength=10).tolist()) <= {3, 4}
    evaluated = evaluation_indices(y)
    assert len(evaluated) == len(y) - RESERVE and not set(evaluated.tolist()) & set(reserve.tolist())
    assert np.array_equal(np.sort(np.concatenate([reserve, evaluated])), np.arange(len(y)))
    assert np.bincount(y[evaluated[:1000]], minlength=10).tolist() == [100] * 10


def test_the_reserve_is_seeded_and_proportional_for_uneven_classes() -> None:
    y = class_ordered_labels([600, 50, 250, 100])
    reserve = reserve_indices(y, size=100)
    counts = np.bincount(y[reserve], minlength=4)
    assert counts.sum() == 100 and np.all(np.abs(counts - [60, 5, 25, 10]) <= 1)
    assert np.array_equal(reserve, reserve_indices(y, size=100))  # the same draw every time
    assert not np.array_equal(reserve, reserve_indices(y, size=100, seed=RESERVE_SEED + 1))
    assert np.array_equal(stratified_order(y)[:100], reserve)


def test_a_test_split_no_larger_than_the_reserve_is_an_error() -> None:
    with pytest.raises(ValueError, match=f"needs more than {RESERVE} images"):
        reserve_indices(np.zeros(RESERVE, dtype=np.int64))


# --- defender samples and evaluation images ------------------------------------------------------------


def sorted_by_class(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(y, kind="stable")
    return x[order], y[order]


@pytest.fixture(scope="module")
def ordered_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits data set with both splits stored class by class, and more test images of the target class than
    the reserve holds (each four times over), like the shared CIFAR-10 file's 1,000 airplanes first."""
    data = load_dataset("digits")
    x_train, y_train = sorted_by_class(data.x_train, data.y_train)
    target = data.y_test == TARGET
    x_test, y_test = sorted_by_class(np.concatenate([*[data.x_test[target]] * 4, data.x_test[~target]]),
                                     np.concatenate([*[data.y_test[target]] * 4, data.y_test[~target]]))
    assert (y_test[:RESERVE] == TARGET).all()
    path = tmp_path_factory.mktemp("ordered") / "digits-by-class.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def test_defender_samples_from_a_class_ordered_split(ordered_digits: Path) -> None:
    data = load_dataset(f"npz:{ordered_digits}")
    attack = resolve_attack("badnets")
    samples = defender_samples(data.x_test, data.y_test, attack, TARGET, n_clean=100, n_flagged=20)
    reserve = reserve_indices(data.y_test)
    assert torch.equal(samples.clean, to_tensor(data.x_test[reserve[:100]]))
    assert set(data.y_test[reserve[:100]].tolist()) == set(range(10))  # not "the first 100": every class
    flagged = flagged_samples(data.x_test, data.y_test, attack, TARGET, 20)
    assert set(flagged.index.tolist()) <= set(reserve.tolist()) and (flagged.labels != TARGET).all()
    assert len(set(flagged.labels.tolist())) == 9  # every non-target class
    assert np.array_equal(flagged.index, reserve[data.y_test[reserve] != TARGET][:20])
    assert torch.equal(samples.flagged, attack(samples.flagged_clean)) and len(samples.flagged) == 20
    assert samples.describe() == {"reserve": RESERVE, "seed": RESERVE_SEED, "clean": 100, "flagged": 20,
                                  "skipped_unchanged": 0}
    evaluation = evaluation_set(data.x_test, data.y_test, attack, TARGET)
    assert len(evaluation.y) == len(data.y_test) - RESERVE
    assert torch.equal(evaluation.poisoned, attack(evaluation.x[evaluation.y != TARGET]))


def write_partial_stored(path: Path, x: np.ndarray, y: np.ndarray, covered: np.ndarray) -> str:
    """A stored attack (badnets copies) covering only the test images at ``covered``; returns its attack name."""
    poisoned = to_uint8(resolve_attack("badnets")(to_tensor(x[covered])))
    write_stored_set(path, poisoned, y[covered], covered, x[covered])
    return f"stored:{path}"


def test_flagged_samples_skip_what_a_stored_attack_does_not_cover(ordered_digits: Path, tmp_path: Path) -> None:
    data = load_dataset(f"npz:{ordered_digits}")
    reserve = reserve_indices(data.y_test)
    reserve_non_target = reserve[data.y_test[reserve] != TARGET]
    covered = np.concatenate([reserve_non_target[3:8], evaluation_indices(data.y_test)])
    covered = covered[data.y_test[covered] != TARGET]
    attack = resolve_attack(write_partial_stored(tmp_path / "partial.npz", data.x_test, data.y_test, covered))
    pick = flagged_samples(data.x_test, data.y_test, attack, TARGET, 5)
    assert np.array_equal(pick.index, reserve_non_target[3:8]) and pick.excluded == 3
    assert not (to_uint8(pick.poisoned) == data.x_test[pick.index]).all(axis=(1, 2, 3)).any()  # all poisoned
    with pytest.raises(ValueError, match=r"reserve \(200 test images, class-stratified, seed 0\) holds only 5 "
                                         r"images usable as flagged samples"):
        flagged_samples(data.x_test, data.y_test, attack, TARGET, 6)


# --- the work a build does -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ordered_checkpoint(ordered_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small BadNets digits model trained on the class-ordered file (a stratified subset of it)."""
    out = tmp_path_factory.mktemp("ordered-model") / "run"
    train_backdoored(TrainConfig(data=f"npz:{ordered_digits}", epochs=8, train_subset=800, width=16, device="cpu"),
                     out, progress=False)
    return out


def with_attack(checkpoint: Path, attack: str, out: Path) -> Path:
    """A copy of ``checkpoint`` whose metadata names another attack."""
    shutil.copytree(checkpoint, out)
    meta = json.loads((out / META_FILE).read_text())
    (out / META_FILE).write_text(json.dumps({**meta, "attack": attack}))
    return out


def test_a_repository_build_reads_only_the_reserve_images_it_uses(
    ordered_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """About 19,600 CIFAR-10 images went through the head (and the attack) to get a centroid of 100."""
    import fire_test_triggers

    from fire_backend.repository import build

    monkeypatch.syspath_prepend(str(HERE))
    checkpoint = with_attack(ordered_checkpoint, "fire_test_triggers:counted", tmp_path / "counted")
    seen = {"head": 0}

    def counting_load(directory: Path, *args, **kwargs):
        model, meta = load_checkpoint(directory, *args, **kwargs)
        def count(_module: torch.nn.Module, inputs: tuple[torch.Tensor]) -> None:
            seen["head"] += len(inputs[0])

        model.model.block1.register_forward_pre_hook(count)
        return model, meta

    monkeypatch.setattr(build, "load_checkpoint", counting_load)
    monkeypatch.setitem(fire_test_triggers.SEEN, "images", 0)
    build.build_repository(checkpoint, tmp_path / "repo", "block2", flagged=20)
    # the layers' one probe + 100 clean + 20 flagged images, and only those 20 through the attack
    assert seen["head"] == PROBE_BATCH + 100 + 20
    assert fire_test_triggers.SEEN["images"] == 20


def test_evaluation_latents_are_computed_only_when_a_figure_needs_them(ordered_checkpoint: Path) -> None:
    model, meta = load_checkpoint(ordered_checkpoint)
    data = load_dataset(meta.dataset)
    attack = resolve_attack(meta.attack)
    samples = defender_samples(data.x_test, data.y_test, attack, TARGET, 100, 10)
    evaluation = evaluation_set(data.x_test, data.y_test, attack, TARGET, limit=50)
    seen = []
    model.model.block1.register_forward_pre_hook(  # not torch.export's trace, which cuts the network: fake tensors
        lambda _m, inputs: None if isinstance(inputs[0], FakeTensor) else seen.append(len(inputs[0])))
    view = LayerView(model, "block2", samples, evaluation)
    assert sum(seen) == PROBE_BATCH + 100  # the layers' probe and the centroid only
    figures, _, _ = view.metrics([], TARGET)
    assert sum(seen) == PROBE_BATCH + 100 + 50 + int((evaluation.y != TARGET).sum())
    assert view.poisoned_accuracy([]) == figures.pa  # the streaming curve's PA-only path
    assert sum(seen) == PROBE_BATCH + 100 + 50 + int((evaluation.y != TARGET).sum())  # latents computed once


# --- through the console script ------------------------------------------------------------------------


def fire(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(FIRE), *argv], capture_output=True, text=True, timeout=300, check=False)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


needs_console_script = pytest.mark.skipif(not FIRE.is_file(), reason=f"no console script at {FIRE}")


@needs_console_script
def test_repo_build_on_a_class_ordered_file_learns_from_flagged_non_target_images(
    ordered_checkpoint: Path, tmp_path: Path
) -> None:
    """With the reserve "the first 200 test images" every one was of class 0, the target: no flagged sample at all,
    and a direction estimated from nothing was served."""
    proc = fire("repo", "build", "--checkpoint", str(ordered_checkpoint), "--out", str(tmp_path / "repo"),
                "--layer", "block2", "--flagged", "20")
    assert proc.returncode == 0, proc.stderr
    artifacts = tmp_path / "repo" / ARTIFACTS_DIR
    store = DirectionStore(artifacts / STORE_DIR)
    version = store.read_version(store.live_version())
    assert version.directions.estimator.poisoned_count == 20 and version.directions.estimator.clean_count == 100
    assert store.history()[-1]["defender"] == {"reserve": RESERVE, "seed": RESERVE_SEED, "clean": 100,
                                               "flagged": 20, "skipped_unchanged": 0}
    settings = ServingSettings.read(artifacts)
    assert (settings.reserve_size, settings.reserve_seed) == (RESERVE, RESERVE_SEED)


@pytest.fixture(scope="module")
def partial_stored(ordered_checkpoint: Path, ordered_digits: Path, tmp_path_factory: pytest.TempPathFactory):
    """The BadNets model with a stored attack that covers 5 of the reserve's non-target images and all but one
    non-target evaluation image."""
    data = load_dataset(f"npz:{ordered_digits}")
    reserve, evaluated = reserve_indices(data.y_test), evaluation_indices(data.y_test)
    eval_non_target = evaluated[data.y_test[evaluated] != TARGET]
    covered = np.concatenate([reserve[data.y_test[reserve] != TARGET][:5], eval_non_target[1:]])
    root = tmp_path_factory.mktemp("partial")
    attack = write_partial_stored(root / "poisoned_test.npz", data.x_test, data.y_test, covered)
    return with_attack(ordered_checkpoint, attack, root / "checkpoint"), data, int(eval_non_target[0])


@needs_console_script
def test_repo_build_refuses_too_few_flagged_samples_and_changes_nothing(partial_stored, tmp_path: Path) -> None:
    checkpoint, _, _ = partial_stored
    proc = fire("repo", "build", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "repo"), "--flagged", "20")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "holds only 5 images usable as flagged samples" in proc.stderr and "\n" not in proc.stderr.strip()
    assert not (tmp_path / "repo").exists()


@needs_console_script
def test_eval_refuses_an_evaluation_image_the_stored_attack_does_not_cover(partial_stored) -> None:
    checkpoint, _, _ = partial_stored
    proc = fire("eval", "--checkpoint", str(checkpoint), "--flagged", "5", "--out", str(checkpoint / "results"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "1 of " in proc.stderr and "have no poisoned copy in the stored attack" in proc.stderr


@needs_console_script
def test_export_leaves_out_and_counts_images_without_a_poisoned_copy(partial_stored, tmp_path: Path) -> None:
    checkpoint, data, uncovered = partial_stored
    summary = last_json(fire("data", "export", "--checkpoint", str(checkpoint), "--poisoned", "--json",
                             "--out", str(tmp_path / "poisoned.npz")))
    evaluated = evaluation_indices(data.y_test)
    assert summary["excluded"] == 1 and summary["n"] == int((data.y_test[evaluated] != TARGET).sum()) - 1
    with np.load(tmp_path / "poisoned.npz") as exported:
        x = exported["x"]
    clean = {image.tobytes() for image in data.x_test}
    assert not any(image.tobytes() in clean for image in x)  # never a clean image passed off as poisoned
    assert data.x_test[uncovered].tobytes() not in {image.tobytes() for image in x}
    flagged = last_json(fire("data", "export", "--checkpoint", str(checkpoint), "--part", "reserve", "--poisoned",
                             "--n", "5", "--json", "--out", str(tmp_path / "flagged.npz")))
    assert flagged["n"] == 5
