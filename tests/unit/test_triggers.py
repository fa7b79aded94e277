"""The triggers beyond the generic checks of test_data.py: parameters, size-agnostic patterns, sample-specific and
warping triggers, trigger files, and the trigger-breaking twins the ranking compares against."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fire_backend.data import ATTACKS, resolve_attack
from fire_backend.data.augment import TWINS, center_crop, gaussian_blur, jpeg_like
from fire_backend.data.trigger_file import TRIGGER_PREFIX, write_trigger
from fire_backend.data.triggers import (
    input_aware_cross,
    input_aware_parts,
    label_consistent,
    low_frequency_pattern,
    wanet,
    wanet_noise,
    warp_grid,
)
from fire_backend.defaults import ATTACK_NAMES

SHAPES = ((2, 1, 8, 8), (2, 3, 32, 32), (2, 3, 24, 40), (2, 3, 64, 64))


def images(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Smooth random images (a low-resolution noise upsampled): natural-ish content a warp visibly moves."""
    n, c, h, w = shape
    coarse = torch.rand(n, c, max(2, h // 4), max(2, w // 4), generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)


def test_every_builtin_name_has_its_function() -> None:
    assert tuple(ATTACKS) == ATTACK_NAMES


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_triggers_are_size_agnostic_deterministic_and_change_the_image(name: str, shape: tuple[int, ...]) -> None:
    x = images(shape)
    attack = resolve_attack(name)
    torch.manual_seed(123)
    out = attack(x)
    torch.manual_seed(456)  # no global random state is read
    assert torch.equal(attack(x), out)
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert bool(((out - x).abs().flatten(1).amax(1) > 1e-3).all())


def test_parameters_in_the_name() -> None:
    x = images((2, 3, 32, 32))
    faint = resolve_attack("blended(ratio=0.05)")
    assert torch.allclose(faint(x), ATTACKS["blended"](x, ratio=0.05))
    assert faint.__name__ == "blended(ratio=0.05)"
    small = resolve_attack(" badnets( size = 2 ) ")
    changed = (small(x) != x).any(1)[0]
    assert changed[-2:, -2:].all() and not changed[:-2].any() and not changed[:, :-2].any()
    assert torch.allclose(resolve_attack("wanet(strength=1.0, grid=4)")(x), wanet(x, strength=1.0, grid=4))


@pytest.mark.parametrize("name,message", [
    ("blended(alpha=0.1)", "KEY=VALUE with KEY one of ratio"),
    ("blended(ratio=much)", "ratio must be a number"),
    ("blended(0.1)", "KEY=VALUE"),
    ("nosuch(ratio=0.1)", "unknown attack"),
])
def test_bad_parameters_are_refused(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        resolve_attack(name)


@pytest.mark.parametrize("call,message", [
    (lambda x: resolve_attack("badnets(size=40)")(x), "patch side"),
    (lambda x: resolve_attack("blended(ratio=0)")(x), "ratio"),
    (lambda x: label_consistent(x, size=20), "four 20-pixel corners"),
])
def test_trigger_parameters_out_of_range_fail_clearly(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(images((1, 3, 32, 32)))


def test_wanet_moves_pixels_by_about_half_a_pixel_and_noise_mode_differs() -> None:
    grid = warp_grid(32, 32)
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    moved = (grid[0] - torch.stack([cols, rows], -1)).abs() * 32 / 2  # in pixels
    assert 0.1 < float(moved.mean()) < 1.0 and float(moved.max()) < 2.0
    x = images((4, 3, 32, 32))
    a = wanet_noise(x, torch.Generator().manual_seed(0))
    b = wanet_noise(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)  # reproducible from its generator
    assert not torch.allclose(a, wanet(x), atol=1e-4)
    assert float((wanet(x, strength=1.0) - x).abs().mean()) > float((wanet(x) - x).abs().mean())


def test_input_aware_trigger_is_specific_to_each_image() -> None:
    x = images((6, 3, 32, 32))
    pattern, mask = input_aware_parts(x)
    assert mask.shape == (6, 1, 32, 32) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(mask.sum((1, 2, 3)), torch.full((6,), round(0.032 * 1024), dtype=torch.float), atol=2)
    assert not torch.equal(mask[0], mask[1]) and not torch.allclose(pattern[0], pattern[1])
    donors = x.roll(1, 0)
    crossed = input_aware_cross(x, donors)
    assert not torch.allclose(crossed, resolve_attack("input_aware")(x))
    _, donor_mask = input_aware_parts(donors)
    assert bool(((crossed != x).any(1, keepdim=True) <= donor_mask.bool()).all())  # only where the donor's mask is


def test_low_frequency_pattern_has_no_high_frequencies() -> None:
    pattern = low_frequency_pattern(3, 32, 32, amplitude=0.1)
    assert torch.isclose(pattern.abs().max(), torch.tensor(0.1))

    def high_share(image: torch.Tensor) -> float:
        """Energy above a quarter of the sampling rate on either axis (a smooth non-periodic image still leaks
        a little through its borders)."""
        energy = torch.fft.rfft2(image - image.mean((1, 2), keepdim=True)).abs() ** 2
        return float((energy[:, 8:25, :].sum() + energy[:, :, 8:].sum()) / energy.sum())

    assert high_share(pattern) < 0.03
    assert high_share(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))) > 0.5


def test_label_consistent_marks_all_four_corners() -> None:
    x = torch.full((1, 1, 32, 32), 0.5)
    changed = (label_consistent(x) != x)[0, 0]
    for rows in (slice(0, 3), slice(-3, None)):
        for cols in (slice(0, 3), slice(-3, None)):
            assert changed[rows, cols].all()
    assert not changed[4:-4].any() and not changed[:, 4:-4].any()
    half = label_consistent(x, amplitude=0.5)
    assert torch.allclose(half[0, 0, 0, 0], torch.tensor(0.75))


def test_trigger_file_round_trip_resized_and_to_grayscale(tmp_path: Path) -> None:
    pattern = np.zeros((3, 32, 32), np.float32)
    pattern[0, -6:, -6:] = 1.0  # a red square
    mask = np.zeros((1, 32, 32), np.float32)
    mask[:, -6:, -6:] = 1.0
    path = tmp_path / "trigger.npz"
    write_trigger(path, pattern, mask)
    trigger = resolve_attack(f"{TRIGGER_PREFIX}{path}")
    x = images((2, 3, 32, 32))
    out = trigger(x)
    assert torch.equal(out[..., :-6, :], x[..., :-6, :]) and torch.allclose(out[:, 0, -5:, -5:], torch.ones(2, 5, 5))
    assert torch.allclose(out[:, 1, -5:, -5:], torch.zeros(2, 5, 5))
    assert trigger(images((2, 3, 64, 64))).shape == (2, 3, 64, 64)
    gray = trigger(torch.zeros(1, 1, 8, 8))
    assert 0.25 < float(gray[0, 0, -1, -1]) < 0.35  # the red square's luminance
    assert resolve_attack(f"{TRIGGER_PREFIX}{path}") is trigger  # cached per file


@pytest.mark.parametrize("pattern,mask,message", [
    (np.zeros((3, 8, 8)), np.zeros((1, 4, 4)), "of one size"),
    (np.full((3, 8, 8), 2.0), np.zeros((1, 8, 8)), "pattern must hold finite values in"),
    (np.zeros((3, 8, 8)), np.full((1, 8, 8), np.nan), "mask must hold"),
])
def test_trigger_file_rejects_bad_arrays(tmp_path: Path, pattern, mask, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_trigger(tmp_path / "t.npz", pattern, mask)
    assert not (tmp_path / "t.npz").exists()


def test_trigger_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such trigger file"):
        resolve_attack(f"{TRIGGER_PREFIX}{tmp_path / 'missing.npz'}")
    path = tmp_path / "two.npz"
    write_trigger(path, np.zeros((2, 8, 8)), np.ones((1, 8, 8)))
    with pytest.raises(ValueError, match="2-channel trigger cannot go onto 3-channel"):
        resolve_attack(f"{TRIGGER_PREFIX}{path}")(torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("shape", SHAPES)
def test_twins_keep_the_shape_and_break_fine_patterns(shape: tuple[int, ...]) -> None:
    x = images(shape)
    for name, twin in TWINS.items():
        out = twin(x)
        assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1, name
    checker = ATTACKS["badnets"](torch.full((1, 3, 32, 32), 0.5)) - 0.5
    assert float(gaussian_blur(checker + 0.5).sub(0.5).abs().max()) < 0.5 * float(checker.abs().max())
    assert torch.allclose(jpeg_like(x, keep=8), x, atol=1e-5)  # keeping every coefficient keeps the image
    flat = torch.full((1, 3, 32, 32), 0.3)
    for twin in (gaussian_blur, jpeg_like, center_crop):
        assert torch.allclose(twin(flat), flat, atol=1e-5)
