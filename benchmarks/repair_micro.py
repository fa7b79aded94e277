"""Micro-benchmark: the FIRE repair operation vs the head's compute, measured side by side.

For a batch of 64 on the PreActResNet18 split (and the digits CNN), time the head forward pass and
the fused repair (projection mode, one and four directions) in the same run, interleaved, and print
the ratio repair / head. Target: <= 5% on PreActResNet18. Also times the per-batch version check, and the
whole network as the fused stage runs it (``Network.forward`` with a ``RepairPass``) repairing at the default pair
of layers against the deepest one alone (issue 16's target: two layers cost <= 2% more than one).

    python benchmarks/repair_micro.py [--batch 64] [--repeats 30] [--width 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fire_backend.fire import Direction, RepairPass, compile_directions, compile_plan, repair
from fire_backend.models import DigitsCNN, PreActResNet18
from fire_backend.models.network import Network
from fire_backend.multilayer import default_layers
from fire_backend.stores.files import DirectionStore, StoreFollower
from fire_backend.stores.format import DirectionSet


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def measure(name: str, model: torch.nn.Module, layer: str, input_shape, batch: int, repeats: int) -> dict:
    head, _ = Network.from_module(model, input_shape).cut(layer)
    x = torch.rand(batch, *input_shape)
    with torch.inference_mode():
        latents = head(x)
        dim = latents[0].numel()
        center = latents.flatten(1).mean(0)
        results = {"model": name, "layer": layer, "batch": batch, "latent_dim": dim}
        for k in (1, 4):
            directions = [Direction(torch.randn(dim), 1.0, "projection") for _ in range(k)]
            compiled = compile_directions(directions, center, dim)
            head_times, repair_times = [], []
            for _ in range(3):  # warm-up
                head(x)
                repair(latents, compiled)
            for _ in range(repeats):  # interleaved so drift hits both equally
                head_times += timed(lambda: head(x), 1)
                repair_times += timed(lambda c=compiled: repair(latents, c), 1)
            head_ms, repair_ms = statistics.median(head_times) * 1e3, statistics.median(repair_times) * 1e3
            results["head_ms"] = head_ms
            results[f"repair_ms_k{k}"] = repair_ms
            results[f"ratio_k{k}"] = repair_ms / head_ms
    return results


def layers_cost(model: torch.nn.Module, arch: str, input_shape, batch: int, repeats: int) -> dict:
    """Whole-network milliseconds per batch, interleaved: no repair, the deepest default layer, the default pair."""
    net = Network.from_module(model, input_shape)
    pair = default_layers(net.stages())
    dims = {layer.name: layer.dim for layer in net.candidates()}
    sets = {layer: ([Direction(torch.randn(dims[layer]))], torch.randn(dims[layer])) for layer in pair}
    plans = {"none": compile_plan({}, dims), "one": compile_plan({pair[-1]: sets[pair[-1]]}, dims),
             "pair": compile_plan(sets, dims)}
    net.check_hooks(pair)
    x = torch.rand(batch, *input_shape)
    times: dict[str, list[float]] = {name: [] for name in plans}
    with torch.inference_mode():
        for _ in range(3):  # warm-up
            for plan in plans.values():
                net(x, RepairPass(plan).hooks)
        for _ in range(repeats):  # interleaved so drift hits all equally
            for name, plan in plans.items():
                times[name] += timed(lambda p=plan: net(x, RepairPass(p).hooks), 1)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return {"model": arch, "layers": list(pair), "batch": batch, **{f"{k}_ms": v for k, v in ms.items()},
            "pair_over_one": ms["pair"] / ms["one"], "one_over_none": ms["one"] / ms["none"]}


def version_switch_cost(dim: int, repeats: int = 50) -> float:
    """Milliseconds for a repair instance to pick up a new version: stat, read, verify checksum, compile."""
    with tempfile.TemporaryDirectory() as tmp:
        store = DirectionStore(Path(tmp))
        follower = StoreFollower(store)
        center = torch.zeros(dim).numpy()
        total = 0.0
        for _ in range(repeats):
            store.commit(DirectionSet(center, [Direction(torch.randn(dim))]), "bench")
            start = time.perf_counter()
            assert follower.poll()
            compile_directions(follower.current.directions.directions, torch.from_numpy(center), dim)
            total += time.perf_counter() - start
        return total / repeats * 1e3


def version_check_cost(repeats: int = 20000) -> float:
    """Microseconds per StoreFollower.poll() when nothing changed (the per-batch cost)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = DirectionStore(Path(tmp))
        store.commit(DirectionSet(torch.zeros(8).numpy(), [Direction(torch.ones(8))]), "bench")
        follower = StoreFollower(store)
        follower.poll()
        start = time.perf_counter()
        for _ in range(repeats):
            follower.poll()
        return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--width", type=int, default=64, help="PreActResNet18 width (64 = standard)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [
        measure("preact_resnet18", PreActResNet18(width=args.width), "layer1.0", (3, 32, 32), args.batch, args.repeats),
        measure("preact_resnet18", PreActResNet18(width=args.width), "layer3.1", (3, 32, 32), args.batch, args.repeats),
        measure("preact_resnet18", PreActResNet18(width=args.width), "layer4.0", (3, 32, 32), args.batch, args.repeats),
        measure("digits_cnn", DigitsCNN(), "block2", (1, 8, 8), args.batch, args.repeats * 10),
    ]
    layer_rows = [layers_cost(PreActResNet18(width=args.width), "preact_resnet18", (3, 32, 32), args.batch,
                              args.repeats),
                  layers_cost(DigitsCNN(), "digits_cnn", (1, 8, 8), args.batch, args.repeats * 10)]
    poll_us = version_check_cost()
    switch_ms = {dim: version_switch_cost(dim) for dim in (1024, 16384)}
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}")
    print(f"{'model':16s} {'layer':9s} {'D':>6s} {'head ms':>9s} {'repair ms (K=1)':>16s} {'ratio':>7s} "
          f"{'repair ms (K=4)':>16s} {'ratio':>7s}")
    for r in rows:
        print(f"{r['model']:16s} {r['layer']:9s} {r['latent_dim']:6d} {r['head_ms']:9.3f} {r['repair_ms_k1']:16.4f} "
              f"{r['ratio_k1']:7.2%} {r['repair_ms_k4']:16.4f} {r['ratio_k4']:7.2%}")
    for r in layer_rows:
        print(f"{r['model']:16s} whole network: none {r['none_ms']:.3f} ms, {r['layers'][-1]} {r['one_ms']:.3f} ms, "
              f"{'+'.join(r['layers'])} {r['pair_ms']:.3f} ms; two layers / one: {r['pair_over_one'] - 1:+.2%}")
    print(f"version check per batch (StoreFollower.poll, unchanged): {poll_us:.2f} us")
    for dim, ms in switch_ms.items():
        print(f"switch to a new version (read, verify, compile), D={dim}: {ms:.3f} ms")
    if args.json:
        print(json.dumps({"rows": rows, "layers": layer_rows, "poll_us": poll_us, "switch_ms": switch_ms}))


if __name__ == "__main__":
    main()
