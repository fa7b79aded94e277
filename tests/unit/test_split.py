"""Cutting models into head and tail: exactness, latent shapes, BackdoorBench key names, part files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fire_backend.models import ARCHITECTURES, DigitsCNN, PreActResNet18, build_model
from fire_backend.split import (
    PART_FORMAT,
    ModelSpec,
    candidate_layers,
    load_part,
    save_part,
    split,
    stage_names,
)

SPECS = {
    "digits_cnn": ModelSpec("digits_cnn", {"in_channels": 1, "num_classes": 10, "width": 8}, (1, 8, 8)),
    "preact_resnet18": ModelSpec(
        "preact_resnet18", {"in_channels": 3, "num_classes": 10, "width": 8}, (3, 32, 32)
    ),
}
DIGITS_LAYERS = ["block1", "block2", "block3", "fc1"]
RESNET_LAYERS = ["conv1", *(f"layer{i}.{j}" for i in range(1, 5) for j in range(2)), "avgpool"]


def trained_like(spec: ModelSpec, seed: int = 0) -> torch.nn.Module:
    """A model with random weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = spec.build()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(SPECS))
def spec_model(request) -> tuple[ModelSpec, torch.nn.Module]:
    spec = SPECS[request.param]
    return spec, trained_like(spec)


def inputs(spec: ModelSpec, n: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, *spec.input_shape, generator=torch.Generator().manual_seed(seed))


def test_stage_names_are_the_documented_cut_points() -> None:
    assert stage_names(SPECS["digits_cnn"].build()) == [*DIGITS_LAYERS, "fc2"]
    assert stage_names(SPECS["preact_resnet18"].build()) == [*RESNET_LAYERS, "linear"]
    assert set(ARCHITECTURES) == {"digits_cnn", "preact_resnet18"}


def test_head_then_tail_equals_forward_at_every_candidate_layer(spec_model) -> None:
    spec, model = spec_model
    x = inputs(spec)
    with torch.inference_mode():
        expected = model(x)
        layers = [name for name, _ in candidate_layers(model, spec.input_shape)]
        assert layers == stage_names(model)[:-1]
        for layer in layers:
            head, tail = split(model, layer)
            got = tail(head(x))
            assert got.shape == expected.shape
            assert (got - expected).abs().max().item() <= 1e-5, layer


def test_candidate_layer_shapes_match_head_outputs(spec_model) -> None:
    spec, model = spec_model
    x = inputs(spec, n=3)
    shapes = candidate_layers(model, spec.input_shape)
    assert len(shapes) == len(stage_names(model)) - 1
    with torch.inference_mode():
        for layer, shape in shapes:
            head, tail = split(model, layer)
            latent = head(x)
            assert tuple(latent.shape) == (3, *shape), layer
            assert tail(latent).shape == (3, 10)


def test_candidate_layer_shapes_known_values() -> None:
    digits = dict(candidate_layers(SPECS["digits_cnn"].build(), (1, 8, 8)))
    assert digits == {"block1": (8, 8, 8), "block2": (16, 4, 4), "block3": (32,), "fc1": (16,)}
    resnet = dict(candidate_layers(SPECS["preact_resnet18"].build(), (3, 32, 32)))
    assert resnet["conv1"] == (8, 32, 32)
    assert resnet["layer1.1"] == (8, 32, 32)
    assert resnet["layer2.0"] == (16, 16, 16)
    assert resnet["layer3.1"] == (32, 8, 8)
    assert resnet["layer4.0"] == (64, 4, 4)
    assert resnet["avgpool"] == (64,)


def test_candidate_layers_restores_training_mode() -> None:
    model = SPECS["digits_cnn"].build().train()
    candidate_layers(model, (1, 8, 8))
    assert model.training
    model.eval()
    candidate_layers(model, (1, 8, 8))
    assert not model.training


@pytest.mark.parametrize(
    "arch,bad",
    [
        ("digits_cnn", "block9"),
        ("digits_cnn", "fc2"),
        ("preact_resnet18", "layer1"),
        ("preact_resnet18", "linear"),
        ("preact_resnet18", ""),
    ],
)
def test_split_rejects_bad_layer_listing_candidates(arch: str, bad: str) -> None:
    model = SPECS[arch].build()
    with pytest.raises(ValueError) as info:
        split(model, bad)
    message = str(info.value)
    for name in stage_names(model)[:-1]:
        assert name in message
    assert repr(bad) in message


def test_stage_names_rejects_models_without_stages() -> None:
    with pytest.raises(TypeError):
        stage_names(torch.nn.Linear(2, 2))


def test_build_model_rejects_unknown_architecture() -> None:
    with pytest.raises(ValueError, match="digits_cnn"):
        build_model("resnet50")


def test_head_and_tail_own_disjoint_weights_covering_the_model(spec_model) -> None:
    _, model = spec_model
    every = set(model.state_dict())
    for layer in stage_names(model)[:-1]:
        head, tail = split(model, layer)
        h, t = set(head.own_state_dict()), set(tail.own_state_dict())
        assert h and t
        assert not h & t
        assert h | t == every, layer


# --- BackdoorBench key compatibility ------------------------------------------------------------


def backdoorbench_keys() -> set[str]:
    """The state_dict keys of BackdoorBench's models/preact_resnet.py PreActResNet18."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight", "linear.weight", "linear.bias"}
    for layer in range(1, 5):
        for block in range(2):
            prefix = f"layer{layer}.{block}"
            keys |= {f"{prefix}.bn1.{k}" for k in bn} | {f"{prefix}.bn2.{k}" for k in bn}
            keys |= {f"{prefix}.conv1.weight", f"{prefix}.conv2.weight"}
            if layer > 1 and block == 0:
                keys.add(f"{prefix}.shortcut.0.weight")
    return keys


def test_preact_resnet18_standard_width_has_backdoorbench_keys() -> None:
    model = PreActResNet18()  # width 64: the standard network
    state = model.state_dict()
    keys = set(state)
    for key in (
        "conv1.weight",
        "layer1.0.bn1.weight",
        "layer2.0.shortcut.0.weight",
        "linear.weight",
        "linear.bias",
    ):
        assert key in keys
    assert {key.split(".")[0] for key in keys} == {"conv1", "layer1", "layer2", "layer3", "layer4", "linear"}
    assert keys == backdoorbench_keys()
    assert "layer1.0.shortcut.0.weight" not in keys
    assert state["conv1.weight"].shape == (64, 3, 3, 3)
    assert state["layer2.0.shortcut.0.weight"].shape == (128, 64, 1, 1)
    assert state["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
    assert state["linear.weight"].shape == (10, 512)
    assert sum(p.numel() for p in model.parameters()) == 11_171_146


def test_preact_resnet18_loads_a_foreign_state_dict_strictly() -> None:
    source = {
        k: torch.randn_like(v.float()).to(v.dtype) for k, v in PreActResNet18(width=8).state_dict().items()
    }
    model = PreActResNet18(width=8)
    model.load_state_dict(source, strict=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.items())


def test_digits_cnn_defaults() -> None:
    model = DigitsCNN()
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


# --- part files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,layer",
    [
        ("digits_cnn", "block2"),
        ("digits_cnn", "fc1"),
        ("preact_resnet18", "conv1"),
        ("preact_resnet18", "layer3.0"),
        ("preact_resnet18", "avgpool"),
    ],
)
def test_save_and_load_part_round_trip_is_exact(tmp_path: Path, arch: str, layer: str) -> None:
    spec = SPECS[arch]
    model = trained_like(spec, seed=3)
    head, tail = split(model, layer)
    save_part(head, spec, layer, "head", tmp_path / "head" / "model.pt")
    save_part(tail, spec, layer, "tail", tmp_path / "tail" / "model.pt")
    head2, head_meta = load_part(tmp_path / "head" / "model.pt")
    tail2, tail_meta = load_part(tmp_path / "tail" / "model.pt")
    assert head_meta == {"role": "head", "layer": layer, "spec": spec}
    assert tail_meta["role"] == "tail" and tail_meta["layer"] == layer
    assert not head2.training and not tail2.training
    x = inputs(spec, n=4, seed=7)
    with torch.inference_mode():
        latent, latent2 = head(x), head2(x)
        assert torch.equal(latent, latent2)
        assert torch.equal(tail(latent), tail2(latent2))
        assert torch.equal(tail2(head2(x)), model(x)) or (tail2(head2(x)) - model(x)).abs().max() <= 1e-5
    assert set(torch.load(tmp_path / "head" / "model.pt", weights_only=True)["state_dict"]) == set(
        head.own_state_dict()
    )


def test_load_part_rejects_weights_that_do_not_match(tmp_path: Path) -> None:
    spec = SPECS["digits_cnn"]
    model = trained_like(spec)
    head, tail = split(model, "block2")
    path = tmp_path / "head.pt"
    save_part(head, spec, "block2", "head", path)
    payload = torch.load(path, weights_only=True)

    extra = dict(payload, state_dict={**payload["state_dict"], **tail.own_state_dict()})
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="do not match"):
        load_part(tmp_path / "extra.pt")

    missing = dict(
        payload, state_dict={k: v for k, v in payload["state_dict"].items() if k != "block2.0.weight"}
    )
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="do not match"):
        load_part(tmp_path / "missing.pt")

    # the tail's weights presented as a head: same model, wrong role
    torch.save(dict(payload, role="tail"), tmp_path / "role.pt")
    with pytest.raises(ValueError, match="do not match"):
        load_part(tmp_path / "role.pt")

    # same keys, but the spec says a wider network: the shapes disagree
    wide = ModelSpec("digits_cnn", {**spec.kwargs, "width": 16}, spec.input_shape)
    torch.save(dict(payload, spec=wide.to_dict()), tmp_path / "shape.pt")
    with pytest.raises((ValueError, RuntimeError)):
        load_part(tmp_path / "shape.pt")


def test_load_part_rejects_other_files(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"format": "something-else", "state_dict": {}}, path)
    with pytest.raises(ValueError, match="not a fire-backend model part"):
        load_part(path)
    assert PART_FORMAT.startswith("fire-backend/part/")


def test_model_spec_dict_round_trip() -> None:
    for spec in SPECS.values():
        again = ModelSpec.from_dict(spec.to_dict())
        assert again == spec
        assert isinstance(again.input_shape, tuple)
