"""Digits acceptance: real backdoored models through `fire eval`, `fire sweep` and `fire data export`.

The models are trained once per session by the ``digits_checkpoint`` fixture in tests/conftest.py
(about 20 s each on 2 cores; FIRE_TEST_CACHE=DIR keeps them between runs).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fire_backend.cli import main
from fire_backend.data import load_dataset, resolve_attack, to_tensor, to_uint8
from fire_backend.defaults import evaluation_indices, stratified_order
from fire_backend.offline.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

ATTACKS = ("badnets", "blended")


def run_json(capsys: pytest.CaptureFixture, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1])


def eval_report(capsys, checkpoint: Path, out: Path) -> dict:
    return run_json(
        capsys,
        [
            "eval",
            "--checkpoint",
            str(checkpoint),
            "--clean",
            "100",
            "--flagged",
            "20",
            "--out",
            str(out),
            "--json",
        ],
    )


@pytest.mark.parametrize("attack", ATTACKS)
def test_backdoor_is_planted(digits_checkpoints: dict[str, Path], attack: str) -> None:
    _, meta = load_checkpoint(digits_checkpoints[attack])
    print(f"\n{attack}: undefended CA {meta.ca:.4f} ASR {meta.asr:.4f}")
    assert meta.attack == attack and meta.dataset == "digits"
    assert meta.ca >= 0.95
    assert meta.asr >= 0.90


@pytest.mark.parametrize("attack", ATTACKS)
def test_fire_eval_repairs_the_backdoor(
    digits_checkpoints: dict[str, Path], attack: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    report = eval_report(capsys, digits_checkpoints[attack], tmp_path)
    rows = {row["method"]: row for row in report["rows"]}
    print(f"\n{attack} (layer {report['layer']}):")
    for name, row in rows.items():
        print(f"  {name:28s} CA {row['ca']:.4f}  PA {row['pa']:.4f}  ASR {row['asr']:.4f}")
    for kind, det in report["detector"].items():
        print(f"  detector {kind}: TPR {det['tpr_at_1pct_fpr']:.4f} at 1% FPR")
    undefended = rows["undefended"]
    assert undefended["ca"] >= 0.95 and undefended["asr"] >= 0.90
    expected = {"undefended", "shrinkpad"} | {
        f"fire-{k}-{m}" for k in ("paired", "unpaired", "augmented") for m in ("constant", "projection")
    }
    assert set(rows) == expected
    for method in ("fire-unpaired-projection", "fire-paired-projection"):
        row = rows[method]
        assert row["pa"] >= 0.90, method
        assert row["asr"] <= 0.05, method
        assert row["ca"] >= undefended["ca"] - 0.01, method
    for row in rows.values():
        assert 0.0 <= row["ca"] <= 1.0 and 0.0 <= row["pa"] <= 1.0 and 0.0 <= row["asr"] <= 1.0
    points = report["streaming"]
    assert [p["flagged"] for p in points] == sorted(p["flagged"] for p in points)
    assert points and points[0]["flagged"] == 1 and points[-1]["flagged"] == 100
    for name in ("eval.csv", "streaming.csv", "streaming.png"):
        assert (tmp_path / name).is_file()


@pytest.mark.parametrize("attack", ATTACKS)
def test_fire_sweep_covers_every_candidate_layer(
    digits_checkpoints: dict[str, Path], attack: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    result = run_json(
        capsys, ["sweep", "--checkpoint", str(digits_checkpoints[attack]), "--out", str(tmp_path), "--json"]
    )
    layers = [row["layer"] for row in result["rows"]]
    assert layers == ["block1", "block2", "block3", "fc1"]
    shapes = {row["layer"]: tuple(row["shape"]) for row in result["rows"]}
    assert shapes == {"block1": (32, 8, 8), "block2": (64, 4, 4), "block3": (128,), "fc1": (64,)}
    recommended = result["recommended"]
    assert recommended["layer"] in layers
    assert recommended["alpha"] in (0.5, 1.0, 1.5, 2.0, 3.0)
    pick = next(row for row in result["rows"] if row["layer"] == recommended["layer"])
    print(
        f"\n{attack} sweep: "
        + ", ".join(
            f"{r['layer']} a={r['alpha']} PA {r['pa']:.3f} CA {r['ca']:.3f}" for r in result["rows"]
        )
    )
    print(f"  recommended {recommended}")
    assert pick["ca"] >= recommended["undefended_ca"] - 0.01
    assert pick["pa"] >= 0.90
    assert (tmp_path / "sweep.csv").is_file() and (tmp_path / "sweep.png").is_file()


def test_sig_figures(digits_checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """SIG (a global sinusoid, no patch): report the figures; only sanity is asserted."""
    checkpoint = digits_checkpoint("sig")
    _, meta = load_checkpoint(checkpoint)
    report = eval_report(capsys, checkpoint, tmp_path)
    print(f"\nsig: trained CA {meta.ca:.4f} ASR {meta.asr:.4f}; layer {report['layer']}")
    for row in report["rows"]:
        print(f"  {row['method']:28s} CA {row['ca']:.4f}  PA {row['pa']:.4f}  ASR {row['asr']:.4f}")
    for row in report["rows"]:
        assert 0.0 <= row["ca"] <= 1.0 and 0.0 <= row["pa"] <= 1.0 and 0.0 <= row["asr"] <= 1.0


@pytest.mark.parametrize("split", ["test", "train"])
def test_data_export_writes_uint8_nhwc(
    digits_checkpoints: dict[str, Path], tmp_path: Path, split: str, capsys: pytest.CaptureFixture
) -> None:
    checkpoint = digits_checkpoints["badnets"]
    digits = load_dataset("digits")
    x_all, y_all = digits.split(split)
    # in the split's class-stratified draw order; the test split without the defender's reserve
    order = evaluation_indices(y_all) if split == "test" else stratified_order(y_all)

    clean = run_json(
        capsys,
        [
            "data",
            "export",
            "--checkpoint",
            str(checkpoint),
            "--split",
            split,
            "--n",
            "50",
            "--out",
            str(tmp_path / "clean.npz"),
            "--json",
        ],
    )
    assert clean["n"] == 50
    with np.load(tmp_path / "clean.npz") as data:
        assert set(data.files) == {"x", "y", "poisoned"}
        assert data["x"].dtype == np.uint8 and data["x"].shape == (50, 8, 8, 1)
        assert data["y"].dtype == np.int64 and data["y"].shape == (50,)
        assert data["poisoned"].dtype == np.bool_ and not data["poisoned"].any()
        assert np.array_equal(data["x"], x_all[order[:50]])
        assert np.array_equal(data["y"], y_all[order[:50]])

    run_json(
        capsys,
        [
            "data",
            "export",
            "--checkpoint",
            str(checkpoint),
            "--split",
            split,
            "--poisoned",
            "--out",
            str(tmp_path / "poisoned.npz"),
            "--json",
        ],
    )
    with np.load(tmp_path / "poisoned.npz") as data:
        x, y = data["x"], data["y"]
        assert x.dtype == np.uint8 and x.ndim == 4 and x.shape[1:] == (8, 8, 1)
        assert data["poisoned"].all() and (y != 0).all()
        originals = x_all[order][y_all[order] != 0]
        assert len(x) == len(originals)
        assert np.array_equal(x, to_uint8(resolve_attack("badnets")(to_tensor(originals))))

    if split == "test":
        run_json(
            capsys,
            [
                "data",
                "export",
                "--checkpoint",
                str(checkpoint),
                "--include-reserve",
                "--n",
                "3",
                "--out",
                str(tmp_path / "reserve.npz"),
                "--json",
            ],
        )
        with np.load(tmp_path / "reserve.npz") as data:
            assert np.array_equal(data["x"], x_all[stratified_order(y_all)[:3]])
