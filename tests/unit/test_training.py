"""Training, checkpoints and evaluation helpers on a tiny (one-epoch) digits model: plumbing, not quality."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fire_backend.cli import main
from fire_backend.data import resolve_attack
from fire_backend.data.augment import shrink_pad, shrinkpad_defense
from fire_backend.defaults import evaluation_indices
from fire_backend.offline.checkpoint import META_FILE, MODEL_FILE, CheckpointMeta, load_checkpoint
from fire_backend.offline.evaluation import accuracy_figures, detector_tpr
from fire_backend.offline.training import TrainConfig, default_spec, poison_training_set, train_backdoored

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CheckpointMeta]:
    out = tmp_path_factory.mktemp("tiny") / "run"
    meta = train_backdoored(TrainConfig(epochs=1, train_subset=128, width=4, target=3), out, progress=False)
    return out, meta


def test_train_writes_a_loadable_checkpoint(tiny_checkpoint) -> None:
    out, meta = tiny_checkpoint
    assert (out / MODEL_FILE).is_file() and (out / META_FILE).is_file()
    model, loaded = load_checkpoint(out)
    assert loaded == meta
    assert not model.training
    assert meta.spec.arch == "digits_cnn" and meta.spec.kwargs["width"] == 4
    assert meta.spec.input_shape == (1, 8, 8)
    assert meta.extra == {"epochs": 1, "train_subset": 128}
    assert 0.0 <= meta.ca <= 1.0 and 0.0 <= meta.asr <= 1.0
    assert json.loads((out / META_FILE).read_text())["attack"] == "badnets"
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_checkpoint_meta_round_trip(tiny_checkpoint) -> None:
    _, meta = tiny_checkpoint
    assert CheckpointMeta.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta


def test_load_checkpoint_requires_both_files(tmp_path: Path, tiny_checkpoint) -> None:
    out, _ = tiny_checkpoint
    (tmp_path / META_FILE).write_text((out / META_FILE).read_text())
    with pytest.raises(FileNotFoundError, match="fire train"):
        load_checkpoint(tmp_path)
    (tmp_path / META_FILE).write_text("{}")
    with pytest.raises(ValueError, match="not a checkpoint's metadata"):
        load_checkpoint(tmp_path)


def test_poison_training_set_flips_only_non_target_samples() -> None:
    x = torch.rand(100, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(100) % 10
    config = TrainConfig(target=2, poison_rate=0.2)
    px, py = poison_training_set(x, y, config, torch.Generator().manual_seed(0))
    changed = (px != x).flatten(1).any(1)
    assert int(changed.sum()) == 20
    assert (y[changed] != 2).all() and (py[changed] == 2).all()
    assert torch.equal(py[~changed], y[~changed]) and torch.equal(
        px[changed], resolve_attack("badnets")(x[changed])
    )
    assert torch.equal(
        x, torch.rand(100, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    )  # input untouched


def test_default_spec_picks_the_architecture() -> None:
    assert default_spec(TrainConfig(), (1, 8, 8), 10).arch == "digits_cnn"
    spec = default_spec(TrainConfig(), (3, 32, 32), 10)
    assert spec.arch == "preact_resnet18" and spec.kwargs == {
        "num_classes": 10,
        "in_channels": 3,
        "width": 64,
    }
    assert default_spec(TrainConfig(arch="preact_resnet18", width=8), (1, 8, 8), 4).kwargs["width"] == 8


def test_train_with_a_user_attack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(HERE))
    meta = train_backdoored(
        TrainConfig(attack="fire_test_triggers:stripes", epochs=1, train_subset=64, width=4),
        tmp_path / "custom",
        progress=False,
    )
    assert meta.attack == "fire_test_triggers:stripes"
    assert load_checkpoint(tmp_path / "custom")[1].attack == meta.attack


def test_data_export(tiny_checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, meta = tiny_checkpoint
    assert (
        main(
            [
                "data",
                "export",
                "--checkpoint",
                str(out),
                "--n",
                "7",
                "--out",
                str(tmp_path / "c.npz"),
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {
        "out": str(tmp_path / "c.npz"),
        "n": 7,
        "requested": 7,
        "excluded": 0,
    }
    with np.load(tmp_path / "c.npz") as clean:
        assert clean["x"].dtype == np.uint8 and clean["x"].shape == (7, 8, 8, 1)
        assert clean["y"].dtype == np.int64 and not clean["poisoned"].any()
        from fire_backend.data import load_dataset

        digits = load_dataset("digits")
        first = evaluation_indices(digits.y_test)[:7]  # the reserve excluded, in the split's draw order
        assert np.array_equal(clean["x"], digits.x_test[first])
    assert (
        main(
            [
                "data",
                "export",
                "--checkpoint",
                str(out),
                "--poisoned",
                "--n",
                "5",
                "--out",
                str(tmp_path / "p.npz"),
            ]
        )
        == 0
    )
    with np.load(tmp_path / "p.npz") as poisoned:
        assert poisoned["x"].shape == (5, 8, 8, 1) and poisoned["poisoned"].all()
        assert (poisoned["y"] != meta.target).all()


def test_accuracy_figures_count_only_non_target_for_pa_and_asr() -> None:
    y = torch.tensor([0, 1, 2, 3])
    clean = torch.tensor([0, 1, 2, 0])
    poison_y = y[y != 0]  # target 0: only the other images carry the trigger
    poison = torch.tensor([0, 2, 3])
    m = accuracy_figures(clean, y, poison, poison_y, target=0)
    assert m.ca == 0.75
    assert m.pa == pytest.approx(2 / 3) and m.asr == pytest.approx(1 / 3)


def test_shrinkpad_keeps_shape_and_is_seeded() -> None:
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(shrinkpad_defense(x, seed=1), shrinkpad_defense(x, seed=1))
    out = shrink_pad(x, 4, 0, 0)
    assert out.shape == x.shape and torch.equal(out[..., 28:, :], torch.zeros(4, 3, 4, 32))


def test_detector_tpr() -> None:
    clean = torch.linspace(0, 1, 101)
    tpr, threshold = detector_tpr(clean, torch.tensor([0.5, 2.0, 3.0, 0.1]))
    assert threshold == pytest.approx(0.99)
    assert tpr == 0.5
