"""The report card's rendering (`benchmarks/report_card.py --card-only`): the table, CSV and figure from stored
setting results alone, rows grouped by data set, unmeasured cells left empty, the verdict by the issue's targets;
and a `default_config_check.py --json` answer taken as a setting's result (`--from-check`). Nothing is trained or
served here (the slow test runs the card end to end)."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "report_card.py"


@pytest.fixture(scope="module")
def card():
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports its sibling benchmarks
    try:
        spec = importlib.util.spec_from_file_location("report_card", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("report_card", None)
        sys.path.remove(str(SCRIPT.parent))


def fig(ca: float, pa: float, asr: float) -> dict:
    return {"ca": ca, "pa": pa, "asr": asr, "clean_as_target": 0.0}


def result(card, name: str, data: str, rows: dict, layers: dict) -> dict:
    return {"setting": {"name": name, "group": card.BY_NAME[name].group, "note": card.BY_NAME[name].note},
            "data": data, "layers_chosen": layers, "images": 400,
            "triggers": [{"label": name, "attack": card.BY_NAME[name].attack, "target": 0, "rows": rows}]}


def check_answer(attack: str = "sig", flagged: int = 20) -> dict:
    """The shape of `default_config_check.py --json`'s one-line answer (the served default build)."""
    return {"attack": attack, "flagged": flagged, "total_s": 115.4, "machine": "x86_64, 2 cores, load 16.7",
            "timings_s": {"fire ctl observe": 3.7},
            "served": {"undefended": fig(0.6135, 0.0028, 0.9961), "fire": fig(0.6155, 0.5961, 0.0),
                       "layers_chosen": ["layer1.0", "layer4.0"], "target_found": 0, "images": 2000}}


def test_the_verdict_follows_the_targets(card) -> None:
    assert card.verdict({"undefended": fig(1, 0, 1), "fire-20": fig(1.0, 0.95, 0.01)}, 20) == "repaired"
    weak = card.verdict({"undefended": fig(1, 0.8, 0.16), "fire-20": fig(1, 0.8, 0.16)}, 20)
    assert weak.startswith("attack too weak")
    missed = card.verdict({"undefended": fig(1, 0, 0.99), "fire-20": fig(0.995, 0.875, 0.125)}, 20)
    assert missed.startswith("NOT repaired") and "PA/CA 0.88" in missed and "ASR 0.125" in missed
    assert card.verdict({"undefended": fig(1, 0, 0.99)}, 20) == "not run"


def test_a_config_check_answer_becomes_a_setting_result(card) -> None:
    taken = card.from_check(check_answer(), card.BY_NAME["sig"], "cifar10:/somewhere/cifar10.npz")
    assert taken["data"] == "cifar10" and taken["images"] == 2000
    assert taken["layers_chosen"] == {"20": ["layer1.0", "layer4.0"]}
    (trigger,) = taken["triggers"]
    assert set(trigger["rows"]) == {"undefended", "fire-20"}  # ShrinkPad and 5 flagged were not measured
    assert trigger["rows"]["fire-20"]["pa"] == 0.5961 and trigger["rows"]["undefended"]["asr"] == 0.9961
    with pytest.raises(ValueError, match="5 flagged"):
        card.from_check(check_answer(flagged=5), card.BY_NAME["sig"], "cifar10")
    with pytest.raises(ValueError, match="attack 'badnets'"):
        card.from_check(check_answer(attack="badnets"), card.BY_NAME["sig"], "cifar10")


def test_the_card_renders_from_stored_results_alone(card, tmp_path: Path) -> None:
    settings, out = tmp_path / "settings", tmp_path / "card"
    settings.mkdir()
    both = {"5": ["block1", "block2"], "20": ["block1", "block2"]}
    stored = {
        "digits-badnets": result(card, "badnets", "digits", {"undefended": fig(1, 0, 1), "shrinkpad": fig(.77, .3, .67),
                                                             "fire-5": fig(1, .978, .006), "fire-20": fig(1, .992, 0)},
                                 both),
        "digits-low_frequency": result(card, "low_frequency", "digits",
                                       {"undefended": fig(1, .011, .989), "shrinkpad": fig(.79, .147, .822),
                                        "fire-5": fig(.993, .439, .558), "fire-20": fig(.995, .875, .125)}, both),
        "digits-input_aware": result(card, "input_aware", "digits",
                                     {"undefended": fig(.978, .808, .164), "shrinkpad": fig(.843, .747, .106),
                                      "fire-5": fig(.97, .792, .172), "fire-20": fig(.978, .808, .161)}, both),
    }
    for name, value in stored.items():
        (settings / f"{name}.json").write_text(json.dumps(value))
    (tmp_path / "sig-check.json").write_text("served FIRE ...\n" + json.dumps(check_answer()) + "\n")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", "cifar10", "--from-check", f"sig={tmp_path / 'sig-check.json'}",
         "--card-only", "--results", str(settings), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (settings / "cifar10-sig.json").is_file()  # the check's answer, kept beside the others
    assert not list(settings.glob("report_card*"))  # the card goes to --out only

    table = (out / "report_card.md").read_text().splitlines()
    assert len(table) == 2 + 4
    body = [line.split(" | ") for line in table[2:]]
    assert [(cells[0].strip("| "), cells[1]) for cells in body] == [  # by data set, then in SETTINGS order
        ("cifar10", "sig"), ("digits", "badnets"), ("digits", "input_aware"), ("digits", "low_frequency")]
    sig = body[0]
    assert sig[3] == "-" and sig[4] == "-" and sig[5] == "0.616 / 0.596 / 0.000"  # ShrinkPad, 5 flagged unmeasured
    assert "- / layer1.0+layer4.0" in table[2] and table[2].endswith("| repaired |")
    assert "attack too weak" in table[4] and "NOT repaired" in table[5]

    with (out / "report_card.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["setting"] for r in rows] == ["sig", "badnets", "input_aware", "low_frequency"]
    assert rows[0]["shrinkpad_pa"] == "" and rows[0]["fire-20_pa"] == "0.5961" and rows[0]["layers_5"] == ""
    assert rows[3]["fire-20_asr"] == "0.1250" and rows[3]["verdict"].startswith("NOT repaired")
    assert json.loads((out / "report_card.json").read_text())[1]["verdict"] == "repaired"
    assert (out / "report_card.png").stat().st_size > 10_000


def test_an_unknown_setting_or_a_bare_name_is_refused(tmp_path: Path) -> None:
    for bad in ("nosuch=x.json", "sig"):
        proc = subprocess.run([sys.executable, str(SCRIPT), "--from-check", bad, "--card-only", "--out",
                               str(tmp_path / "card")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              check=False)
        assert proc.returncode == 2 and ("unknown settings" in proc.stderr or "NAME=FILE" in proc.stderr), bad
    assert not (tmp_path / "card").exists()  # nothing written
