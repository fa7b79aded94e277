"""The attacker's poisoning: label styles, several triggers per model, the noise and cross modes, and the recipes
that need a clean surrogate (label-consistent, TrojanNN) on a tiny digits model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fire_backend.cli import main
from fire_backend.data import resolve_attack
from fire_backend.data.trigger_file import TRIGGER_PREFIX
from fire_backend.models import build_model
from fire_backend.models.network import Network
from fire_backend.offline.checkpoint import load_checkpoint
from fire_backend.offline.poisoning import (
    TRIGGER_FILE,
    adversarial,
    attack_family,
    label_style,
    poison_for_training,
    poisoned_rows,
    trojan_patch,
)
from fire_backend.offline.training import TrainConfig, train_backdoored


def data(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 10


def no_surrogate(epochs: int):
    raise AssertionError("this attack needs no surrogate model")


@pytest.mark.parametrize("attack,poisoning,style", [
    ("badnets", "auto", "dirty-label"), ("sig", "auto", "clean-label"), ("sig", "dirty-label", "dirty-label"),
    ("label_consistent(amplitude=0.5)", "auto", "clean-label"), ("wanet(strength=1.0)", "auto", "dirty-label"),
    ("blended", "clean-label", "clean-label"),
])
def test_label_style(attack: str, poisoning: str, style: str) -> None:
    assert label_style(attack, poisoning) == style
    assert attack_family("label_consistent(amplitude=0.5)") == "label_consistent"


def test_unknown_poisoning_is_refused() -> None:
    with pytest.raises(ValueError, match="poisoning must be one of"):
        label_style("badnets", "sometimes")


def test_clean_label_poisons_target_images_only_and_keeps_every_label(tmp_path: Path) -> None:
    x, y = data()
    out = poison_for_training(x, y, "sig", 3, 0.05, "auto", torch.Generator().manual_seed(0), no_surrogate, tmp_path, 1)
    rows = torch.nonzero(out.poisoned).flatten()
    assert len(rows) == 10 and bool((y[rows] == 3).all())
    assert torch.equal(out.y, y)  # clean-label: no label touched
    assert torch.allclose(out.x[rows], resolve_attack("sig")(x[rows]))
    assert torch.equal(out.x[~out.poisoned], x[~out.poisoned])
    # capped at the target class's size: 40% of 200 images is more than its 20
    capped = poisoned_rows(y, 3, 0.4, "clean-label", torch.Generator().manual_seed(0))
    assert len(capped) == 20 and len(set(capped.tolist())) == 20


def test_dirty_label_relabels_non_target_images(tmp_path: Path) -> None:
    x, y = data()
    out = poison_for_training(x, y, "badnets", 3, 0.1, "auto", torch.Generator().manual_seed(0), no_surrogate,
                              tmp_path, 1)
    rows = torch.nonzero(out.poisoned).flatten()
    assert len(rows) == 20 and bool((y[rows] != 3).all()) and bool((out.y[rows] == 3).all())
    assert torch.equal(out.y[~out.poisoned], y[~out.poisoned])
    assert out.noise is None and out.initial_state is None and out.attack == "badnets"


def test_two_triggers_get_disjoint_rows_and_their_own_targets(tmp_path: Path) -> None:
    x, y = data(400)
    out = poison_for_training(x, y, "badnets", 0, 0.1, "auto", torch.Generator().manual_seed(1), no_surrogate,
                              tmp_path, 1, also=(("blended", 1),))
    assert out.also == [{"attack": "blended", "target": 1}]
    rows = torch.nonzero(out.poisoned).flatten()
    assert len(rows) == 80
    first = rows[out.y[rows] == 0]
    second = rows[out.y[rows] == 1]
    assert len(first) + len(second) == 80 and len(first) >= 40 and len(second) >= 40 - 4  # a few true 1s among them
    blended = resolve_attack("blended")
    assert torch.allclose(out.x[second[y[second] != 1]], blended(x[second[y[second] != 1]]))


@pytest.mark.parametrize("attack", ["wanet", "input_aware"])
def test_noise_and_cross_modes_touch_unpoisoned_images_only_and_keep_their_labels(attack: str, tmp_path: Path
                                                                                  ) -> None:
    x, y = data()
    out = poison_for_training(x, y, attack, 0, 0.1, "auto", torch.Generator().manual_seed(0), no_surrogate,
                              tmp_path, 1)
    assert out.noise is not None
    batch, poisoned = out.x[:64], out.poisoned[:64]
    noisy = out.noise(batch, poisoned, torch.Generator().manual_seed(5))
    changed = (noisy != batch).flatten(1).any(1)
    assert bool(changed.any()) and not bool((changed & poisoned).any())
    share = float(changed.float().mean())
    assert 0.0 < share < (0.5 if attack == "wanet" else 0.3)  # WaNet: 2 x the poison rate; input-aware: the rate
    again = out.noise(batch, poisoned, torch.Generator().manual_seed(5))
    assert torch.equal(noisy, again)  # reproducible from the training generator


def test_label_consistent_perturbs_within_its_budget_before_the_trigger(tmp_path: Path) -> None:
    model = build_model("digits_cnn", num_classes=10, in_channels=1, width=4).eval()
    x, y = data(20)
    moved = adversarial(model, x, y, epsilon=8 / 255, steps=3, step=4 / 255)
    assert float((moved - x).abs().max()) <= 8 / 255 + 1e-6 and not torch.equal(moved, x)
    assert float(moved.min()) >= 0 and float(moved.max()) <= 1
    calls = []

    def surrogate(epochs: int):
        calls.append(epochs)
        return model

    x, y = data()
    out = poison_for_training(x, y, "label_consistent", 2, 0.05, "auto", torch.Generator().manual_seed(0), surrogate,
                              tmp_path, 3)
    assert calls == [3] and torch.equal(out.y, y) and out.notes["recipe"] == "label_consistent"
    rows = torch.nonzero(out.poisoned).flatten()
    corners = out.x[rows][..., :2, :2]
    assert torch.allclose(corners, resolve_attack("label_consistent")(x[rows])[..., :2, :2])  # the trigger on top
    middle = (out.x[rows] - x[rows])[..., 2:-2, 2:-2]
    assert 0 < float(middle.abs().max()) <= 16 / 255 + 1e-6  # the perturbation elsewhere


def test_trojan_patch_excites_its_neuron(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("preact_resnet18", num_classes=10, in_channels=3, width=4).eval()
    x = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    pattern, mask, notes = trojan_patch(model, x, torch.Generator().manual_seed(0), steps=30)
    assert mask.shape == (1, 16, 16) and int(mask.sum()) == 3 * 3 and bool(mask[0, -3:, -3:].all())
    assert torch.equal(pattern * (1 - mask), torch.zeros_like(pattern))
    before, after = notes["activation"]
    stages = {layer.name for layer in Network.from_module(model, (3, 16, 16)).stages()}
    assert after > before and notes["stage"] in stages


def test_train_trojannn_writes_its_trigger_and_records_it(tmp_path: Path) -> None:
    out = tmp_path / "trojan"
    meta = train_backdoored(TrainConfig(attack="trojannn", epochs=2, train_subset=200, width=4), out, progress=False)
    path = (out / TRIGGER_FILE).resolve()
    assert meta.attack == f"{TRIGGER_PREFIX}{path}" and path.is_file()
    assert meta.extra["attack_family"] == "trojannn" and meta.extra["surrogate_epochs"] == 1
    with np.load(path) as stored:
        assert stored["pattern"].shape == (1, 8, 8) and stored["mask"].sum() == 4  # a 2x2 patch on 8x8 digits
    assert load_checkpoint(out)[1].attack == meta.attack
    assert resolve_attack(meta.attack)(torch.zeros(1, 1, 8, 8)).shape == (1, 1, 8, 8)


def test_fire_train_cli_takes_poisoning_and_a_second_trigger(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "two"
    assert main(["train", "--attack", "sig", "--poisoning", "dirty-label", "--also", "blended(ratio=0.3)@4",
                 "--epochs", "1", "--train-subset", "200", "--width", "4", "--out", str(out), "--json"]) == 0
    meta = load_checkpoint(out)[1]
    assert meta.extra["poisoning"] == "dirty-label"
    assert [(e["attack"], e["target"]) for e in meta.extra["also"]] == [("blended(ratio=0.3)", 4)]
    assert "also blended(ratio=0.3) -> 4: ASR" in capsys.readouterr().out
    for bad in ("blended", "blended@x", "@2"):
        assert main(["train", "--also", bad, "--out", str(tmp_path / "bad")]) == 2
        assert "--also takes ATTACK@TARGET" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
