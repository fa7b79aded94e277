"""A user's own network: `fire import model` in each form on tiny networks defined in tests/unit/tiny_networks.py,
layer listing, the refusals (wrong factory, wrong weights, TorchScript, fixed batch, training mode), a network that
cannot be cut (the fused stage serves it, inline refuses with the reason), and `fire train --module`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pb_double as pb
import pytest
import tiny_networks
import torch
from test_stages import stage_args

from fire_backend.cli import main
from fire_backend.data import load_dataset, to_tensor
from fire_backend.defaults import evaluation_indices
from fire_backend.fire import RepairPass
from fire_backend.models.layers import LayerError
from fire_backend.models.user import MODULE_FILE, PROGRAM_FILE, file_sha256
from fire_backend.offline.checkpoint import MODEL_FILE, load_checkpoint
from fire_backend.repository.build import RepositoryOptions, build_repository
from fire_backend.repository.layout import ARTIFACTS_DIR, ServingSettings
from fire_backend.stores.files import DirectionStore
from fire_backend.stub.live_plan import plan_of
from fire_backend.stub.stages import FusedStage
from fire_backend.wire.names import FIRE_ENSEMBLE, FIRE_MONOLITHIC, LABEL, LOGITS, UNDEFENDED_ENSEMBLE

HERE = Path(__file__).resolve().parent
NETWORKS = HERE / "tiny_networks.py"


def run(capsys: pytest.CaptureFixture, argv: list[str], code: int = 0) -> tuple[str, str]:
    capsys.readouterr()
    assert main(argv) == code
    captured = capsys.readouterr()
    return captured.out, captured.err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def weights_of(model: torch.nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> torch.nn.Module:
    """TinyRes with non-trivial weights and BatchNorm statistics (as a trained network has)."""
    torch.manual_seed(0)
    model = tiny_networks.build(width=8)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def module_checkpoint(tmp_path_factory, trained) -> Path:
    root = tmp_path_factory.mktemp("module-import")
    weights = weights_of(trained, root / "weights.pt")
    out = root / "checkpoint"
    assert main(["import", "model", "--module", f"{NETWORKS}:build", "--kwargs", '{"width": 8}', "--weights",
                 str(weights), "--data", "digits", "--attack", "badnets", "--target", "0", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def program_file(tmp_path_factory, trained) -> Path:
    path = tmp_path_factory.mktemp("program") / "tiny.pt2"
    tiny_networks.export(trained, str(path))
    return path


def digits_eval(n: int = 32) -> torch.Tensor:
    data = load_dataset("digits")
    return to_tensor(data.x_test[evaluation_indices(data.y_test)[:n]])


# --- the module form --------------------------------------------------------------------------------------------


def test_a_module_file_becomes_a_self_contained_checkpoint(module_checkpoint: Path, trained) -> None:
    meta = json.loads((module_checkpoint / "meta.json").read_text())
    assert meta["spec"]["arch"] == "module" and meta["spec"]["kwargs"] == {"width": 8}
    assert meta["spec"]["source"] == {"file": MODULE_FILE, "sha256": file_sha256(NETWORKS), "factory": "build"}
    assert meta["attack"] == "badnets" and meta["target"] == 0 and meta["dataset"] == "digits"
    assert (module_checkpoint / MODULE_FILE).read_bytes() == NETWORKS.read_bytes()  # copied in: self-contained
    assert (module_checkpoint / MODEL_FILE).is_file()
    net, loaded = load_checkpoint(module_checkpoint)
    x = digits_eval(8)
    with torch.inference_mode():
        assert torch.equal(net(x), trained(x))
    assert loaded.spec.classes == 10 and loaded.spec.input_shape == (1, 8, 8)


def test_every_checkpoint_command_takes_an_imported_module(module_checkpoint: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    out, _ = run(capsys, ["eval", "--checkpoint", str(module_checkpoint), "--eval-images", "60", "--clean", "20",
                          "--flagged", "5", "--out", str(tmp_path / "eval"), "--json"])
    report = last_json(out)
    assert report["layer"] == "down"  # the deep layer of the default pair, by the rule
    assert {row["method"] for row in report["rows"]} >= {"undefended", "fire-unpaired-projection"}
    run(capsys, ["data", "export", "--checkpoint", str(module_checkpoint), "--part", "reserve", "--poisoned",
                 "--n", "5", "--out", str(tmp_path / "flagged.npz")])
    with np.load(tmp_path / "flagged.npz") as flagged:
        assert flagged["x"].shape == (5, 8, 8, 1)
    out, _ = run(capsys, ["repo", "build", "--checkpoint", str(module_checkpoint), "--out", str(tmp_path / "repo"),
                          "--flagged", "5"])
    assert "repairs after early, down" in out
    artifacts = tmp_path / "repo" / ARTIFACTS_DIR
    assert (artifacts / MODULE_FILE).read_bytes() == NETWORKS.read_bytes()  # the repository runs the same file
    settings = ServingSettings.read(artifacts)
    assert settings.repair_layers == ("early", "down") and settings.layout == "fused"


def test_list_layers_shows_module_paths_shapes_stages_and_the_default_pair(capsys: pytest.CaptureFixture,
                                                                           trained, tmp_path: Path) -> None:
    weights = weights_of(trained, tmp_path / "w.pt")
    out, _ = run(capsys, ["import", "model", "--module", f"{NETWORKS}:build", "--weights", str(weights),
                          "--input-shape", "1,8,8", "--classes", "10", "--list-layers", "--json"])
    listed = last_json(out)
    names = [row["name"] for row in listed["layers"]]
    assert names.index("stem") < names.index("early.conv") < names.index("early") < names.index("late")
    rows = {row["name"]: row for row in listed["layers"]}
    assert rows["early"]["shape"] == [8, 8, 8] and rows["late"]["shape"] == [16, 4, 4]
    assert rows["early"]["stage"] and not rows["early.conv"]["stage"]
    assert listed["default"] == ["early", "down"] and rows["down"]["default"] == "deep"
    assert rows["down"]["cut_reason"] == ""  # every stage of TinyRes can be cut
    assert "default layers (`fire repo build` with no --layer): early + down" in out
    assert "classify" not in names  # it computes the output


# --- the .pt2 form ---------------------------------------------------------------------------------------


def test_a_program_imports_and_serves_like_the_module(program_file: Path, module_checkpoint: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "from-pt2"
    summary = last_json(run(capsys, ["import", "model", "--exported", str(program_file), "--data", "digits",
                                     "--attack", "badnets", "--target", "0", "--out", str(out), "--json"])[0])
    assert summary["spec"]["arch"] == "exported" and summary["default_layers"] == ["early", "down"]
    assert (out / PROGRAM_FILE).read_bytes() == program_file.read_bytes() and not (out / MODEL_FILE).exists()
    program, _ = load_checkpoint(out)
    module, _ = load_checkpoint(module_checkpoint)
    assert [c.name for c in program.stages()] == [c.name for c in module.stages()]
    x = digits_eval()
    hooks = {"early": lambda t: t * 0.5}
    with torch.inference_mode():
        assert torch.equal(program(x), module(x)) and torch.equal(program(x, hooks), module(x, hooks))
    repository = tmp_path / "repo"
    build_repository(out, repository, flagged=5, options=RepositoryOptions(compare_layouts=("inline",)))
    assert (repository / ARTIFACTS_DIR / PROGRAM_FILE).is_file()
    assert not ServingSettings.read(repository / ARTIFACTS_DIR).cut_reason


def test_a_program_with_a_fixed_batch_or_in_training_mode_is_refused(trained, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    fixed = tmp_path / "fixed.pt2"
    tiny_networks.export(trained, str(fixed), dynamic=False)
    _, err = run(capsys, ["import", "model", "--exported", str(fixed), "--data", "digits", "--out",
                          str(tmp_path / "x")], code=2)
    assert "exported for a fixed batch of 2" in err and "dynamic_shapes=({0: torch.export.Dim('batch')},)" in err
    training = tmp_path / "training.pt2"
    tiny_networks.export(tiny_networks.build().train(), str(training))
    _, err = run(capsys, ["import", "model", "--exported", str(training), "--data", "digits", "--out",
                          str(tmp_path / "y")], code=2)
    assert "exported in training mode" in err and "model.eval()" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # nothing written


def test_torchscript_is_refused_with_how_to_export(trained, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(trained, torch.rand(2, 1, 8, 8)), scripted)
    for argv in (["--exported", str(scripted)], ["--module", f"{NETWORKS}:build", "--weights", str(scripted)]):
        _, err = run(capsys, ["import", "model", *argv, "--data", "digits", "--out", str(tmp_path / "out")], code=2)
        assert "TorchScript archive" in err and "torch.export.export(model.eval()" in err


# --- refusals of the module form ---------------------------------------------------------------------------


def test_a_wrong_factory_names_what_the_file_defines(trained, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    weights = weights_of(trained, tmp_path / "w.pt")
    _, err = run(capsys, ["import", "model", "--module", f"{NETWORKS}:biuld", "--weights", str(weights), "--data",
                          "digits", "--out", str(tmp_path / "out")], code=2)
    assert "defines no 'biuld'; did you mean build?" in err and "TinyRes" in err
    _, err = run(capsys, ["import", "model", "--module", f"{NETWORKS}:build", "--kwargs", '{"depth": 3}',
                          "--weights", str(weights), "--data", "digits", "--out", str(tmp_path / "out")], code=2)
    assert "build(**{\"depth\": 3}) failed" in err and "build(width: int = 8, classes: int = 10)" in err
    _, err = run(capsys, ["import", "model", "--module", f"{NETWORKS}:TwoOutputs", "--weights",
                          str(weights_of(tiny_networks.TwoOutputs(), tmp_path / "two.pt")), "--data", "digits",
                          "--out", str(tmp_path / "out")], code=2)
    assert "returns a tuple" in err
    assert not (tmp_path / "out").exists()


def test_wrong_weights_name_the_keys_that_do_not_fit(trained, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    state = trained.state_dict()
    renamed = {("head.weight" if k == "classify.weight" else k): v for k, v in state.items()}
    cases = {
        "renamed": (renamed, "1 missing keys: classify.weight; 1 unexpected keys: head.weight"),
        "wider": (tiny_networks.build(width=16).state_dict(), "keys of another shape: stem.weight (16, 1, 3, 3)"),
    }
    for name, (weights, message) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(weights, path)
        _, err = run(capsys, ["import", "model", "--module", f"{NETWORKS}:build", "--weights", str(path), "--data",
                              "digits", "--out", str(tmp_path / "out")], code=2)
        assert message in err, name
    pickled = tmp_path / "module.pt"
    torch.save(trained, pickled)  # a whole pickled module, not a state dict
    _, err = run(capsys, ["import", "model", "--module", f"{NETWORKS}:build", "--weights", str(pickled), "--data",
                          "digits", "--out", str(tmp_path / "out")], code=2)
    assert "holds more than tensors" in err and "model.state_dict()" in err
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, wrapped)
    run(capsys, ["import", "model", "--module", f"{NETWORKS}:build", "--weights", str(wrapped), "--data", "digits",
                 "--out", str(tmp_path / "ok")])  # a training script's wrapper and DataParallel's prefix are read


def test_a_changed_module_file_is_refused(module_checkpoint: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(module_checkpoint, copy)
    with (copy / MODULE_FILE).open("a") as handle:
        handle.write("\n# edited\n")
    with pytest.raises(ValueError, match="changed since it was imported"):
        load_checkpoint(copy)


def test_an_unknown_layer_gets_its_near_matches(module_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(LayerError, match=r"no layer 'erly' \(did you mean early"):
        build_repository(module_checkpoint, tmp_path / "repo", layer="erly")


# --- a network that cannot be cut -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def skip_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("skip")
    torch.manual_seed(1)
    weights = weights_of(tiny_networks.SkipAround(), root / "w.pt")
    out = root / "checkpoint"
    assert main(["import", "model", "--module", f"{NETWORKS}:SkipAround", "--weights", str(weights), "--data",
                 "digits", "--attack", "badnets", "--target", "0", "--out", str(out)]) == 0
    return out


def test_a_network_that_cannot_be_cut_is_served_fused_and_inline_refuses(skip_checkpoint: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    _, err = run(capsys, ["repo", "build", "--checkpoint", str(skip_checkpoint), "--layer", "body", "--layout",
                          "inline", "--out", str(tmp_path / "inline")], code=2)
    assert "the inline layout serves the network as two models, cut at the split layer 'body'" in err
    assert "the rest of the network also needs the network's input image" in err
    assert not (tmp_path / "inline").exists()
    repository = tmp_path / "fused"
    settings = build_repository(skip_checkpoint, repository, layer="body", flagged=5,
                                options=RepositoryOptions(baselines=True))
    assert "skip connection" in settings.cut_reason
    models = {p.name for p in (repository / "models").iterdir()}
    assert FIRE_MONOLITHIC in models and UNDEFENDED_ENSEMBLE not in models  # no undefended split to compare with
    stage = FusedStage(stage_args(repository, FIRE_ENSEMBLE), pb)
    x = digits_eval(16).numpy()
    outputs = [r.outputs() for r in stage.execute([pb.image_request(x[i:i + 1]) for i in range(len(x))])]
    net, _ = load_checkpoint(skip_checkpoint)
    plan = plan_of(DirectionStore(repository / ARTIFACTS_DIR / "store").read_version(1), settings,
                   torch.device("cpu"))
    with torch.inference_mode():
        offline = net(torch.from_numpy(x), RepairPass(plan).hooks)
    assert plan.layers == ("body",)
    assert np.array_equal(np.concatenate([o[LABEL] for o in outputs]).reshape(-1), offline.argmax(1).numpy())
    assert np.allclose(np.concatenate([o[LOGITS] for o in outputs]), offline.numpy(), atol=1e-5)
    stage.finalize()


# --- no attack named -----------------------------------------------------------------------------------------


def test_without_an_attack_a_checkpoint_has_ca_only(trained, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    weights = weights_of(trained, tmp_path / "w.pt")
    checkpoint = tmp_path / "plain"
    run(capsys, ["import", "model", "--module", f"{NETWORKS}:build", "--weights", str(weights), "--data", "digits",
                 "--out", str(checkpoint)])
    out, _ = run(capsys, ["eval", "--checkpoint", str(checkpoint), "--json"])
    assert "no attack named, so CA only" in out and 0.0 <= last_json(out)["ca"] <= 1.0
    _, err = run(capsys, ["data", "export", "--checkpoint", str(checkpoint), "--poisoned", "--out",
                          str(tmp_path / "p.npz")], code=2)
    assert "names no attack" in err
    _, err = run(capsys, ["repo", "build", "--checkpoint", str(checkpoint), "--flagged", "5", "--out",
                          str(tmp_path / "r1")], code=2)
    assert "`fire ctl observe`" in err
    run(capsys, ["repo", "build", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "r2")])  # learned online


# --- training your own network ---------------------------------------------------------------------------------


def test_fire_train_takes_a_module_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "trained"
    summary = last_json(run(capsys, ["train", "--module", f"{NETWORKS}:build", "--kwargs", '{"width": 4}',
                                     "--epochs", "1", "--train-subset", "300", "--out", str(out), "--json"])[0])
    assert 0.0 <= summary["ca"] <= 1.0
    net, meta = load_checkpoint(out)
    assert meta.spec.arch == "module" and meta.spec.source["factory"] == "build" and meta.spec.kwargs == {"width": 4}
    assert (out / MODULE_FILE).read_bytes() == NETWORKS.read_bytes()
    assert net.layer("early").shape == (4, 8, 8)
