"""Data loaders (digits, .npz, CIFAR-10 batches folder), tensor conversions and backdoor attacks."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis.extra import numpy as hnp

from fire_backend.data import ATTACKS, Dataset, load_dataset, resolve_attack, to_tensor, to_uint8
from fire_backend.data.datasets import load_cifar10_folder, load_digits, load_npz
from fire_backend.defaults import DIGITS_TEST_SIZE

HERE = Path(__file__).resolve().parent


# --- digits ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits()


def test_digits_shapes_and_dtypes(digits: Dataset) -> None:
    assert digits.name == "digits"
    assert digits.x_train.shape == (1797 - DIGITS_TEST_SIZE, 8, 8, 1)
    assert digits.x_test.shape == (DIGITS_TEST_SIZE, 8, 8, 1)
    assert digits.x_train.dtype == digits.x_test.dtype == np.uint8
    assert digits.y_train.dtype == digits.y_test.dtype == np.int64
    assert digits.y_train.shape == (len(digits.x_train),)
    assert digits.x_train.max() == 255 and digits.x_train.min() == 0
    assert digits.num_classes == 10
    assert digits.input_shape == (1, 8, 8)
    counts = np.bincount(digits.y_test, minlength=10)
    assert counts.min() >= 55 and counts.max() <= 65  # stratified


def test_digits_split_is_fixed(digits: Dataset) -> None:
    again = load_dataset("digits")
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(digits, name), getattr(again, name))


def test_dataset_split_accessor(digits: Dataset) -> None:
    x, y = digits.split("test")
    assert x is digits.x_test and y is digits.y_test
    assert digits.split("train")[0] is digits.x_train
    with pytest.raises(ValueError, match="train"):
        digits.split("validation")


# --- conversions -------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=4, max_dims=4, min_side=1, max_side=6)))
def test_to_tensor_to_uint8_round_trip(x: np.ndarray) -> None:
    t = to_tensor(x)
    n, h, w, c = x.shape
    assert t.shape == (n, c, h, w)
    assert t.dtype == torch.float32 and t.is_contiguous()
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    assert torch.equal(t[:, :, 0, 0], torch.from_numpy(x[:, 0, 0, :].astype(np.float32) / 255.0))
    back = to_uint8(t)
    assert back.dtype == np.uint8 and back.shape == x.shape
    assert np.array_equal(back, x)


def test_to_tensor_accepts_non_contiguous_and_to_uint8_clamps() -> None:
    x = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)[:, ::2]
    assert np.array_equal(to_uint8(to_tensor(x)), x)
    out = to_uint8(torch.tensor([-0.5, 0.0, 0.5, 1.0, 7.0]).reshape(1, 1, 1, 5))
    assert out.reshape(-1).tolist() == [0, 0, 128, 255, 255]


# --- .npz and CIFAR-10 folders ----------------------------------------------------------------


def write_npz(path: Path, **overrides) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8),
        "y_train": rng.integers(0, 3, 6).astype(np.int32),
        "x_test": rng.integers(0, 256, (4, 4, 4, 3), dtype=np.uint8),
        "y_test": np.array([0, 1, 2, 1], dtype=np.uint8),
    }
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_load_npz_reads_the_four_arrays(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "data.npz")
    data = load_npz(path)
    assert data.x_train.shape == (6, 4, 4, 3) and data.x_test.shape == (4, 4, 4, 3)
    assert data.y_train.dtype == data.y_test.dtype == np.int64
    assert data.input_shape == (3, 4, 4)
    assert data.num_classes == 3
    via_spec = load_dataset(f"npz:{path}")
    assert np.array_equal(via_spec.x_train, data.x_train)
    assert np.array_equal(load_dataset(f"cifar10:{path}").y_test, [0, 1, 2, 1])


def test_load_npz_rejects_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="missing arrays"):
        load_npz(write_npz(tmp_path / "missing.npz", y_test=None))
    with pytest.raises(ValueError, match="uint8"):
        load_npz(write_npz(tmp_path / "float.npz", x_train=np.zeros((6, 4, 4, 3), dtype=np.float32)))
    with pytest.raises(ValueError, match="uint8"):
        load_npz(write_npz(tmp_path / "nchw3d.npz", x_test=np.zeros((4, 4, 4), dtype=np.uint8)))
    with pytest.raises(ValueError, match="labels"):
        load_npz(write_npz(tmp_path / "labels.npz", y_train=np.zeros(5, dtype=np.int64)))
    with pytest.raises(FileNotFoundError):
        load_npz(tmp_path / "absent.npz")


def write_cifar_folder(root: Path, per_batch: int = 3, test: int = 4) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", test)]:
        batch = {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)],
        }
        with (folder / name).open("wb") as handle:
            pickle.dump(batch, handle, protocol=2)
    return folder


def test_cifar10_folder_loader(tmp_path: Path) -> None:
    folder = write_cifar_folder(tmp_path)
    data = load_dataset(f"cifar10:{folder}")
    assert data.x_train.shape == (15, 32, 32, 3) and data.x_test.shape == (4, 32, 32, 3)
    assert data.x_train.dtype == np.uint8 and data.x_train.flags.c_contiguous
    assert data.y_train.dtype == np.int64 and data.y_train.shape == (15,)
    assert data.input_shape == (3, 32, 32)
    with (folder / "data_batch_2").open("rb") as handle:
        raw = pickle.load(handle, encoding="bytes")
    # the rows are channel-major: 1024 red, 1024 green, 1024 blue, each row by row
    first = raw[b"data"][0]
    image = data.x_train[3]
    assert image[0, 0, 0] == first[0] and image[0, 0, 1] == first[1024] and image[0, 0, 2] == first[2048]
    assert image[1, 2, 0] == first[32 + 2] and image[31, 31, 2] == first[3071]
    assert np.array_equal(image, first.reshape(3, 32, 32).transpose(1, 2, 0))
    assert data.y_train[3:6].tolist() == raw[b"labels"]
    assert np.array_equal(load_cifar10_folder(folder).x_test, data.x_test)


def test_cifar10_folder_loader_names_missing_files(tmp_path: Path) -> None:
    folder = write_cifar_folder(tmp_path)
    (folder / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        load_dataset(f"cifar10:{folder}")


@pytest.mark.parametrize("spec", ["mnist", "", "cifar100:/tmp/x", "npz:", "imagenet:somewhere"])
def test_load_dataset_rejects_unknown_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="digits, cifar10:PATH or npz:PATH"):
        load_dataset(spec)


# --- attacks -------------------------------------------------------------------------------------


IMAGES = {
    "digits": torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
    "cifar": torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
}


@pytest.mark.parametrize("images", sorted(IMAGES))
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_builtin_attacks(name: str, images: str) -> None:
    x = IMAGES[images]
    before = x.clone()
    attack = resolve_attack(name)
    assert attack is ATTACKS[name]
    out = attack(x)
    assert torch.equal(x, before)  # the input is not modified
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert (out - x).abs().amax(dim=(1, 2, 3)).min() > 0.01  # every image changed
    assert torch.equal(attack(x), out)  # deterministic
    assert torch.equal(attack(x.clone()), out)
    for i in range(len(x)):  # batch-independent: the same trigger per image at any batch size
        assert torch.allclose(attack(x[i : i + 1]), out[i : i + 1], atol=1e-6)
    assert torch.equal(attack(torch.zeros(0, *x.shape[1:])), torch.zeros(0, *x.shape[1:]))


#: triggers that move an image's content rather than add to it: a constant image has nothing to move
CONTENT_MOVING = {"wanet"}


def test_attacks_extreme_images_stay_in_range() -> None:
    for name, attack in ATTACKS.items():
        for fill in (0.0, 1.0):
            out = attack(torch.full((2, 3, 32, 32), fill))
            assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0, name
            same = torch.allclose(out, torch.full_like(out, fill), atol=1e-5)
            assert same == (name in CONTENT_MOVING), name


def test_badnets_patch_is_in_the_bottom_right_corner() -> None:
    x = torch.full((1, 1, 8, 8), 0.5)
    out = ATTACKS["badnets"](x)
    changed = (out != x)[0, 0]
    rows, cols = torch.nonzero(changed, as_tuple=True)
    assert rows.min() >= 5 and cols.min() >= 5
    assert torch.equal(out[..., :5, :], x[..., :5, :])


def test_resolve_attack_imports_a_user_function(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(HERE))
    import fire_test_triggers

    attack = resolve_attack("fire_test_triggers:stripes")
    assert attack is fire_test_triggers.stripes
    x = IMAGES["digits"]
    out = attack(x)
    assert out.shape == x.shape and torch.equal(out[..., 0, :], torch.ones_like(out[..., 0, :]))
    assert resolve_attack("torch.nn.functional:relu") is torch.nn.functional.relu


@pytest.mark.parametrize(
    "name,message",
    [
        ("trojan", "unknown attack 'trojan'"),
        ("", "unknown attack"),
        ("fire_test_triggers:", "unknown attack"),
        ("no_such_module_anywhere:fn", "cannot import"),
        ("fire_test_triggers:missing", "cannot import"),
        ("fire_test_triggers:NOT_CALLABLE", "not callable"),
    ],
)
def test_resolve_attack_rejects_bad_names(monkeypatch: pytest.MonkeyPatch, name: str, message: str) -> None:
    monkeypatch.syspath_prepend(str(HERE))
    with pytest.raises(ValueError, match=message) as info:
        resolve_attack(name)
    if message == "unknown attack":
        assert "badnets" in str(info.value) and "package.module:function" in str(info.value)
