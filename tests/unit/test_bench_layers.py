"""`fire bench` on a repository repairing at several layers (the default build): every layout that can serve it;
and how its runs over several protocols are compared."""

from __future__ import annotations

from pathlib import Path

import pytest

from fire_backend.bench import (
    BENCH_PROTOCOLS,
    BENCH_TARGETS,
    BenchConfig,
    BenchReport,
    BenchRow,
    bench_layouts,
    bench_repository,
    bench_targets,
    format_table,
    parse_list,
    ratios,
    summary_rows,
)
from fire_backend.repository.build import build_repository
from fire_backend.repository.layout import ARTIFACTS_DIR, ServingSettings, models_dir
from fire_backend.stores.files import DirectionStore


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


def row(target: str, protocol: str, rnd: int, samples_per_s: float, cpu: float) -> BenchRow:
    return BenchRow(target=target, concurrency=16, samples_per_s=samples_per_s, p50_ms=10.0, p95_ms=20.0, p99_ms=30.0,
                    round=rnd, protocol=protocol, cpu_ms_per_sample=cpu)


def test_protocols_are_compared_side_by_side_within_each_round() -> None:
    """`fire bench --protocol grpc,http,triton-http`: what the HTTP front costs is each round's ratio (measured side
    by side), then the median; layouts are compared within a protocol, labelled with it."""
    rows = [row("fused", "http", 1, 90.0, 1.2), row("fused", "triton-http", 1, 100.0, 1.0),
            row("fused", "grpc", 1, 120.0, 1.5), row("undefended", "http", 1, 60.0, 1.0),
            row("fused", "http", 2, 40.0, 1.3), row("fused", "triton-http", 2, 50.0, 1.0),
            row("fused", "grpc", 2, 80.0, 1.3)]
    found = {e["comparison"]: e for e in ratios(rows)}
    front = found["HTTP front vs Triton's own HTTP [fused]"]
    assert front["rounds"] == 2 and front["throughput"] == pytest.approx((0.9 + 0.8) / 2)
    assert front["throughput_range"] == pytest.approx([0.8, 0.9])  # the spread over the rounds
    assert front["cpu_per_sample"] == pytest.approx((1.2 + 1.3) / 2)
    assert front["protocol"] == "http" and front["baseline_protocol"] == "triton-http"
    assert found["HTTP front vs gRPC [fused]"]["rounds"] == 2
    assert found["default vs undefended split [http]"]["rounds"] == 1  # round 2 measured no undefended
    assert "HTTP front vs Triton's own HTTP [undefended]" not in found  # never measured over Triton's own HTTP
    summary = {(r.target, r.protocol): r for r in summary_rows(rows)}
    assert summary[("fused", "http")].samples_per_s == 65.0 and summary[("fused", "http")].cpu_ms_per_sample == 1.25
    table = format_table(BenchReport(machine={"cores": 2, "cpu_model": "x", "python": "3", "torch": "2"}, rows=rows,
                                     ratios=ratios(rows), settings={"protocols": ["grpc", "http", "triton-http"],
                                                                     "duration_s": 5.0, "batch": 1, "rounds": 2}))
    assert "HTTP front vs Triton's own HTTP [fused]" in table and "CPU/sample" in table
    assert "0.800-0.900" in table and "rounds: min-max" in table


def test_a_bench_config_names_known_protocols_only(tmp_path) -> None:
    with pytest.raises(ValueError, match="protocols must be among"):
        BenchConfig(repository=tmp_path, protocols=("grpc", "ftp"))
    assert parse_list("grpc, triton-http", BENCH_PROTOCOLS, "protocols") == ("grpc", "triton-http")
    with pytest.raises(ValueError, match="out of fused"):
        parse_list("fused,nope", BENCH_TARGETS, "targets")


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
