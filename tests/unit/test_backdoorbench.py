"""`fire import backdoorbench`: a file in BackdoorBench's v2 attack-result layout, made here, imports and
evaluates end to end on its stored poisoned images; malformed files fail with a clear ValueError.

The file mirrors what BackdoorBench's ``save_attack_result`` writes: model_name, num_classes, the state
dict of a (width 64, random) PreActResNet18, data_path, img_size, clean_data, bd_train and bd_test, with
bd_test the state of a ``prepro_cls_DatasetBD_v2`` (PIL images in a bd_data_container keyed by numpy
indices, original_index_array, poison_indicator).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fire_backend.cli import main
from fire_backend.data import resolve_attack, to_tensor, to_uint8
from fire_backend.data.stored import stored_attack
from fire_backend.defaults import RESERVE, evaluation_indices
from fire_backend.models import MobileNetV3Large, PreActResNet18
from fire_backend.models.spec import load_network_file
from fire_backend.offline.backdoorbench import (
    NORMALIZATION,
    POISONED_FILE,
    import_backdoorbench,
    load_attack_result,
)
from fire_backend.offline.checkpoint import load_checkpoint
from fire_backend.offline.evaluation import batched
from fire_backend.repository.layout import FULL_FILE, ServingSettings

TARGET = 0
# A width-64 PreActResNet18 is slow on a CPU: few images, most of them in the target class, so that the
# defender's reserve holds few flagged samples and `fire eval`'s streaming curve stays short.
N_TEST = RESERVE + 60
N_POISONED = 20  # all non-target test images: what an all-to-one bd_test holds


def poison(image: np.ndarray) -> np.ndarray:
    """The fake attack: a white 4x4 square in the top-left corner (not one of fire's triggers)."""
    out = image.copy()
    out[:4, :4] = 255
    return out


@pytest.fixture(scope="module")
def clean_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x_test = rng.integers(0, 256, (N_TEST, 32, 32, 3), dtype=np.uint8)
    y_test = np.full(N_TEST, TARGET, dtype=np.int64)
    y_test[np.linspace(0, N_TEST - 1, N_POISONED).astype(int)] = np.arange(N_POISONED) % 9 + 1
    path = tmp_path_factory.mktemp("clean") / "clean.npz"
    np.savez(path, x_train=x_test[:20], y_train=y_test[:20], x_test=x_test, y_test=y_test)
    return path, x_test, y_test


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return PreActResNet18(num_classes=10, width=64).state_dict()


def bd_test_state(x_test: np.ndarray, y_test: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """prepro_cls_DatasetBD_v2.retrieve_state() of an all-to-one bd_test kept in memory."""
    chosen = np.flatnonzero(y_test != TARGET)
    indicator = np.zeros(len(y_test))  # BackdoorBench's poison indicator is a float array
    indicator[chosen] = 1
    bd_labels = np.full(len(y_test), TARGET) if labels is None else labels
    data_dict = {
        np.int64(i): (Image.fromarray(poison(x_test[i])), int(bd_labels[i]), int(y_test[i])) for i in chosen
    }
    return {
        "bd_data_container": {"save_folder_path": None, "data_dict": data_dict, "save_file_format": ".png"},
        "getitem_all": True,
        "getitem_all_switch": False,
        "original_index_array": chosen,
        "poison_indicator": indicator,
        "save_folder_path": None,
    }


def attack_result(weights: dict, x_test: np.ndarray, y_test: np.ndarray, **changes) -> dict:
    result = {
        "model_name": "preactresnet18",
        "num_classes": 10,
        "model": dict(weights),
        "data_path": "./data",
        "img_size": [32, 32, 3],
        "clean_data": "cifar10",
        "bd_train": None,
        "bd_test": bd_test_state(x_test, y_test),
    }
    result.update(changes)
    return result


def save(result: dict, path: Path) -> Path:
    torch.save(result, path)
    return path


def run_json(capsys: pytest.CaptureFixture, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_import_and_eval_end_to_end(clean_data, weights, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data_path, x_test, y_test = clean_data
    source = save(attack_result(weights, x_test, y_test), tmp_path / "attack_result.pt")
    checkpoint = tmp_path / "imported"
    summary = run_json(capsys, ["import", "backdoorbench", str(source), "--data", f"npz:{data_path}",
                                "--out", str(checkpoint), "--json"])
    non_target = np.flatnonzero(y_test != TARGET)
    assert summary["poisoned"] == len(non_target) == N_POISONED
    assert summary["uncovered"] == 0 and summary["warnings"] == [] and summary["target"] == TARGET

    model, meta = load_checkpoint(checkpoint)
    assert meta.spec.arch == "preact_resnet18" and meta.spec.input_shape == (3, 32, 32)
    assert meta.spec.kwargs["width"] == 64 and meta.target == TARGET and meta.dataset == f"npz:{data_path}"
    assert meta.attack == f"stored:{(checkpoint / POISONED_FILE).resolve()}"
    assert meta.extra["source"] == "backdoorbench" and meta.extra["poisoned_test"] == N_POISONED

    # Same function as BackdoorBench's model on its normalized input: the normalization is folded in.
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION["cifar10"])
    reference = PreActResNet18(num_classes=10, width=64)
    reference.load_state_dict(weights)
    reference.eval()
    x = to_tensor(x_test[:8])
    with torch.inference_mode():
        assert torch.allclose(model(x), reference((x - mean) / std), atol=1e-4)

    # The stored set replaces exactly the non-target clean images by the attacker's copies.
    with np.load(checkpoint / POISONED_FILE) as stored:
        assert stored["x"].dtype == np.uint8 and stored["x"].shape == (N_POISONED, 32, 32, 3)
        assert np.array_equal(stored["index"], non_target) and np.array_equal(stored["y"], y_test[non_target])
    attack = resolve_attack(meta.attack)
    expected = x_test.copy()
    expected[non_target] = np.stack([poison(img) for img in x_test[non_target]])
    assert np.array_equal(to_uint8(attack(to_tensor(x_test[non_target]))), expected[non_target])
    # A target-class image has no poisoned copy: an error, never the clean image passed off as poisoned.
    with pytest.raises(ValueError, match="1 of 2 images have no poisoned copy in the stored attack"):
        attack(to_tensor(x_test[[non_target[0], int(np.flatnonzero(y_test == TARGET)[0])]]))

    out = tmp_path / "eval"
    report = run_json(capsys, ["eval", "--checkpoint", str(checkpoint), "--clean", "20", "--flagged", "5",
                               "--out", str(out), "--json"])
    rows = {row["method"]: row for row in report["rows"]}
    assert report["layer"] == "layer4.0" and "fire-unpaired-projection" in rows and "shrinkpad" in rows
    # The undefended figures are the model's on the stored poisoned images of the evaluation split.
    evaluated = evaluation_indices(y_test)
    eval_x, eval_y = x_test[evaluated], y_test[evaluated]
    keep = eval_y != TARGET
    assert report["defender"]["evaluated"] == len(evaluated) and report["defender"]["flagged"] == 5
    with torch.inference_mode():
        clean_pred = batched(model, to_tensor(eval_x)).argmax(1).numpy()
        poison_pred = batched(model, to_tensor(expected[evaluated][keep])).argmax(1).numpy()
    assert rows["undefended"]["ca"] == pytest.approx(float((clean_pred == eval_y).mean()))
    assert rows["undefended"]["asr"] == pytest.approx(float((poison_pred == TARGET).mean()))
    assert rows["undefended"]["pa"] == pytest.approx(float((poison_pred == eval_y[keep]).mean()))
    for row in rows.values():
        assert 0.0 <= row["ca"] <= 1.0 and 0.0 <= row["pa"] <= 1.0 and 0.0 <= row["asr"] <= 1.0
    assert (out / "eval.csv").is_file() and (out / "streaming.png").is_file()

    # A servable repository: the network the stages cut carries the input normalization (head and tail compose
    # to the model).
    repository = tmp_path / "repository"
    assert main(["repo", "build", "--checkpoint", str(checkpoint), "--out", str(repository), "--flagged", "3"]) == 0
    full, _, _ = load_network_file(repository / "artifacts" / FULL_FILE)
    head, tail = full.cut("layer4.0")
    with torch.inference_mode():
        assert torch.allclose(tail(head(x)), model(x), atol=1e-4)

    # Exports for clients and load tests carry the attack's own poisoned images too.
    run_json(capsys, ["data", "export", "--checkpoint", str(checkpoint), "--poisoned", "--n", "3",
                      "--out", str(tmp_path / "poisoned.npz"), "--json"])
    with np.load(tmp_path / "poisoned.npz") as exported:
        assert np.array_equal(exported["x"], expected[evaluated][keep][:3])


def test_measure_leaves_out_and_counts_images_without_a_poisoned_copy(
    clean_data, weights, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bd_test lacking some non-target images: --measure's ASR is over the covered ones, the rest counted."""
    data_path, x_test, y_test = clean_data
    state = bd_test_state(x_test, y_test)
    dropped = state["original_index_array"][:3]
    state["original_index_array"] = state["original_index_array"][3:]
    state["poison_indicator"][dropped] = 0
    source = save(attack_result(weights, x_test, y_test, bd_test=state), tmp_path / "attack_result.pt")
    argv = ["import", "backdoorbench", str(source), "--data", f"npz:{data_path}", "--measure"]
    if not torch.cuda.is_available():  # the double: torch reports a GPU; --device auto must go for it
        with monkeypatch.context() as patch:
            patch.setattr(torch.cuda, "is_available", lambda: True)
            with pytest.raises(AssertionError, match="not compiled with CUDA"):
                main([*argv, "--out", str(tmp_path / "gpu")])
        assert not (tmp_path / "gpu").exists()
    summary = run_json(capsys, [*argv, "--device", "cpu", "--batch-size", "32", "--out", str(tmp_path / "out"),
                                "--json"])
    assert summary["uncovered"] == 3 and summary["measure_excluded"] == 3
    model, meta = load_checkpoint(tmp_path / "out")
    assert meta.extra["measured"] == {"images": N_TEST, "poisoned": N_POISONED - 3, "excluded": 3}
    covered = np.flatnonzero(y_test != TARGET)[3:]
    with torch.inference_mode():
        poison_pred = batched(model, to_tensor(np.stack([poison(img) for img in x_test[covered]]))).argmax(1)
    assert summary["asr"] == pytest.approx(float((poison_pred == TARGET).float().mean()))


def test_dataparallel_prefix_and_disk_images(clean_data, weights, tmp_path: Path) -> None:
    """``module.`` keys (DataParallel) and a bd_test whose images BackdoorBench kept as PNG files."""
    data_path, x_test, y_test = clean_data
    state = bd_test_state(x_test, y_test)
    folder = tmp_path / "record" / "bd_test_dataset"
    data_dict = {}
    for key, (image, bd_label, label) in state["bd_data_container"]["data_dict"].items():
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        image.save(folder / str(label) / f"{key}.png")
        data_dict[key] = {"path": f"/elsewhere/bd_test_dataset/{label}/{key}.png", "other_info": [bd_label, label]}
    state["bd_data_container"].update(save_folder_path="/elsewhere/bd_test_dataset", data_dict=data_dict)
    prefixed = {f"module.{k}": v for k, v in weights.items()}
    source = save(attack_result(prefixed, x_test, y_test, bd_test=state), tmp_path / "record" / "attack_result.pt")
    report = import_backdoorbench(source, tmp_path / "imported", f"npz:{data_path}")
    assert report.poisoned == N_POISONED and report.meta.target == TARGET
    first = int(np.flatnonzero(y_test != TARGET)[0])
    attacked = to_uint8(stored_attack(tmp_path / "imported" / POISONED_FILE)(to_tensor(x_test[first : first + 1])))
    assert np.array_equal(attacked[0], poison(x_test[first]))


def malformed_cases(weights: dict, x_test: np.ndarray, y_test: np.ndarray) -> dict[str, tuple[dict, str]]:
    def without(key: str) -> dict:
        result = attack_result(weights, x_test, y_test)
        del result[key]
        return result

    renamed = dict(weights)
    renamed["fc.weight"] = renamed.pop("linear.weight")
    dropped = {k: v for k, v in weights.items() if not k.startswith("layer4.1.")}
    narrow = PreActResNet18(num_classes=10, width=32).state_dict()
    junk = dict(weights, **{"conv1.weight": "junk"})
    all_to_all = bd_test_state(x_test, y_test, labels=(y_test + 1) % 10)
    shuffled = y_test[np.random.default_rng(1).permutation(len(y_test))]
    return {
        "missing key": (without("bd_test"), r"missing keys \['bd_test'\]"),
        "missing model": (without("model"), r"missing keys \['model'\]"),
        "other architecture": (attack_result(weights, x_test, y_test, model_name="resnet18"),
                               r"'resnet18' is not supported; fire imports: preactresnet18.*vgg19_bn.*"
                               r"mobilenet_v3_large"),
        "another's weights": (attack_result(weights, x_test, y_test, model_name="vgg19_bn"),
                              r"not BackdoorBench's vgg19_bn \(10 classes\): 102 missing keys \['features.0.weight'"),
        "renamed keys": (attack_result(renamed, x_test, y_test),
                         r"not BackdoorBench's preactresnet18.*linear\.weight.*fc\.weight"),
        "missing keys": (attack_result(dropped, x_test, y_test), r"not BackdoorBench's preactresnet18.*missing keys"),
        "other width": (attack_result(narrow, x_test, y_test), r"model\['conv1.weight'\] has shape \(32, 3, 3, 3\)"),
        "junk tensor": (attack_result(junk, x_test, y_test), r"model\['conv1.weight'\] is a str, not a tensor"),
        "junk model": (attack_result(weights, x_test, y_test, model=[1, 2, 3]), r"model must be a state dict"),
        "junk image": (attack_result(weights, x_test, y_test, bd_test={
            **bd_test_state(x_test, y_test),
            "bd_data_container": {"save_folder_path": None, "save_file_format": ".png",
                                  "data_dict": {np.int64(i): ("junk", 0, int(y_test[i])) for i in range(N_TEST)}},
        }), r"expected an image"),
        "bad img_size": (attack_result(weights, x_test, y_test, img_size="32x32"), r"img_size must be \[H, W, C\]"),
        "unknown data set": (attack_result(weights, x_test, y_test, clean_data="svhn"), r"clean_data 'svhn'"),
        "no poisoned set": (attack_result(weights, x_test, y_test, bd_test=None), r"no poisoned test set"),
        "v1 layout": (attack_result(weights, x_test, y_test, bd_test={"x": torch.zeros(2, 3, 32, 32),
                                                                      "y": torch.zeros(2)}), r"v1 layout"),
        "all to all": (attack_result(weights, x_test, y_test, bd_test=all_to_all), r"all-to-all"),
        "other test set": (attack_result(weights, x_test, shuffled), r"not the test split"),
    }


CASES = [
    "missing key", "missing model", "other architecture", "another's weights", "renamed keys", "missing keys",
    "other width", "junk tensor", "junk model", "junk image", "bad img_size", "unknown data set", "no poisoned set",
    "v1 layout", "all to all", "other test set",
]


@pytest.mark.parametrize("case", CASES)
def test_malformed_files_give_a_clear_error(case: str, clean_data, weights, tmp_path: Path) -> None:
    data_path, x_test, y_test = clean_data
    result, message = malformed_cases(weights, x_test, y_test)[case]
    source = save(result, tmp_path / "attack_result.pt")
    with pytest.raises(ValueError, match=message):
        import_backdoorbench(source, tmp_path / "out", f"npz:{data_path}")


def test_mobilenet_v3_large_attack_result_imports_and_serves(clean_data, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    """BackdoorBench's mobilenet_v3_large keys load into fire's own definition (no torchvision), normalization folded
    in; the default build picks its layers by the rule and cuts it for the inline layout."""
    data_path, x_test, y_test = clean_data
    torch.manual_seed(1)
    reference = MobileNetV3Large(num_classes=10)
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}  # as DataParallel saves it
    source = save(attack_result(state, x_test, y_test, model_name="mobilenet_v3_large"), tmp_path / "mnv3.pt")
    checkpoint = tmp_path / "mnv3"
    run_json(capsys, ["import", "backdoorbench", str(source), "--data", f"npz:{data_path}", "--out", str(checkpoint),
                      "--json"])
    model, meta = load_checkpoint(checkpoint)
    assert meta.spec.arch == "mobilenet_v3_large" and "width" not in meta.spec.kwargs
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION["cifar10"])
    x = to_tensor(x_test[:4])
    with torch.inference_mode():
        assert torch.allclose(model(x), reference.eval()((x - mean) / std), atol=1e-4)
    repository = tmp_path / "repository"
    assert main(["repo", "build", "--checkpoint", str(checkpoint), "--out", str(repository), "--layout", "inline"]) == 0
    settings = ServingSettings.read(repository / "artifacts")
    assert settings.repair_layers == ("features.0", "features.7") and not settings.cut_reason


def test_not_a_torch_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a torch file\n" * 10)
    with pytest.raises(ValueError, match="not a .*torch-saved file"):
        load_attack_result(junk)
    save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected BackdoorBench's attack-result dict, got list"):
        load_attack_result(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_attack_result(tmp_path / "absent.pt")


def test_arbitrary_pickles_are_refused_unless_trusted(clean_data, weights, tmp_path: Path) -> None:
    """An extra entry that only full unpickling can rebuild (here an argparse.Namespace of the attack's args)."""
    data_path, x_test, y_test = clean_data
    result = attack_result(weights, x_test, y_test, args=argparse.Namespace(attack="badnet", pratio=0.1))
    source = save(result, tmp_path / "attack_result.pt")
    with pytest.raises(ValueError, match=r"arbitrary objects \(argparse\.Namespace\).*--trust-pickle"):
        import_backdoorbench(source, tmp_path / "refused", f"npz:{data_path}")
    assert not (tmp_path / "refused" / "model.pt").exists()
    report = import_backdoorbench(source, tmp_path / "trusted", f"npz:{data_path}", trust_pickle=True)
    assert report.poisoned == N_POISONED


def test_cli_reports_errors_in_one_line(clean_data, weights, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data_path, x_test, y_test = clean_data
    source = save(attack_result(weights, x_test, y_test, model_name="resnet18"), tmp_path / "attack_result.pt")
    assert main(["import", "backdoorbench", str(source), "--data", f"npz:{data_path}", "--out",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fire import: error:") and "'resnet18' is not supported" in err and "\n" not in err
