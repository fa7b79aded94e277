"""The in-process repair hook: a plan of directions at several layers, applied while the network runs.

What the layouts rely on: one layer through the hook equals the split head -> repair -> tail pipeline exactly;
several layers run in stage order, each on a latent already repaired upstream; per-sample score = max and
flagged = any over layers; layers without a direction cost nothing; bypassing rows keep their latents at every
layer while their scores are still computed.
"""

from __future__ import annotations

import pytest
import torch

from fire_backend.fire import Direction, RepairPass, RepairPlan, compile_directions, compile_plan, repair
from fire_backend.models import DigitsCNN
from fire_backend.models.network import Network

INPUT = (1, 8, 8)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return DigitsCNN(in_channels=1, num_classes=10, width=8).eval()


@pytest.fixture(scope="module")
def dims(model) -> dict[str, int]:
    return {layer.name: layer.dim for layer in whole(model).candidates()}


_WRAPPED: dict[int, Network] = {}


def whole(model: torch.nn.Module) -> Network:
    """The model as FIRE runs it (one wrapper per model: its hook dispatchers are registered once)."""
    return _WRAPPED.setdefault(id(model), Network.from_module(model, INPUT))


def split(model: torch.nn.Module, layer: str) -> tuple[Network, Network]:
    return whole(model).cut(layer)


def images(n: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, *INPUT, generator=torch.Generator().manual_seed(seed))


def direction_at(model, layer: str, x: torch.Tensor, seed: int, threshold: float = 0.5):
    """A direction and centroid at ``layer`` that some of ``x`` sit beyond (so the repair changes them)."""
    head, _ = split(model, layer)
    with torch.inference_mode():
        latents = head(x).flatten(1)
    center = latents.mean(0)
    beta = torch.randn(latents.shape[1], generator=torch.Generator().manual_seed(seed)) * latents.std()
    return Direction(beta, threshold=threshold), center


def test_one_layer_through_the_hook_equals_head_repair_tail(model, dims) -> None:
    x = images()
    d, center = direction_at(model, "block2", x, 3, threshold=-10.0)
    plan = compile_plan({"block2": ([d], center)}, dims, version=4)
    run = RepairPass(plan)
    with torch.inference_mode():
        fused = whole(model)(x, run.hooks)
        head, tail = split(model, "block2")
        fixed, score, flagged = repair(head(x), compile_directions([d], center, dims["block2"]))
        expected = tail(fixed)
        plain = model(x)
    assert torch.equal(fused, expected)
    assert not torch.allclose(fused, plain)  # the repair did change something
    got_score, got_flagged = run.outputs(len(x), "cpu")
    assert torch.equal(got_score, score) and torch.equal(got_flagged, flagged)
    assert plan.layers == ("block2",) and plan.version == 4


def test_two_layers_run_in_stage_order_on_repaired_latents(model, dims) -> None:
    x = images(seed=5)
    (d1, c1), (d2, c2) = direction_at(model, "block1", x, 7), direction_at(model, "block3", x, 8)

    def offline():
        """block1, repair, block2..block3, repair, the rest: written out by hand."""
        with torch.inference_mode():
            fixed1, s1, f1 = repair(model.block1(x), compile_directions([d1], c1, dims["block1"]))
            fixed3, s3, f3 = repair(model.block3(model.block2(fixed1)), compile_directions([d2], c2, dims["block3"]))
            return model.fc2(model.fc1(fixed3)), s1, f1, s3, f3

    _, s1, _, s3, _ = offline()
    # thresholds at each layer's median score: each layer flags half the samples, not the same half
    d1.threshold, d2.threshold = float(s1.median()), float(s3.median())
    expected, s1, f1, s3, f3 = offline()
    assert (f1 != f3).any() and f1.any() and f3.any()
    # given out of stage order: the forward pass still reaches block1 first
    plan = compile_plan({"block3": ([d2], c2), "block1": ([d1], c1)}, dims)
    run = RepairPass(plan)
    with torch.inference_mode():
        out = whole(model)(x, run.hooks)
    assert torch.allclose(out, expected, atol=1e-6)
    score, flagged = run.outputs(len(x), "cpu")
    assert torch.equal(score, torch.maximum(s1, s3))
    assert torch.equal(flagged, f1 | f3)


def test_layers_without_a_direction_cost_nothing(model, dims) -> None:
    x = images()
    d, center = direction_at(model, "block2", x, 3)
    plan = compile_plan({"block1": ([], None), "block2": ([d], center), "block3": ([], None)}, dims)
    assert plan.layers == ("block2",)
    run = RepairPass(plan)
    assert set(run.hooks) == {"block2"}
    empty = RepairPass(RepairPlan())
    with torch.inference_mode():
        out = whole(model)(x, empty.hooks)
        assert torch.equal(out, model(x))
    score, flagged = empty.outputs(len(x), "cpu")
    assert torch.equal(score, torch.zeros(len(x))) and not flagged.any()


def test_bypassing_rows_keep_their_latents_at_every_layer_but_are_scored(model, dims) -> None:
    x = images()
    d1, c1 = direction_at(model, "block1", x, 7, threshold=-10.0)
    d2, c2 = direction_at(model, "block2", x, 9, threshold=-10.0)
    plan = compile_plan({"block1": ([d1], c1), "block2": ([d2], c2)}, dims)
    keep = torch.zeros(len(x), dtype=torch.bool)
    keep[[1, 4, 5]] = True
    with torch.inference_mode():
        mixed = RepairPass(plan, keep)
        out = whole(model)(x, mixed.hooks)
        repaired_all = RepairPass(plan)
        everyone = whole(model)(x, repaired_all.hooks)
        plain = model(x)
    assert torch.equal(out[keep], plain[keep])
    assert torch.equal(out[~keep], everyone[~keep])
    score, flagged = mixed.outputs(len(x), "cpu")
    # shadow mode: a bypassing row is scored on its own (unrepaired) latents
    shadow = RepairPass(plan, torch.ones(len(x), dtype=torch.bool))
    with torch.inference_mode():
        whole(model)(x, shadow.hooks)
    shadow_score, _ = shadow.outputs(len(x), "cpu")
    assert torch.equal(score[keep], shadow_score[keep])
    assert flagged.all()
    no_bypass = RepairPass(plan, torch.zeros(len(x), dtype=torch.bool))
    assert no_bypass.keep is None  # nothing to keep: the plain path


def test_plans_and_parts_refuse_layers_they_cannot_reach(model, dims) -> None:
    d = Direction(torch.ones(dims["block2"]))
    with pytest.raises(ValueError, match="no repairable latent at layer 'fc9'"):
        compile_plan({"fc9": ([d], torch.zeros(dims["block2"]))}, dims)
    head, tail = split(model, "block2")
    head.check_hooks(["block1", "block2"])
    with pytest.raises(ValueError, match=r"no layer 'block3'.*stages: block1, block2 "):
        head.check_hooks(["block2", "block3"])
    assert [s.name for s in tail.stages()] == ["block3", "fc1"] and "block2" not in tail.layers
