"""CIFAR-10 acceptance: small PreActResNet18s backdoored with BadNets, Blended and SIG, repaired by FIRE.

Needs data/cifar10.npz under FIRE_SHARED_DIR (default shared/ in the project root; docs/data.md); skipped, naming
the setting, when absent. That file is sorted by class and is used as it is: the models train on a class-stratified
draw of TRAIN_SUBSET training images (`--train-subset`), the defender's reserve is a class-stratified draw of 200
test images, and EVAL_IMAGES of the other test images are evaluated (`--eval-images`). The models (width WIDTH,
EPOCHS epochs, no augmentation: it costs CA and plants a weaker BadNets backdoor in so few epochs) are trained once
per module, about a minute each on 2 idle CPU cores; FIRE_TEST_CACHE=DIR keeps them between runs.
CA/PA/ASR are printed.
The full-size recipe for a GPU machine is scripts/train_cifar_full.sh.

Each model goes through `fire eval` at the default layer (all methods, streaming curve, files), then FIRE's
projection repair is checked at a layer chosen from `fire sweep` (docs/results/*/sweep.csv): for BadNets
the default layer4.0 (every block but the last works, PA/CA 0.97-0.99); for Blended and SIG conv1, the
sweep's pick: their additive, image-wide triggers are a clean direction right after the first convolution
but not deeper (PA/CA about 0.68 and 0.61 at layer4.0).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fire_backend.cli import main
from fire_backend.offline.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

TRAIN_SUBSET, EVAL_IMAGES = 12000, 2000
WIDTH, EPOCHS, BATCH = 8, 5, 128
TARGET = 0
FLAGGED = 50  # flagged poisoned samples FIRE may learn from
# Layer per attack from `fire sweep` on these models (all layers: docs/results/<attack>/sweep.csv).
SWEEP_LAYER = {"badnets": "layer4.0", "blended": "conv1", "sig": "conv1"}


@pytest.fixture(scope="module")
def cifar_checkpoint(shared_file, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """attack -> checkpoint of a width-WIDTH PreActResNet18 backdoored with it (target 0), trained lazily."""
    from fire_backend.offline.training import TrainConfig, train_backdoored

    data = f"npz:{shared_file('data/cifar10.npz')}"
    cache = os.environ.get("FIRE_TEST_CACHE")
    cifar_root = Path(cache).expanduser() if cache else tmp_path_factory.mktemp("cifar")
    trained: dict[str, Path] = {}

    def get(attack: str) -> Path:
        if attack not in trained:
            out = cifar_root / f"cifar-{attack}-w{WIDTH}-e{EPOCHS}-n{TRAIN_SUBSET}"
            meta_file = out / "meta.json"
            fresh = not meta_file.is_file() or json.loads(meta_file.read_text()).get("dataset") != data
            if fresh:
                start = time.perf_counter()
                config = TrainConfig(data=data, attack=attack, target=TARGET, width=WIDTH, epochs=EPOCHS,
                                     batch_size=BATCH, augment=False, train_subset=TRAIN_SUBSET)
                train_backdoored(config, out, progress=False)
                print(f"\ntrained {attack} in {time.perf_counter() - start:.0f} s")
            trained[attack] = out
        return trained[attack]

    return get


def run_json(capsys: pytest.CaptureFixture, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def fire_eval(capsys: pytest.CaptureFixture, checkpoint: Path, out: Path) -> dict:
    return run_json(capsys, ["eval", "--checkpoint", str(checkpoint), "--clean", "100", "--flagged", str(FLAGGED),
                             "--eval-images", str(EVAL_IMAGES), "--out", str(out), "--json"])


def print_report(attack: str, checkpoint: Path, report: dict) -> dict[str, dict]:
    _, meta = load_checkpoint(checkpoint)
    rows = {row["method"]: row for row in report["rows"]}
    print(f"\n{attack}: PreActResNet18 width {WIDTH}, {EPOCHS} epochs on {TRAIN_SUBSET} images; "
          f"trained CA {meta.ca:.4f} ASR {meta.asr:.4f}; FIRE at {report['layer']} from {FLAGGED} flagged")
    for name, row in rows.items():
        print(f"  {name:28s} CA {row['ca']:.4f}  PA {row['pa']:.4f}  ASR {row['asr']:.4f}")
    for kind, det in report["detector"].items():
        print(f"  detector {kind}: TPR {det['tpr_at_1pct_fpr']:.4f} at 1% FPR")
    curve = ", ".join(f"{p['flagged']}: {p['unpaired']:.3f}/{p['augmented']:.3f}" for p in report["streaming"])
    print(f"  streaming PA (unpaired/augmented) by flagged samples: {curve}; ShrinkPad "
          f"{report['streaming'][0]['shrinkpad']:.3f}")
    return rows


def repair_at(checkpoint: Path, layer: str) -> dict[str, dict]:
    """Undefended and FIRE projection (alpha 1, FLAGGED flagged samples) figures at ``layer``, as `fire eval`
    computes them (same defender data and evaluation split), without its streaming curve."""
    from fire_backend.fire import Direction
    from fire_backend.offline.evaluation import LayerView, load_for_eval

    model, meta = load_checkpoint(checkpoint)
    data = load_for_eval(meta.dataset, meta.attack, meta.target, 100, FLAGGED, EVAL_IMAGES)
    view = LayerView(model, layer, data.samples, data.evaluation)
    rows = {"undefended": view.metrics([], meta.target)[0]}
    for kind in ("unpaired", "paired"):
        direction = Direction(view.estimate(kind, FLAGGED), alpha=1.0, mode="projection")
        rows[f"fire-{kind}-projection"] = view.metrics([direction], meta.target)[0]
    return {name: {"ca": m.ca, "pa": m.pa, "asr": m.asr} for name, m in rows.items()}


def check_cli_report(report: dict, out: Path) -> None:
    rows = {row["method"]: row for row in report["rows"]}
    assert {"undefended", "shrinkpad", "fire-unpaired-projection", "fire-augmented-projection"} <= set(rows)
    for row in rows.values():
        assert 0.0 <= row["ca"] <= 1.0 and 0.0 <= row["pa"] <= 1.0 and 0.0 <= row["asr"] <= 1.0
    points = {p["flagged"]: p for p in report["streaming"]}
    assert max(points) == 100 and FLAGGED in points
    for name in ("eval.csv", "streaming.csv", "streaming.png"):
        assert (out / name).is_file()


@pytest.mark.parametrize("attack", ["badnets", "blended"])
def test_fire_repairs_cifar_backdoor(
    cifar_checkpoint, attack: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint = cifar_checkpoint(attack)
    report = fire_eval(capsys, checkpoint, tmp_path)
    layer = SWEEP_LAYER[attack]
    rows = report_rows = {row["method"]: row for row in report["rows"]}
    if layer != report["layer"]:
        rows = repair_at(checkpoint, layer)
    print_report(attack, checkpoint, report)
    if rows is not report_rows:
        print(f"  at the sweep's layer {layer}:")
        for name, row in rows.items():
            print(f"  {name:28s} CA {row['ca']:.4f}  PA {row['pa']:.4f}  ASR {row['asr']:.4f}")
    check_cli_report(report, tmp_path)
    undefended = rows["undefended"]
    assert undefended["ca"] >= 0.5, "the small model should still classify CIFAR-10"
    assert undefended["asr"] >= 0.9, "the backdoor should be planted"
    fire = rows["fire-unpaired-projection"]
    assert fire["pa"] >= 0.85 * undefended["ca"], fire
    assert fire["ca"] >= undefended["ca"] - 0.01, fire
    assert fire["asr"] <= 0.1, fire


def test_sig_is_reported(cifar_checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """SIG (a global sinusoid, no patch): the figures are printed; only their sanity is checked."""
    checkpoint = cifar_checkpoint("sig")
    report = fire_eval(capsys, checkpoint, tmp_path)
    rows = repair_at(checkpoint, SWEEP_LAYER["sig"])
    print_report("sig", checkpoint, report)
    print(f"  at the sweep's layer {SWEEP_LAYER['sig']}:")
    for name, row in rows.items():
        print(f"  {name:28s} CA {row['ca']:.4f}  PA {row['pa']:.4f}  ASR {row['asr']:.4f}")
    check_cli_report(report, tmp_path)
    for row in rows.values():
        assert 0.0 <= row["ca"] <= 1.0 and 0.0 <= row["pa"] <= 1.0 and 0.0 <= row["asr"] <= 1.0
