"""`fire bench` on a repository repairing at several layers (the default build): every layout that can serve it."""

from __future__ import annotations

from pathlib import Path

from fire_backend.bench import BenchConfig, bench_layouts, bench_repository, bench_targets
from fire_backend.serving.artifacts import ARTIFACTS_DIR, ServingSettings, models_dir
from fire_backend.serving.repository import build_repository
from fire_backend.store import DirectionStore


def test_the_separate_layout_is_left_out_only_for_several_layers() -> None:
    assert bench_layouts(1) == ("fused", "inline", "separate") and bench_layouts(2) == ("fused", "inline")
    assert [t.name for t in bench_targets(bench_layouts(2))] == ["fused", "inline", "undefended", "monolithic"]


def test_a_default_repository_is_rebuilt_for_the_bench_without_separate(digits_checkpoint, tmp_path) -> None:
    source = tmp_path / "source"
    build_repository(digits_checkpoint("badnets"), source)  # no layer named: block1 + block2, version 0
    out = bench_repository(BenchConfig(repository=source, out=tmp_path / "bench"), lambda _line: None)
    models = {p.name for p in models_dir(out).iterdir()}
    assert {"fire_ensemble", "fire_inline_head", "undefended_ensemble", "fire_monolithic"} <= models
    assert not any(name.startswith("fire_separate") for name in models)
    assert ServingSettings.read(out / ARTIFACTS_DIR).repair_layers == ("block1", "block2")
    store = DirectionStore(out / ARTIFACTS_DIR / "store")
    assert store.live_version() == 1  # synthetic: the repair costs what it costs in service, at every layer
    assert store.read_version(1).layered.counts("block2") == {"block1": 1, "block2": 1}


def test_a_network_that_cannot_be_cut_is_benched_fused_against_monolithic(tmp_path) -> None:
    import torch
    from tiny_networks import SkipAround

    from fire_backend.cli import main

    assert bench_layouts(1, cut=False) == ("fused",)
    assert [t.name for t in bench_targets(bench_layouts(2, cut=False), cut=False)] == ["fused", "monolithic"]
    weights = tmp_path / "w.pt"
    torch.save(SkipAround().state_dict(), weights)
    checkpoint = tmp_path / "skip"
    networks = Path(__file__).resolve().parent / "tiny_networks.py"
    assert main(["import", "model", "--module", f"{networks}:SkipAround", "--weights", str(weights), "--data",
                 "digits", "--attack", "badnets", "--target", "0", "--out", str(checkpoint)]) == 0
    out = bench_repository(BenchConfig(checkpoint=checkpoint, layer="body", out=tmp_path / "bench"),
                           lambda _line: None)
    assert {p.name for p in models_dir(out).iterdir()} == {"fire_ensemble", "fire_monolithic", "fire_control"}
    assert "skip connection" in ServingSettings.read(out / ARTIFACTS_DIR).cut_reason
