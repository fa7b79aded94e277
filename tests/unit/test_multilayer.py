"""Sharpened unpaired estimation, independent vs ordered estimation at several layers, and the label-free ranking."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fire_backend.fire import (
    PLAIN,
    Reference,
    UnpairedOptions,
    compile_directions,
    reference,
    repair,
    significant,
    unpaired_direction,
)
from fire_backend.models.network import Network
from fire_backend.multilayer import (
    CHANGE_WEIGHT,
    EstimationSettings,
    Evidence,
    FoldScore,
    candidate_subsets,
    estimate,
    rank_subsets,
    ranked,
    targets_of,
)

D = 32


def test_significant_keeps_the_planted_coordinates_and_zeroes_the_noise() -> None:
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(100, D, generator=g)
    shift = torch.zeros(D)
    shift[:3] = 5.0
    flagged = torch.randn(20, D, generator=g) + shift
    plain = unpaired_direction(flagged, clean)
    sharp = unpaired_direction(flagged, clean, UnpairedOptions(z=4.0, nontarget=False))
    assert bool((plain[3:] != 0).all())  # the plain shift carries every coordinate's noise
    assert torch.equal(sharp[:3], plain[:3]) and int((sharp[3:] != 0).sum()) == 0
    assert torch.allclose(plain, (flagged.double().mean(0) - clean.double().mean(0)).float())


def test_fewer_flagged_than_the_filter_needs_give_the_plain_shift() -> None:
    """The z filter needs a variance; from a handful of flagged latents it is noise (digits Blended at 3 flagged:
    PA 0.14 filtered, 0.97 plain), so below ``z_min_flagged`` the shift is kept whole."""
    g = torch.Generator().manual_seed(2)
    clean = torch.randn(100, D, generator=g)
    flagged = torch.randn(20, D, generator=g) + 5.0 * (torch.arange(D) < 3)
    options = UnpairedOptions(z=4.0, nontarget=False, z_min_flagged=10)
    for n, filtered in ((9, False), (10, True)):
        direction = unpaired_direction(flagged[:n], clean, options)
        assert bool((direction[3:] == 0).all()) is filtered, n
        assert torch.equal(direction, unpaired_direction(flagged[:n], clean, PLAIN)) is not filtered, n


def test_significant_without_a_passing_coordinate_returns_the_shift_and_refuses_a_bad_z() -> None:
    ref = Reference.of(torch.randn(50, D, generator=torch.Generator().manual_seed(1)))
    tiny = torch.full((D,), 1e-3)
    assert torch.equal(significant(tiny, torch.ones(D), 20, ref, 4.0), tiny)
    with pytest.raises(ValueError, match="> 0"):
        significant(tiny, torch.ones(D), 20, ref, 0.0)
    with pytest.raises(ValueError, match="z must be"):
        UnpairedOptions(z=-1.0)


def test_nontarget_reference_leaves_out_clean_latents_predicted_as_the_target() -> None:
    clean = torch.cat([torch.zeros(6, D), torch.full((4, D), 10.0)])
    predictions = torch.tensor([1, 2, 3, 1, 2, 3, 0, 0, 0, 0])
    flagged = torch.full((5, D), 10.0)
    assert torch.allclose(reference(clean, predictions, target=0).mean, torch.zeros(D, dtype=torch.float64))
    assert reference(clean, predictions, target=0).count == 6
    near = unpaired_direction(flagged, clean, UnpairedOptions(z=None, nontarget=True), predictions, 0)
    assert torch.allclose(near, torch.full((D,), 10.0))  # measured from the non-target images only
    assert torch.allclose(unpaired_direction(flagged, clean, PLAIN, predictions, 0), torch.full((D,), 6.0))
    # fewer than two non-target latents: every clean latent is the reference
    assert reference(clean, torch.zeros(10, dtype=torch.long), target=0).count == 10


class Copy(nn.Module):
    """Passes its input on as a new tensor (a layer of its own)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0


class Chain(nn.Module):
    """Two pass-through layers and a linear head: the latent at ``b`` equals the one at ``a`` unless ``a`` is
    repaired."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = Copy(), Copy()
        self.head = nn.Linear(D, 3)
        with torch.no_grad():  # the planted shift (the first four coordinates) means class 0
            self.head.weight.zero_()
            self.head.weight[0, :4] = 1.0
            self.head.bias.copy_(torch.tensor([0.0, 1.0, 0.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(self.a(x)))


def chain_evidence() -> Evidence:
    g = torch.Generator().manual_seed(2)
    shift = torch.zeros(D)
    shift[:4] = 6.0
    clean = torch.randn(40, D, generator=g)
    flagged = torch.randn(10, D, generator=g) + shift
    model = Chain().eval()
    return Evidence(Network.from_module(model, (D,)), clean, flagged, ["b", "a"])


@pytest.mark.parametrize("options", [PLAIN, UnpairedOptions()])
def test_independent_estimates_every_layer_from_unrepaired_latents(options) -> None:
    ev = chain_evidence()
    sets = estimate(ev, ["a", "b"], EstimationSettings("independent", options))
    assert list(sets) == ["a", "b"]
    (beta_a,), (beta_b,) = sets["a"][0], sets["b"][0]
    assert torch.equal(beta_a.beta, beta_b.beta) and float(beta_a.beta.norm()) > 10


def test_ordered_estimates_a_deeper_layer_on_latents_repaired_upstream() -> None:
    ev = chain_evidence()
    sets = estimate(ev, ["b", "a"], EstimationSettings("ordered", PLAIN))
    (first,), center_a = sets["a"]
    compiled = compile_directions([first], center_a, D)
    repaired_clean, _, _ = repair(ev.clean, compiled)
    repaired_flagged, _, _ = repair(ev.flagged, compiled)
    expected = unpaired_direction(repaired_flagged, repaired_clean)
    (second,), center_b = sets["b"]
    assert torch.allclose(second.beta, expected, atol=1e-5)
    assert torch.allclose(center_b, repaired_clean.mean(0), atol=1e-5)
    assert float(second.beta.norm()) < 0.2 * float(first.beta.norm())  # the upstream repair took the shift away


def test_targets_are_the_labels_a_real_share_of_the_flagged_images_is_predicted_as() -> None:
    assert targets_of(torch.tensor([0] * 17 + [3, 5, 3])) == [0]  # misfires of one attack are not a target
    assert targets_of(torch.tensor([0, 1, 0, 1, 0])) == [0, 1]  # two triggers, two targets, the larger first
    assert targets_of(torch.tensor([2] * 10 + [7] * 5 + [4] * 4 + [9])) == [2, 7]  # 4 of 20 is under a quarter
    assert targets_of(torch.tensor([1, 2])) == [1]  # a label needs two images besides the share
    assert len(targets_of(torch.arange(10).repeat(3))) == 1  # ten labels of 30 images: none holds a quarter


def test_two_triggers_with_two_targets_get_a_direction_each() -> None:
    """Flagged images of two triggers (each shifting other coordinates) that the model sends to two labels: one
    direction per target, each the shift of its own group; their mean would be half of each."""

    class TwoWay(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = Copy()
            self.head = nn.Linear(D, 3)
            with torch.no_grad():
                self.head.weight.zero_()
                self.head.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
                self.head.weight[0, :4] = 1.0  # trigger one -> class 0
                self.head.weight[1, 4:8] = 1.0  # trigger two -> class 1

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.a(x))

    g = torch.Generator().manual_seed(3)
    clean = torch.randn(40, D, generator=g) * 0.1
    one, two = torch.zeros(D), torch.zeros(D)
    one[:4], two[4:8] = 5.0, 5.0
    flagged = torch.cat([torch.randn(6, D, generator=g) * 0.1 + one, torch.randn(4, D, generator=g) * 0.1 + two])
    ev = Evidence(Network.from_module(TwoWay().eval(), (D,)), clean, flagged, ["a"])
    assert ev.targets == [0, 1] and ev.flagged_target.tolist() == [0] * 6 + [1] * 4
    directions, _ = estimate(ev, ["a"], EstimationSettings("independent", PLAIN))["a"]
    assert [d.name for d in directions] == ["target-0", "target-1"]
    assert torch.allclose(directions[0].beta[:8], one[:8], atol=0.2) and torch.allclose(
        directions[1].beta[:8], two[:8], atol=0.2)
    score = rank_subsets(ev, EstimationSettings("independent", PLAIN), folds=2)[0]
    assert score.flip == 1.0  # every held-out image leaves its own target


def score(layers: tuple[str, ...], flip: float, change: float, clean_tv: float, restore: float | None = None
          ) -> FoldScore:
    """A FoldScore whose flipped images are predicted with full confidence unless ``restore`` says otherwise."""
    return FoldScore(layers, flip, change, clean_tv, flip if restore is None else restore)


def test_the_rule_prefers_restored_images_then_penalises_clean_changes_then_clean_tv_then_fewer_layers() -> None:
    both = score(("l1", "l4"), flip=1.0, change=0.02, clean_tv=0.014)
    alone = score(("l1",), flip=1.0, change=0.0, clean_tv=0.001)
    deep = score(("l4",), flip=0.97, change=0.0, clean_tv=0.010)
    calm = score(("l1", "l2"), flip=1.0, change=0.0, clean_tv=0.001)
    assert alone.score == 1.0 and both.score == pytest.approx(1.0 - CHANGE_WEIGHT * 0.02)
    assert [s.layers for s in ranked([both, deep, calm, alone])] == [("l1",), ("l1", "l2"), ("l4",), ("l1", "l4")]
    assert candidate_subsets(["a", "b", "c"]) == [("a",), ("b",), ("c",), ("a", "b"), ("a", "c"), ("b", "c")]


def test_a_repair_that_only_pushes_images_off_the_target_loses_to_one_that_restores_them() -> None:
    """The clean-label SIG CIFAR-10 rows (RESULTS section 6): every subset flips every held-out flagged image; the
    flip rule kept layer4.0 (no clean change; PA 0.34), which leaves them at a mean top probability of 0.47, while
    the pair restores them at 0.71 (PA 0.57)."""
    deep = score(("l4",), flip=1.0, change=0.0, clean_tv=0.008, restore=0.47)
    early = score(("l1",), flip=1.0, change=0.01, clean_tv=0.013, restore=0.72)
    both = score(("l1", "l4"), flip=1.0, change=0.01, clean_tv=0.018, restore=0.71)
    assert ranked([deep, early, both])[0].layers == ("l1",)
    assert ranked([deep, early, both], ("l1", "l4"), 1 / 20)[0].layers == ("l1", "l4")  # within one image of l1
    assert [s.layers for s in ranked([deep, both], ("l1", "l4"), 1 / 20)] == [("l1", "l4"), ("l4",)]
    assert both.to_dict()["restore"] == 0.71 and both.to_dict()["score"] == pytest.approx(0.71 - 0.02)


def test_a_near_tie_keeps_every_configured_layer_instead_of_the_calmest_one() -> None:
    # the n = 5 CIFAR-10 BadNets rows: every subset flips 2 of 5 held-out images, none changes a clean one; the
    # clean_tv tie-break alone picked layer4.0 (PA .036)
    deep = score(("l4",), flip=0.4, change=0.0, clean_tv=0.0004)
    early = score(("l1",), flip=0.4, change=0.0, clean_tv=0.0030)
    both = score(("l1", "l4"), flip=0.4, change=0.0, clean_tv=0.0032)
    assert ranked([both, early, deep])[0].layers == ("l4",)  # the rule without the tie preference
    assert [s.layers for s in ranked([deep, early, both], ("l1", "l4"), 1 / 5)] == [("l1", "l4"), ("l4",), ("l1",)]
    # within one held-out image's worth (1/5) it still wins; beyond it the better subset does
    assert ranked([score(("l1",), 0.6, 0.0, 0.003), both], ("l1", "l4"), 1 / 5)[0].layers == ("l1", "l4")
    assert ranked([score(("l1",), 0.8, 0.0, 0.003), both], ("l1", "l4"), 1 / 5)[0].layers == ("l1",)
    assert ranked([score(("l1",), 0.45, 0.0, 0.003), both], ("l1", "l4"), 1 / 20)[0].layers == ("l1", "l4")
    assert ranked([score(("l1",), 0.5, 0.0, 0.003), both], ("l1", "l4"), 1 / 20)[0].layers == ("l1",)


def test_restore_weighs_each_flipped_image_by_the_confidence_of_its_new_prediction() -> None:
    ev = chain_evidence()
    result = rank_subsets(ev, EstimationSettings("independent", PLAIN), [("a",)])[0]
    assert 0.0 < result.restore <= result.flip <= 1.0


def test_ranking_on_a_backdoored_digits_model_needs_no_labels_and_picks_a_working_subset(digits_checkpoint) -> None:
    from fire_backend.offline.checkpoint import load_checkpoint
    from fire_backend.offline.evaluation import load_defender_samples

    model, meta = load_checkpoint(digits_checkpoint("badnets"))
    samples = load_defender_samples(meta.dataset, meta.attack, meta.target, 100, 20)
    net = model
    ev = Evidence(net, samples.clean, samples.flagged, ["block1", "block2", "fc1"])
    assert ev.target == meta.target  # from the flagged images' predictions, not from the checkpoint
    scores = rank_subsets(ev, EstimationSettings())
    assert sorted(s.layers for s in scores) == sorted(candidate_subsets(["block1", "block2", "fc1"]))
    top = scores[0]
    assert top.flip >= 0.9 and top.change <= 0.02
    assert all(0.0 <= s.flip <= 1.0 and 0.0 <= s.change <= 1.0 for s in scores)
    with pytest.raises(ValueError, match="at least 5 flagged"):
        rank_subsets(Evidence(net, samples.clean, samples.flagged[:3], ["block1"]), EstimationSettings())


def test_fire_sweep_ranks_with_the_same_code_as_the_control_endpoint(digits_checkpoint, tmp_path, capsys) -> None:
    import json

    from fire_backend.cli import main
    from fire_backend.offline.checkpoint import load_checkpoint
    from fire_backend.offline.evaluation import load_defender_samples

    checkpoint = digits_checkpoint("badnets")
    assert main(["sweep", "--checkpoint", str(checkpoint), "--eval-images", "100", "--out", str(tmp_path),
                 "--json"]) == 0
    report = json.loads((tmp_path / "sweep.json").read_text())
    ranking = report["ranking"]
    assert report["recommended"]["layers"] == ranking[0]["layers"]
    assert "label-free ranking" in capsys.readouterr().out
    model, meta = load_checkpoint(checkpoint)
    samples = load_defender_samples(meta.dataset, meta.attack, meta.target, 100, 20)
    evidence = Evidence(model, samples.clean, samples.flagged, ["block1", "block2"])
    direct = [s.to_dict() for s in rank_subsets(evidence, EstimationSettings())]
    assert [{k: r[k] for k in direct[0]} for r in ranking] == direct
    assert all(0.0 <= r["pa"] <= 1.0 and 0.0 <= r["asr"] <= 1.0 for r in ranking)
    assert ranking[0]["pa"] >= 0.9  # the subset ranked first without labels works (PA with labels)
