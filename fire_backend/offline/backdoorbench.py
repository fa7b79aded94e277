"""Import a BackdoorBench attack result (``attack_result.pt``) as a fire checkpoint directory.

BackdoorBench's ``save_attack_result`` torch-saves one dict with the keys ``model_name`` (e.g.
``preactresnet18``), ``num_classes``, ``model`` (the state dict, possibly with DataParallel's
``module.`` prefix), ``data_path``, ``img_size`` ([H, W, C]), ``clean_data`` (the data set's name,
e.g. ``cifar10``), ``bd_train`` and ``bd_test`` (plus optional extras). In its v2 layout each of
``bd_train``/``bd_test`` is None or the state of a ``prepro_cls_DatasetBD_v2``::

    {"bd_data_container": {"save_folder_path": None or a folder,
                           "data_dict": {index: (image, poisoned_label, true_label)}       # in memory
                                     or {index: {"path": png, "other_info": [poisoned_label, true_label]}},
                           "save_file_format": ".png"},
     "original_index_array": the test-set indices the poisoned set is made of,
     "poison_indicator": 0/1 per image of the clean split,
     "getitem_all": ..., "getitem_all_switch": ..., "save_folder_path": ...}

where ``index`` is the image's position in the clean split (torchvision's order) and ``image`` is the
triggered image before BackdoorBench's normalization (a PIL image, or a PNG file on disk).

The import writes ``model.pt`` + ``meta.json`` (a PreActResNet18, VGG19-BN or MobileNetV3-Large of fire's own
definitions under BackdoorBench's parameter names, with its input normalization folded into the first
convolution, so it takes [0, 1] images like every fire model) and
``poisoned_test.npz``: the attack's own poisoned test images (``x`` uint8 NHWC, ``y`` true labels,
``index`` positions in the clean test split, ``key`` digests of the clean originals). The checkpoint's
attack is ``stored:PATH``: a trigger that replaces each clean test image by the attacker's poisoned
copy of it (matched by content), so ``fire eval``, ``fire sweep``, ``fire data export`` and
``fire repo build`` use the attack's actual trigger without knowing how it was made. An image the stored set
has no copy of is never passed off as poisoned (see :mod:`fire_backend.data.stored`).

Only tensors, numpy arrays and PIL images are unpickled (``torch.load(weights_only=True)`` with those
types allow-listed); a file that needs anything else is refused unless the caller trusts it.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fire_backend.data import Dataset, load_dataset, resolve_attack, to_tensor
from fire_backend.data.stored import STORED_PREFIX, write_stored_set
from fire_backend.device import DEFAULT_BATCH_SIZE, check_batch_size, resolve_device
from fire_backend.models import build_model
from fire_backend.models.spec import ModelSpec
from fire_backend.offline.checkpoint import CheckpointMeta, save_checkpoint

POISONED_FILE = "poisoned_test.npz"
REQUIRED_KEYS = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test")
# BackdoorBench model_name -> fire architecture (fire's own definitions, BackdoorBench's state-dict keys).
SUPPORTED_MODELS = {"preactresnet18": "preact_resnet18", "vgg19_bn": "vgg19_bn",
                    "mobilenet_v3_large": "mobilenet_v3_large"}
#: PreActResNet18's width in BackdoorBench (fire's PreActResNet18 also trains narrower copies)
BACKDOORBENCH_WIDTH = 64
# BackdoorBench's test-time normalization per data set (utils/aggregate_block/dataset_and_transform_generate.py).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "gtsrb": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "tiny": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
}
# Median per-image mean |poisoned - clean| (in [0, 1]) above which the pairing with --data looks wrong.
PAIRING_WARNING = 0.15


# --- reading the file -------------------------------------------------------------------------


def _safe_globals() -> list:
    """What a BackdoorBench result legitimately contains besides tensors: numpy arrays and scalars
    (indices, poison indicators, labels) and PIL images (the poisoned images)."""
    from numpy.core import multiarray

    allowed: list = [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype]
    # numpy >= 2 pickles name numpy._core; map those names onto the same functions.
    allowed += [(multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
                (multiarray.scalar, "numpy._core.multiarray.scalar")]
    for code in "?bBhHiIlLqQefdg":
        allowed.append(type(np.dtype(code)))
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow comes with matplotlib
        pass
    else:
        allowed.append(Image.Image)
    return allowed


def _global_name(entry: Any) -> str:
    if isinstance(entry, tuple):
        return entry[1]
    return f"{entry.__module__}.{entry.__qualname__}"


def _unsafe_globals(path: Path) -> list[str]:
    allowed = {_global_name(g) for g in _safe_globals()}
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - only used to word the error message
        return []
    return sorted(n for n in names if n not in allowed)


def load_attack_result(path: Path, trust_pickle: bool = False) -> dict:
    """The saved dict, read with ``weights_only=True`` (tensors, numpy, PIL only) unless ``trust_pickle``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (BackdoorBench writes record/<name>/attack_result.pt)")
    if trust_pickle:
        try:
            result = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any failure means the file is not readable
            raise ValueError(f"{path}: not a torch-saved file ({type(exc).__name__}: {exc})") from None
    else:
        try:
            with torch.serialization.safe_globals(_safe_globals()):
                result = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            unsafe = _unsafe_globals(path)
            if unsafe:
                raise ValueError(
                    f"{path}: reading it would unpickle arbitrary objects ({', '.join(unsafe)}), which can run "
                    "code; refusing. If you trust where the file comes from, pass --trust-pickle"
                ) from None
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{path}: not a readable torch-saved file ({reason})") from None
        except Exception as exc:  # noqa: BLE001 - junk makes the unpickler fail in many ways
            raise ValueError(f"{path}: not a torch-saved file ({type(exc).__name__}: {exc})") from None
    if not isinstance(result, dict):
        raise ValueError(f"{path}: expected BackdoorBench's attack-result dict, got {type(result).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in result]
    if missing:
        raise ValueError(
            f"{path}: not a BackdoorBench attack result: missing keys {missing} (has {sorted(map(str, result))})"
        )
    return result


# --- the model -----------------------------------------------------------------------------------


def _image_size(result: dict) -> tuple[int, int, int]:
    size = result["img_size"]
    try:
        h, w, c = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"img_size must be [H, W, C], got {size!r}") from None
    if c != 3 or h < 8 or w < 8:
        raise ValueError(f"img_size {[h, w, c]}: fire imports 3-channel images of at least 8x8")
    return h, w, c


def parse_model(result: dict) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """The fire model spec (with BackdoorBench's normalization) and a state dict that loads into it."""
    name = result["model_name"]
    if not isinstance(name, str) or name.lower() not in SUPPORTED_MODELS:
        supported = ", ".join(f"{k} (fire's {v})" for k, v in SUPPORTED_MODELS.items())
        raise ValueError(f"model_name {name!r} is not supported; fire imports: {supported}")
    num_classes = result["num_classes"]
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    clean_data = result["clean_data"]
    if clean_data not in NORMALIZATION:
        raise ValueError(
            f"clean_data {clean_data!r}: unknown BackdoorBench data set (its input normalization is needed); "
            f"known: {', '.join(NORMALIZATION)}"
        )
    h, w, c = _image_size(result)
    mean, std = NORMALIZATION[clean_data]
    arch = SUPPORTED_MODELS[name.lower()]
    shape_kwargs: dict[str, Any] = {"num_classes": int(num_classes), "in_channels": c}
    if arch == "preact_resnet18":
        shape_kwargs["width"] = BACKDOORBENCH_WIDTH
    spec = ModelSpec(arch, {**shape_kwargs, "mean": list(mean), "std": list(std)}, (c, h, w))

    weights = result["model"]
    if not isinstance(weights, dict):
        raise ValueError(f"model must be a state dict (name -> tensor), got {type(weights).__name__}")
    state: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        if not isinstance(key, str):
            raise ValueError(f"model: state-dict keys must be strings, got {key!r}")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"model[{key!r}] is a {type(value).__name__}, not a tensor")
        state[key.removeprefix("module.")] = value
    with torch.device("meta"):  # names and shapes only: VGG19-BN has 139 M parameters
        reference = build_model(arch, **shape_kwargs).state_dict()
    for key in reference:  # checkpoints from before BatchNorm counted batches lack these buffers
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    if missing or unexpected:
        described = f"width {BACKDOORBENCH_WIDTH}, " if arch == "preact_resnet18" else ""
        raise ValueError(
            f"model: the state dict is not BackdoorBench's {name} ({described}{num_classes} classes): "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    for key, ref in reference.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise ValueError(f"model[{key!r}] has shape {tuple(state[key].shape)}, expected {tuple(ref.shape)}")
        value = state[key]
        if ref.is_floating_point():
            if not value.is_floating_point():
                raise ValueError(f"model[{key!r}] is {value.dtype}, expected a floating-point tensor")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"model[{key!r}] has non-finite values")
            state[key] = value.detach().to(torch.float32)
        else:
            state[key] = value.detach().to(ref.dtype)
    return spec, state


# --- the poisoned test set ---------------------------------------------------------------------


@dataclass
class PoisonedSet:
    """The attack's poisoned test images, each with its true and poisoned label and clean-split index."""

    x: np.ndarray  # uint8 N x H x W x C
    y: np.ndarray  # true labels
    poisoned_label: np.ndarray
    index: np.ndarray  # position of the clean original in the test split


def _as_image(value: Any, where: str, shape: tuple[int, int, int]) -> np.ndarray:
    """A uint8 H x W x C array from a PIL image, a numpy array or a tensor."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None  # noqa: N806
    if Image is not None and isinstance(value, Image.Image):
        array = np.asarray(value.convert("RGB") if shape[2] == 3 else value)
    elif isinstance(value, torch.Tensor):
        array = value.detach().cpu().numpy()
        if array.ndim == 3 and array.shape[0] == shape[2] and array.shape[-1] != shape[2]:
            array = array.transpose(1, 2, 0)  # C x H x W
    elif isinstance(value, np.ndarray):
        array = value
    else:
        raise ValueError(f"{where}: expected an image (PIL image or array), got {type(value).__name__}")
    if array.ndim == 2 and shape[2] == 1:
        array = array[..., None]
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.number) or array.size == 0 or not np.isfinite(array).all():
            raise ValueError(f"{where}: image values must be finite numbers, got dtype {array.dtype}")
        scale = 255.0 if array.max() <= 1.0 and np.issubdtype(array.dtype, np.floating) else 1.0
        if array.min() < 0 or array.max() * scale > 255.5:
            raise ValueError(f"{where}: image values outside [0, 255]")
        array = np.round(array * scale).astype(np.uint8)
    if tuple(array.shape) != shape:
        raise ValueError(f"{where}: image has shape {tuple(array.shape)}, expected {shape} (img_size)")
    return np.ascontiguousarray(array)


def _open_png(path_text: str, base: Path, save_folder: str | None, label: Any, key: int, where: str) -> Any:
    """An image BackdoorBench kept on disk: the recorded path, else the same file next to the result."""
    from PIL import Image

    recorded = Path(path_text)
    candidates = [recorded, base / recorded]
    if save_folder:
        candidates.append(base / Path(save_folder).name / str(label) / recorded.name)
    for candidate in candidates:
        if candidate.is_file():
            with Image.open(candidate) as img:
                img.load()
                return img.copy()
    raise ValueError(f"{where}: image file {path_text} not found (also looked in {base})")


def _label(value: Any, where: str) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{where}: labels must be integers, got {value!r}")
    return int(value)


def parse_poisoned_test(bd_test: Any, shape: tuple[int, int, int], base: Path) -> PoisonedSet:
    """Read ``bd_test`` (BackdoorBench v2 layout) into arrays; ``base`` is the result file's folder."""
    if not isinstance(bd_test, dict):
        raise ValueError(f"bd_test must be None or a dict, got {type(bd_test).__name__}")
    if "bd_data_container" not in bd_test:
        if {"x", "y"} <= set(bd_test):
            raise ValueError(
                "bd_test has BackdoorBench's v1 layout (x, y without the clean images' indices or true labels); "
                "fire needs the v2 layout (bd_data_container, original_index_array)"
            )
        raise ValueError(f"bd_test: missing 'bd_data_container' (has {sorted(map(str, bd_test))})")
    container = bd_test["bd_data_container"]
    if not isinstance(container, dict) or not isinstance(container.get("data_dict"), dict):
        raise ValueError("bd_test['bd_data_container'] must be a dict with a 'data_dict' dict")
    for key in ("original_index_array", "poison_indicator"):
        if key not in bd_test:
            raise ValueError(f"bd_test: missing {key!r}")
    try:
        order = np.asarray(bd_test["original_index_array"]).astype(np.int64).reshape(-1)
        indicator = np.asarray(bd_test["poison_indicator"]).astype(np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError("bd_test: original_index_array and poison_indicator must be numeric arrays") from None
    if len(order) and (order.min() < 0 or order.max() >= len(indicator)):
        raise ValueError(f"bd_test: original_index_array points outside the {len(indicator)} images")
    entries: dict[int, Any] = {}
    for key, value in container["data_dict"].items():
        entries[_label(key, "bd_test data_dict key")] = value
    save_folder = container.get("save_folder_path")
    xs, ys, poisoned, index = [], [], [], []
    for i in order:
        if indicator[i] != 1:
            continue  # a clean image kept in the set; BackdoorBench reads it from the clean split
        where = f"bd_test image {i}"
        if i not in entries:
            raise ValueError(f"{where}: marked poisoned but absent from bd_data_container")
        entry = entries[i]
        if isinstance(entry, dict):  # kept on disk: {"path": ..., "other_info": [poisoned_label, true_label]}
            info = entry.get("other_info")
            if "path" not in entry or not isinstance(info, (list, tuple)) or len(info) != 2:
                raise ValueError(f"{where}: expected {{'path', 'other_info': [poisoned_label, label]}}")
            bd_label, label = info
            image = _open_png(str(entry["path"]), base, save_folder, label, i, where)
        elif isinstance(entry, (list, tuple)) and len(entry) == 3:
            image, bd_label, label = entry
        else:
            raise ValueError(f"{where}: expected (image, poisoned_label, label), got {type(entry).__name__}")
        xs.append(_as_image(image, where, shape))
        poisoned.append(_label(bd_label, where))
        ys.append(_label(label, where))
        index.append(int(i))
    if not xs:
        raise ValueError("bd_test holds no poisoned images")
    return PoisonedSet(np.stack(xs), np.asarray(ys, np.int64), np.asarray(poisoned, np.int64),
                       np.asarray(index, np.int64))


def write_poisoned_set(path: Path, poisoned: PoisonedSet, clean_x: np.ndarray) -> None:
    """The poisoned test set as a ``stored:`` attack reads it (see :mod:`fire_backend.data.stored`)."""
    write_stored_set(path, poisoned.x, poisoned.y, poisoned.index, clean_x)


# --- the import --------------------------------------------------------------------------------


@dataclass
class ImportReport:
    meta: CheckpointMeta
    poisoned: int  # poisoned test images stored
    uncovered: int  # non-target test images without a poisoned copy (no figure may count them as poisoned)
    pairing_change: float | None  # median mean |poisoned - clean| per image; large means a wrong --data
    warnings: list[str]
    measure_excluded: int | None = None  # with measure: non-target images left out of ASR (the attack left them)


def _check_pairing(poisoned: PoisonedSet, data: Dataset, target: int) -> tuple[np.ndarray, int, float, list[str]]:
    x_test, y_test = data.x_test, data.y_test
    if poisoned.index.max() >= len(x_test):
        raise ValueError(
            f"bd_test refers to test image {int(poisoned.index.max())} but {data.name} has {len(x_test)} test images; "
            "pass the clean data set the attack was run on"
        )
    if x_test.shape[1:] != poisoned.x.shape[1:]:
        raise ValueError(f"{data.name}: test images are {x_test.shape[1:]}, the poisoned ones {poisoned.x.shape[1:]}")
    agree = float((y_test[poisoned.index] == poisoned.y).mean())
    if agree < 0.99:
        raise ValueError(
            f"the true labels in bd_test agree with {data.name}'s test labels at the same indices for only "
            f"{agree:.1%} of the images: not the test split (in the same order) the attack was run on. "
            "BackdoorBench indexes torchvision's order: use the official CIFAR-10 python batches "
            "(--data cifar10:PATH/cifar-10-batches-py)"
        )
    clean = x_test[poisoned.index]
    change = float(np.median(np.abs(poisoned.x.astype(np.int16) - clean.astype(np.int16)).mean(axis=(1, 2, 3)) / 255))
    warnings = []
    if change > PAIRING_WARNING:
        warnings.append(
            f"the poisoned images differ from the clean test images at their indices by {change:.2f} on median "
            f"(mean |difference| in [0, 1]); if --data is not the attack's test split, PA and ASR are meaningless"
        )
    covered = np.zeros(len(x_test), dtype=bool)
    covered[poisoned.index] = True
    uncovered = int(((y_test != target) & ~covered).sum())
    if uncovered:
        warnings.append(
            f"{uncovered} non-target test images have no poisoned copy in bd_test: they are never used as poisoned "
            "images (sets built from the stored attack leave them out and count them; `fire eval` refuses an "
            "evaluation split that holds any)"
        )
    return clean, uncovered, change, warnings


def import_backdoorbench(
    result_path: Path,
    out: Path,
    data: str,
    trust_pickle: bool = False,
    attack: str | None = None,
    target: int | None = None,
    measure: bool = False,
    device: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> ImportReport:
    """Write a fire checkpoint directory for a BackdoorBench attack result; see the module docstring.

    ``data`` names the local clean data set (``cifar10:PATH``...) whose test split the attack's
    ``bd_test`` indexes. ``attack``/``target`` use one of fire's triggers instead of the stored set.
    ``measure`` computes CA and ASR over the whole test split now on ``device`` (slow on a CPU at width 64);
    non-target images the attack leaves unchanged are left out of ASR and counted (``measure_excluded``).
    """
    compute, batch_size = resolve_device(device), check_batch_size(batch_size)
    result_path = Path(result_path)
    result = load_attack_result(result_path, trust_pickle=trust_pickle)
    spec, state = parse_model(result)
    model = spec.network(None, state, compute if measure else "cpu")
    dataset = load_dataset(data)
    if dataset.input_shape != spec.input_shape:
        raise ValueError(f"{data}: images are {dataset.input_shape} (C, H, W), the model takes {spec.input_shape}")
    if dataset.num_classes > spec.classes:
        raise ValueError(f"{data} has {dataset.num_classes} classes, the model {spec.classes}")

    extra: dict[str, Any] = {
        "source": "backdoorbench",
        "file": str(result_path.resolve()),
        "model_name": result["model_name"],
        "clean_data": result["clean_data"],
        "data_path": str(result["data_path"]),
        "normalization": {"mean": spec.kwargs["mean"], "std": spec.kwargs["std"]},
    }
    poison_rate = 0.0
    bd_train = result["bd_train"]
    if isinstance(bd_train, dict) and "poison_indicator" in bd_train:
        try:
            indicator = np.asarray(bd_train["poison_indicator"], dtype=np.float64).reshape(-1)
            poison_rate = float(indicator.mean()) if len(indicator) else 0.0
            extra["poisoned_train"] = int(indicator.sum())
        except (TypeError, ValueError):
            pass

    warnings: list[str] = []
    stored, uncovered, change = 0, 0, None
    out.mkdir(parents=True, exist_ok=True)
    if attack is not None:
        resolve_attack(attack)  # fail early on a bad name
        if target is None:
            raise ValueError("--attack needs --target (the label the trigger flips to)")
        attack_name = attack
    else:
        if result["bd_test"] is None:
            raise ValueError(
                "the file has no poisoned test set (bd_test is None); pass --attack NAME --target N to evaluate "
                "with one of fire's triggers instead"
            )
        poisoned = parse_poisoned_test(result["bd_test"], dataset.x_test.shape[1:], result_path.parent)
        targets = sorted(set(poisoned.poisoned_label.tolist()))
        if len(targets) != 1:
            raise ValueError(
                f"bd_test flips images to several labels {targets[:10]} (an all-to-all attack); fire repairs "
                "all-to-one attacks (one target label)"
            )
        if target is not None and target != targets[0]:
            raise ValueError(f"--target {target} disagrees with the file's poisoned label {targets[0]}")
        target = targets[0]
        clean, uncovered, change, warnings = _check_pairing(poisoned, dataset, target)
        path = (out / POISONED_FILE).resolve()
        write_poisoned_set(path, poisoned, clean)
        attack_name = f"{STORED_PREFIX}{path}"
        stored = len(poisoned.x)
        extra.update(poisoned_test=stored, uncovered_non_target=uncovered, pairing_change=round(change, 4))

    meta = CheckpointMeta(spec=spec, dataset=data, attack=attack_name, target=int(target),
                          poison_rate=poison_rate, seed=0, extra=extra)
    excluded = None
    if measure:
        from fire_backend.offline.evaluation import attack_metrics

        x = to_tensor(dataset.x_test)
        y = torch.from_numpy(dataset.y_test.astype(np.int64))
        metrics, excluded = attack_metrics(model, x, y, resolve_attack(attack_name), meta.target,
                                           batch_size, exclude_unchanged=True)
        meta.ca, meta.asr = metrics.ca, metrics.asr
        meta.extra["measured"] = {"images": len(y), "poisoned": int((y != meta.target).sum()) - excluded,
                                  "excluded": excluded}
    save_checkpoint(out, model.model, meta)
    return ImportReport(meta, stored, uncovered, change, warnings, excluded)
