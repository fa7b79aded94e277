"""The `fire` command line: help texts, argument errors, and one-line errors for user mistakes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fire_backend.cli import build_parser, main

HELP_OPTIONS = {
    (): ["train", "eval", "sweep", "data"],
    ("train",): [
        "--data",
        "--attack",
        "--target",
        "--poison-rate",
        "--seed",
        "--epochs",
        "--arch",
        "--width",
        "--train-subset",
        "--device",
        "--batch-size",
        "--out",
        "--json",
        "examples:",
    ],
    ("eval",): ["--checkpoint", "--clean", "--flagged", "--out", "--json", "--layer", "--alpha", "--device",
                "--batch-size", "--eval-images", "examples:"],
    ("sweep",): ["--checkpoint", "--clean", "--flagged", "--out", "--json", "--estimator", "--device",
                 "--batch-size", "--eval-images", "--rank-layers", "--estimation", "examples:"],
    ("data",): ["export"],
    ("data", "export"): [
        "--checkpoint",
        "--split",
        "--poisoned",
        "--n",
        "--part",
        "--include-reserve",
        "--out",
        "--json",
        "examples:",
    ],
}


@pytest.mark.parametrize("command", sorted(HELP_OPTIONS), ids=lambda c: " ".join(c) or "fire")
def test_help_exits_zero_and_lists_options(command: tuple[str, ...], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fire")
    for option in HELP_OPTIONS[command]:
        assert option in out, option


def test_sweep_help_does_not_offer_eval_only_options(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    out = capsys.readouterr().out
    assert "--layer" not in out and "--alpha" not in out


def test_console_script_help() -> None:
    """The `fire` script the install put beside this interpreter (on PATH or not)."""
    script = Path(sys.executable).with_name("fire")
    assert script.is_file(), f"no console script {script}: install the package (pip install -e .)"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "train" in result.stdout and "eval" in result.stdout


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["train"],
        ["eval"],
        ["sweep", "--estimator", "magic", "--checkpoint", "x"],
        ["train", "--arch", "vgg", "--out", "x"],
        ["data", "export", "--checkpoint", "x"],
        ["bogus"],
    ],
)
def test_usage_errors_exit_two(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: fire" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["eval"], ["sweep"], ["data", "export", "--out", "x.npz"]])
def test_missing_checkpoint_is_a_one_line_error(
    tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture
) -> None:
    assert main([*command, "--checkpoint", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fire {command[0]}: error:") and "not a checkpoint" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("rate", ["0", "1.5", "-0.1"])
def test_train_rejects_bad_poison_rate_before_training(
    tmp_path: Path, rate: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(["train", "--poison-rate", rate, "--out", str(tmp_path / "run")]) == 2
    assert "--poison-rate" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_parser_defaults() -> None:
    args = build_parser().parse_args(["eval", "--checkpoint", "c"])
    assert (args.clean, args.flagged, args.alpha, args.layer, args.json) == (100, 20, 1.0, None, False)
    args = build_parser().parse_args(["sweep", "--checkpoint", "c"])
    assert args.estimator == "unpaired"
    args = build_parser().parse_args(["train", "--out", "o"])
    assert (args.data, args.attack, args.target, args.poison_rate) == ("digits", "badnets", 0, 0.1)


def test_ctl_status_shows_each_instances_version_and_lag_and_the_gone_ones(capsys) -> None:
    from fire_backend.cli.ctl import _print_status

    status = {"version": 3, "layer": "block2", "latent_shape": [32], "directions": [], "estimator": None,
              "instances": [
                  {"instance": "fire_ensemble_0_0-11", "version": 3, "lag_s": 0.0123, "behind_s": None, "alive": True},
                  {"instance": "fire_ensemble_0_1-12", "version": 3, "lag_s": None, "behind_s": None, "alive": True},
                  {"instance": "fire_repair_0_0-13", "version": 2, "lag_s": 0.004, "behind_s": 42.0, "alive": True}],
              "gone": [{"instance": "fire_repair_0_1-14", "version": 1, "pid": 14, "alive": False}]}
    _print_status(status)
    lines = capsys.readouterr().out.splitlines()
    assert "  repair instance fire_ensemble_0_0-11: version 3 (live; applied 12 ms after its commit)" in lines
    assert "  repair instance fire_ensemble_0_1-12: version 3 (live; applied at start)" in lines
    assert "  repair instance fire_repair_0_0-13: version 2, BEHIND the live version 3 for 42.0 s" in lines
    assert "  repair instance fire_repair_0_1-14: GONE (pid 14 no longer runs; it last applied version 1)" in lines


def test_ctl_status_names_a_degraded_store_and_what_each_instance_does(capsys) -> None:
    from fire_backend.cli.ctl import _print_status

    status = {"version": None, "verified_version": None, "damage": ["store directory missing"], "layer": "block2",
              "latent_shape": [32], "directions": [], "estimator": None,
              "instances": [
                  {"instance": "fire_ensemble_0_0-11", "version": 3, "lag_s": None, "behind_s": None, "alive": True,
                   "held": False, "damage": ["store directory missing"]},
                  {"instance": "fire_ensemble_0_1-12", "version": 0, "lag_s": None, "behind_s": None, "alive": True,
                   "held": True, "damage": ["store directory missing"]}],
              "gone": []}
    _print_status(status)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("live version: UNKNOWN")
    assert "STORE DEGRADED" in lines[1] and "holds requests" in lines[1] and lines[2] == "    store directory missing"
    assert ("  repair instance fire_ensemble_0_0-11: version 3 (its last verified version; the live one is unknown); "
            "sees a degraded store (store directory missing)") in lines
    assert any(line.startswith("  repair instance fire_ensemble_0_1-12: HOLDING requests") for line in lines)


def test_ctl_observe_refuses_images_that_are_not_uint8_as_infer_does(tmp_path: Path, capsys,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 25: float or int16 images were cast to uint8 and learned from (PA 1.00 -> 0.00)."""
    import numpy as np

    from fire_backend.wire.control import ControlClient

    monkeypatch.setenv("FIRE_CONTROL_TOKEN", "t")
    for dtype in (np.float32, np.int16):
        path = tmp_path / f"{np.dtype(dtype).name}.npz"
        np.savez(path, x=np.ones((2, 8, 8, 1), dtype))
        assert main(["ctl", "--url", "127.0.0.1:1", "observe", str(path)]) == 2
        assert "x must be uint8" in capsys.readouterr().err
    with ControlClient("127.0.0.1:1", "t") as client, pytest.raises(ValueError, match="must be uint8"):
        client.observe(np.ones((2, 8, 8, 1), np.float32))  # refused before anything is sent


def test_ctl_status_heads_with_every_repaired_layer(capsys) -> None:
    """Issue 26: a two-layer server was headed `layer: block2` alone."""
    from fire_backend.cli.ctl import _print_status

    status = {"version": 1, "layer": "block2", "latent_shape": [64, 4, 4], "repair_layers": ["block1", "block2"],
              "layers": {"block1": 1, "block2": 1}, "estimation": "independent", "flagged_kept": 20, "ranking": [],
              "directions": [{"name": "d0", "mode": "projection", "alpha": 1.0, "threshold": 0.0, "norm": 2.0}],
              "estimator": None, "instances": [], "gone": []}
    _print_status(status)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "live version: 1   layers: block1, block2 [64, 4, 4]"
    assert lines[1].startswith("  direction d0 at block2: mode projection")
    _print_status({**status, "repair_layers": ["block2"], "layers": {"block2": 1}})
    assert capsys.readouterr().out.splitlines()[0] == "live version: 1   layer: block2 [64, 4, 4]"


def test_ctl_history_times_are_readable_utc() -> None:
    from fire_backend.cli.ctl import format_time

    assert format_time(1796554385.25) == "2026-12-06 10:53:05Z"


@pytest.mark.parametrize("action", ["status", "history", "rollback", "push", "observe"])
def test_every_ctl_action_has_examples_of_its_own(action: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["ctl", action, "--help"])
    assert info.value.code == 0
    examples = capsys.readouterr().out.split("examples:\n", 1)[1]
    assert f"fire ctl {action}" in examples or (action == "observe" and "fire ctl observe" in examples)


def test_ctl_help_does_not_roll_back_to_a_version_a_first_observe_never_made(capsys) -> None:
    """Issue 26: `fire ctl rollback 3` after one observe said "version 3 was never committed". An observe commits
    version 1 first (and 0 is always there): the examples use only those."""
    import re

    with pytest.raises(SystemExit):
        main(["ctl", "--help"])
    with pytest.raises(SystemExit):
        main(["ctl", "rollback", "--help"])
    versions = {int(v) for v in re.findall(r"fire ctl rollback (\d+)", capsys.readouterr().out)}
    assert versions and versions <= {0, 1}


def test_an_npz_that_is_not_one_names_the_file(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 26: a text file given as an npz gave numpy's bare "pickled data" message."""
    import numpy as np

    text = tmp_path / "notes.npz"
    text.write_text("not an archive\n")
    bare = tmp_path / "bare.npz"
    with bare.open("wb") as handle:
        np.save(handle, np.zeros((2, 8, 8, 1), np.uint8))
    monkeypatch.setenv("FIRE_CONTROL_TOKEN", "t")
    for path, says in ((text, "not an .npz archive"), (bare, "one bare array (.npy)")):
        assert main(["ctl", "--url", "127.0.0.1:1", "observe", str(path)]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and says in err
        assert main(["infer", "--url", "127.0.0.1:1", "--npz", str(path)]) == 2
        assert str(path) in capsys.readouterr().err
    assert main(["train", "--data", f"npz:{text}", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert str(text) in err and "not an .npz archive" in err and "x_train" in err


def test_data_export_says_when_it_writes_fewer_than_asked(digits_checkpoint, tmp_path: Path, capsys) -> None:
    """Issue 26: `--n 500` silently wrote the 400 images the digits evaluation part holds."""
    import json

    out = tmp_path / "clean.npz"
    assert main(["data", "export", "--checkpoint", str(digits_checkpoint("badnets")), "--n", "500", "--out", str(out),
                 "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    summary = json.loads(lines[-1])
    assert summary["requested"] == 500 and summary["n"] < 500
    assert (f"asked for 500, wrote {summary['n']}: the test split's evaluation part holds only {summary['n']} images "
            "(--part all adds the defender's reserve)") in lines
    assert main(["data", "export", "--checkpoint", str(digits_checkpoint("badnets")), "--n", "20", "--out",
                 str(out)]) == 0
    assert "asked for" not in capsys.readouterr().out
