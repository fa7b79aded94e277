"""Any network as FIRE runs it: candidate layers by module path, stages, repair hooks, the exact cut (or its refusal
with the reason), exported programs, the repository's network file, and BackdoorBench's key names."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from tiny_networks import SkipAround, TinyRes, Twice

from fire_backend.models import ARCHITECTURES, VGG19BN, DigitsCNN, MobileNetV3Large, PreActResNet18, build_model
from fire_backend.models.layers import CutError, LayerError
from fire_backend.models.network import Network
from fire_backend.models.spec import PART_FORMAT, ModelSpec, load_network_file, save_network_file
from fire_backend.multilayer import default_layers

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
    randomize_norms(model)
    return model.eval()


def randomize_norms(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)


@pytest.fixture(scope="module", params=sorted(SPECS))
def spec_net(request) -> tuple[ModelSpec, Network]:
    spec = SPECS[request.param]
    return spec, Network.from_module(trained_like(spec), spec.input_shape)


def inputs(shape, n: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


def exported(model: torch.nn.Module, shape) -> Network:
    """The network as a user ships it (torch.export, saved and loaded back), as FIRE runs it."""
    program = torch.export.export(model.eval(), (inputs(shape, 2),), dynamic_shapes=({0: torch.export.Dim("b")},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    return Network.from_graph(torch.export.load(buffer).module(), shape)


# --- layers and stages ------------------------------------------------------------------------------


def test_built_in_stages_keep_their_names() -> None:
    assert [s.name for s in Network.from_module(SPECS["digits_cnn"].build(), (1, 8, 8)).stages()] == DIGITS_LAYERS
    assert [s.name for s in Network.from_module(SPECS["preact_resnet18"].build(), (3, 32, 32)).stages()] == \
        RESNET_LAYERS
    assert set(ARCHITECTURES) == {"digits_cnn", "preact_resnet18", "vgg19_bn", "mobilenet_v3_large"}


def test_candidates_are_module_paths_in_execution_order_with_shapes() -> None:
    net = Network.from_module(SPECS["digits_cnn"].build(), (1, 8, 8))
    shapes = {layer.name: layer.shape for layer in net.candidates()}
    assert {k: shapes[k] for k in DIGITS_LAYERS} == {"block1": (8, 8, 8), "block2": (16, 4, 4), "block3": (32,),
                                                     "fc1": (16,)}
    assert net.layers.index("block1.0") < net.layers.index("block1") < net.layers.index("block2.0")
    assert "fc2" not in net.layers  # it computes the output
    aliases = {layer.name: layer.alias_of for layer in net.candidates()}
    assert aliases["block1.2"] == "block1" and aliases["block1"] == ""  # one latent, the block's name preferred
    resnet = {layer.name: layer.shape for layer in Network.from_module(SPECS["preact_resnet18"].build(),
                                                                        (3, 32, 32)).candidates()}
    assert resnet["layer2.0"] == (16, 16, 16) and resnet["layer4.0"] == (64, 4, 4) and resnet["avgpool"] == (64, 1, 1)
    assert resnet["layer3.0.conv1"] == (32, 8, 8)  # any module path, not only the stages


def test_default_layers_reproduce_the_measured_pairs() -> None:
    """The rule gives the built-ins' measured pairs, and an early + deep pair on other architectures."""
    assert default_layers(Network.from_module(DigitsCNN(), (1, 8, 8)).stages()) == ("block1", "block2")
    assert default_layers(Network.from_module(PreActResNet18(width=8), (3, 32, 32)).stages()) == \
        ("layer1.0", "layer4.0")
    assert default_layers(Network.from_module(MobileNetV3Large(), (3, 32, 32)).stages()) == \
        ("features.0", "features.7")  # the stem; the first bottleneck at 2 x 2
    assert default_layers(Network.from_module(TinyRes(), (1, 8, 8)).stages()) == ("early", "down")


def test_a_module_called_twice_or_modified_in_place_is_no_candidate() -> None:
    net = Network.from_module(Twice(), (1, 8, 8))
    assert "shared" not in net.layers and "stem" in net.layers
    vgg_like = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(inplace=True),
                                   torch.nn.Flatten(), torch.nn.Linear(144, 10))
    layers = Network.from_module(vgg_like, (1, 8, 8)).layers
    assert "1" not in layers and "2" in layers  # the BatchNorm's output is changed in place by the ReLU after it


@pytest.mark.parametrize("bad,near", [("layer4.O", "layer4.0"), ("layer3.2", "layer3.1"), ("linear", None),
                                      ("", None)])
def test_an_unknown_layer_names_the_near_matches(bad: str, near: str | None) -> None:
    net = Network.from_module(SPECS["preact_resnet18"].build(), (3, 32, 32))
    with pytest.raises(LayerError) as info:
        net.check_hooks([bad])
    message = str(info.value)
    assert repr(bad) in message and "layer4.0" in message  # the stages are listed
    if near:
        assert near in message.split("did you mean ")[1].split("?")[0].split(", ")


# --- hooks ---------------------------------------------------------------------------------------------------


def test_a_hook_replaces_the_latent_where_the_module_returns(spec_net) -> None:
    spec, net = spec_net
    x = inputs(spec.input_shape)
    layer = net.stages()[1].name
    with torch.inference_mode():
        assert torch.equal(net(x), net.model(x))
        latent = net.latents(x, layer)
        head, tail = net.cut(layer)
        assert torch.equal(latent, head(x))
        assert torch.equal(net(x, {layer: lambda t: t * 0.5}), tail(head(x) * 0.5))


def test_dispatchers_are_registered_once_not_per_batch() -> None:
    net = Network.from_module(DigitsCNN(width=8), (1, 8, 8))
    x = inputs((1, 8, 8))
    with torch.inference_mode():
        for _ in range(3):
            net(x, {"block2": lambda t: t, "block1": lambda t: t})
    wrapped = net.model.block2.forward
    with torch.inference_mode():
        net(x, {"block2": lambda t: t})
    assert net.model.block2.forward is wrapped and wrapped.fire_layer == "block2"
    assert net.model.block1.forward.fire_layer == "block1"
    assert "forward" not in vars(net.model.block3)  # a layer never hooked costs nothing
    assert not any(m._forward_hooks for m in net.model.modules())  # no forward hook: the fast call path


# --- the cut ---------------------------------------------------------------------------------------------------


def test_every_stage_of_the_built_ins_cuts_exactly(spec_net) -> None:
    spec, net = spec_net
    x = inputs(spec.input_shape, n=3)
    with torch.inference_mode():
        whole = net(x)
        for stage in net.stages():
            head, tail = net.cut(stage.name)
            latent = head(x)
            assert tuple(latent.shape) == (3, *stage.shape), stage.name
            assert torch.equal(tail(latent), whole), stage.name
            assert stage.name in head.layers and stage.name not in tail.layers


def test_a_cut_with_a_skip_around_it_is_refused_with_the_reason() -> None:
    net = Network.from_module(SkipAround(), (1, 8, 8))
    with pytest.raises(CutError, match=r"cannot cut at 'body'.*input image.*skip connection"):
        net.cut("body")
    resnet = Network.from_module(PreActResNet18(width=8), (3, 32, 32))
    with pytest.raises(CutError, match=r"layer2.0.conv1.*computed in module 'layer2.0'"):
        resnet.cut("layer2.0.conv1")  # inside a residual block: its input also feeds the shortcut
    x = inputs((1, 8, 8))
    with torch.inference_mode():  # the fused way still repairs there
        assert not torch.equal(net(x, {"body": torch.zeros_like}), net(x))


def test_an_exported_program_runs_and_cuts_like_its_module(spec_net) -> None:
    spec, net = spec_net
    program = exported(net.model, spec.input_shape)
    assert program.candidates() == net.candidates()
    x = inputs(spec.input_shape, n=4)
    hooks = {net.stages()[1].name: lambda t: t * 0.5, net.stages()[-1].name: lambda t: t + 1}
    with torch.inference_mode():
        assert torch.equal(program(x), net(x))
        assert torch.equal(program(x, hooks), net(x, hooks))
        head, tail = program.cut(net.stages()[-2].name)

        def own(part: Network) -> dict:
            return {layer: hook for layer, hook in hooks.items() if layer in part.layers}
        assert torch.equal(tail(head(x, own(head)), own(tail)), net(x, hooks))
        assert torch.equal(program(x[:1]), net(x[:1]))  # a batch of one: the batch dimension is dynamic


# --- the network file --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(SPECS))
def test_network_file_round_trip_is_exact(tmp_path: Path, arch: str) -> None:
    spec = SPECS[arch]
    model = trained_like(spec, seed=3)
    save_network_file(tmp_path / "full.pt", spec, "x", model.state_dict())
    net, spec2, layer = load_network_file(tmp_path / "full.pt")
    assert spec2 == spec and layer == "x" and not net.training
    x = inputs(spec.input_shape, n=4, seed=7)
    with torch.inference_mode():
        assert torch.equal(net(x), model(x))


def test_a_network_file_of_the_previous_release_loads(tmp_path: Path) -> None:
    """What `fire repo build` wrote before user networks: role full, a spec without source, every weight."""
    spec = SPECS["preact_resnet18"]
    model = trained_like(spec, seed=4)
    payload = {"format": PART_FORMAT, "role": "full", "layer": "layer4.0",
               "spec": {"arch": spec.arch, "kwargs": dict(spec.kwargs), "input_shape": list(spec.input_shape)},
               "state_dict": {k: v.clone() for k, v in model.state_dict().items()}}
    torch.save(payload, tmp_path / "full.pt")
    net, _, layer = load_network_file(tmp_path / "full.pt")
    x = inputs(spec.input_shape, n=2)
    with torch.inference_mode():
        assert layer == "layer4.0" and torch.equal(net(x), model(x))


def test_network_file_rejects_other_files_and_wrong_weights(tmp_path: Path) -> None:
    torch.save({"format": "something-else", "state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a fire-backend network file"):
        load_network_file(tmp_path / "other.pt")
    spec = SPECS["digits_cnn"]
    state = trained_like(spec).state_dict()
    save_network_file(tmp_path / "full.pt", spec, "block2", {k: v for k, v in state.items() if k != "fc2.bias"})
    with pytest.raises(ValueError, match=r"1 missing keys: fc2.bias"):
        load_network_file(tmp_path / "full.pt")
    wide = ModelSpec("digits_cnn", {**spec.kwargs, "width": 16}, spec.input_shape)
    save_network_file(tmp_path / "wide.pt", wide, "block2", state)
    with pytest.raises(ValueError, match="keys of another shape"):
        load_network_file(tmp_path / "wide.pt")


def test_model_spec_dict_round_trip() -> None:
    user = ModelSpec("module", {"width": 4}, (1, 8, 8), {"file": "network.py", "sha256": "ab", "factory": "build"}, 10)
    for spec in (*SPECS.values(), user):
        again = ModelSpec.from_dict(spec.to_dict())
        assert again == spec and isinstance(again.input_shape, tuple)
    assert "source" not in SPECS["digits_cnn"].to_dict()  # a built-in checkpoint's meta.json is unchanged


def test_build_model_rejects_unknown_architecture() -> None:
    with pytest.raises(ValueError, match="digits_cnn"):
        build_model("resnet50")


# --- BackdoorBench key compatibility ------------------------------------------------------------


BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def preact_keys() -> set[str]:
    """The state_dict keys of BackdoorBench's models/preact_resnet.py PreActResNet18."""
    keys = {"conv1.weight", "linear.weight", "linear.bias"}
    for layer in range(1, 5):
        for block in range(2):
            prefix = f"layer{layer}.{block}"
            keys |= {f"{prefix}.bn1.{k}" for k in BN} | {f"{prefix}.bn2.{k}" for k in BN}
            keys |= {f"{prefix}.conv1.weight", f"{prefix}.conv2.weight"}
            if layer > 1 and block == 0:
                keys.add(f"{prefix}.shortcut.0.weight")
    return keys


def vgg19_bn_keys() -> set[str]:
    """BackdoorBench's vgg19_bn (torchvision's layout): features numbered layer by layer, three linear layers."""
    keys, index = set(), 0
    for item in (64, 64, "M", 128, 128, "M", *[256] * 4, "M", *[512] * 4, "M", *[512] * 4, "M"):
        if item == "M":
            index += 1
            continue
        keys |= {f"features.{index}.weight", f"features.{index}.bias"} | {f"features.{index + 1}.{k}" for k in BN}
        index += 3  # convolution, BatchNorm, ReLU
    return keys | {f"classifier.{i}.{k}" for i in (0, 3, 6) for k in ("weight", "bias")}


def test_preact_resnet18_standard_width_has_backdoorbench_keys() -> None:
    model = PreActResNet18()  # width 64: the standard network
    state = model.state_dict()
    assert set(state) == preact_keys()
    assert state["layer2.0.shortcut.0.weight"].shape == (128, 64, 1, 1)
    assert sum(p.numel() for p in model.parameters()) == 11_171_146


def test_vgg19_bn_and_mobilenet_v3_large_have_backdoorbench_keys() -> None:
    """Key for key the networks BackdoorBench saves (torchvision's vgg19_bn and mobilenet_v3_large): the published
    parameter counts at 1000 classes, and the names of every layer."""
    with torch.device("meta"):
        vgg, mobilenet = VGG19BN(num_classes=1000), MobileNetV3Large(num_classes=1000)
    assert sum(p.numel() for p in vgg.parameters()) == 143_678_248
    assert sum(p.numel() for p in mobilenet.parameters()) == 5_483_032
    assert set(vgg.state_dict()) == vgg19_bn_keys()
    keys = set(mobilenet.state_dict())
    assert {"features.0.0.weight", "features.1.block.0.0.weight", "features.1.block.1.0.weight",  # no expansion
            "features.2.block.0.0.weight", "features.4.block.2.fc1.weight", "features.4.block.3.1.running_var",
            "features.16.0.weight", "classifier.0.weight", "classifier.3.bias"} <= keys
    assert "features.1.block.2.0.weight" not in keys and "features.7.block.2.fc1.weight" not in keys  # no SE there
    assert len(keys) == 312
    assert mobilenet.state_dict()["features.5.block.2.fc1.weight"].shape == (32, 120, 1, 1)  # squeeze: 120 / 4 -> 32
    assert mobilenet.state_dict()["features.4.block.2.fc1.weight"].shape == (24, 72, 1, 1)  # 72 / 4 = 18 -> 24
    assert mobilenet.features[1].block[0][1].eps == 0.001


def test_mobilenet_v3_large_runs_on_cifar_images() -> None:
    model = MobileNetV3Large(mean=[0.5] * 3, std=[0.25] * 3).eval()
    randomize_norms(model)
    with torch.inference_mode():
        assert model(inputs((3, 32, 32), 2)).shape == (2, 10)
