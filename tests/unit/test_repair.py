"""The fused latent repair: projection and constant modes, several directions, scores and flags."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fire_backend.fire import MODES, CompiledRepair, Direction, compile_directions, repair

D = 16
SETTINGS = settings(max_examples=30, deadline=None)


def vectors(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def reference(x: torch.Tensor, mu: torch.Tensor, directions: list[Direction]):
    """The formula documented in CompiledRepair, in float64, one direction at a time."""
    x64, mu64 = x.double().reshape(len(x), -1), mu.double()
    removed = torch.zeros_like(x64)
    coefficients = []
    flagged = torch.zeros(len(x), dtype=torch.bool)
    for d in directions:
        beta = d.beta.double()
        u = beta / beta.norm()
        s = x64 @ u - mu64 @ u
        coefficient = s / beta.norm()
        amount = (
            d.alpha * s.clamp_min(0)
            if d.mode == "projection"
            else torch.full_like(s, d.alpha * float(beta.norm()))
        )
        removed += amount[:, None] * u[None, :]
        coefficients.append(coefficient)
        flagged |= coefficient > d.threshold
    return x64 - removed, torch.stack(coefficients, 1).max(1).values, flagged


def test_modes() -> None:
    assert MODES == ("projection", "constant")
    with pytest.raises(ValueError, match="mode"):
        Direction(torch.ones(D), mode="subtract")


@SETTINGS
@given(seed=st.integers(0, 2**16), alpha=st.floats(0.0, 3.0))
def test_projection_leaves_orthogonal_vectors_alone(seed: int, alpha: float) -> None:
    beta = vectors(seed, D) * 4
    u = unit(beta)
    x = vectors(seed + 1, 8, D)
    x = x - (x @ u)[:, None] * u  # orthogonal to beta
    compiled = compile_directions([Direction(beta, alpha=alpha)], torch.zeros(D), D)
    fixed, score, flagged = repair(x, compiled)
    assert torch.allclose(fixed, x, atol=1e-5)
    assert score.abs().max() < 1e-5
    assert not flagged.any()
    # the same, relative to a centroid: x - mu orthogonal to beta
    mu = vectors(seed + 2, D)
    compiled = compile_directions([Direction(beta, alpha=alpha)], mu, D)
    fixed, score, _ = repair(x + mu, compiled)
    assert torch.allclose(fixed, x + mu, atol=1e-5)
    assert score.abs().max() < 1e-5


@SETTINGS
@given(seed=st.integers(0, 2**16), alpha=st.floats(0.0, 3.0), below=st.floats(0.0, 5.0))
def test_projection_leaves_samples_at_or_below_the_centroid_level_unchanged(
    seed: int, alpha: float, below: float
):
    beta, mu = vectors(seed, D) * 3, vectors(seed + 1, D)
    u = unit(beta)
    x = vectors(seed + 2, 6, D)
    # put each sample's component along u at (mu.u - below): on or under the centroid's level
    x = x + ((mu @ u - below) - x @ u)[:, None] * u
    fixed, score, _ = repair(x, compile_directions([Direction(beta, alpha=alpha)], mu, D))
    assert torch.allclose(fixed, x, atol=1e-5)
    assert (score <= 1e-5).all()
    if below > 1e-3:  # strictly below: nothing at all is removed
        assert torch.equal(fixed, x)


@SETTINGS
@given(seed=st.integers(0, 2**16), excess=st.floats(0.01, 20.0))
def test_projection_alpha_one_removes_the_excess_exactly(seed: int, excess: float) -> None:
    beta, mu = vectors(seed, D) * 2, vectors(seed + 1, D)
    u = unit(beta)
    x = vectors(seed + 2, 5, D)
    x = x + ((mu @ u + excess) - x @ u)[:, None] * u
    fixed, score, _ = repair(x, compile_directions([Direction(beta, alpha=1.0)], mu, D))
    assert torch.allclose(fixed @ u, (mu @ u).expand(5), atol=1e-4)  # back at the centroid's level
    moved = fixed - x
    assert torch.allclose(moved, -(excess * u).expand(5, D), atol=1e-4)  # only along u
    assert torch.allclose(score, torch.full((5,), excess / float(beta.norm())), atol=1e-4)


@SETTINGS
@given(seed=st.integers(0, 2**16), alpha=st.floats(0.0, 3.0))
def test_projection_matches_the_formula_for_any_alpha(seed: int, alpha: float) -> None:
    beta, mu = vectors(seed, D) * 2, vectors(seed + 1, D)
    x = vectors(seed + 2, 10, D) * 2
    direction = Direction(beta, alpha=alpha)
    fixed, score, flagged = repair(x, compile_directions([direction], mu, D))
    want, want_score, want_flagged = reference(x, mu, [direction])
    assert torch.allclose(fixed.double(), want, atol=1e-4)
    assert torch.allclose(score.double(), want_score, atol=1e-5)
    assert torch.equal(flagged, want_flagged) or (want_score - direction.threshold).abs().min() < 1e-5


@SETTINGS
@given(seed=st.integers(0, 2**16), alpha=st.floats(0.0, 3.0))
def test_constant_mode_subtracts_alpha_beta(seed: int, alpha: float) -> None:
    beta, mu = vectors(seed, D) * 2, vectors(seed + 1, D)
    x = vectors(seed + 2, 7, D) * 3
    fixed, _, _ = repair(x, compile_directions([Direction(beta, alpha=alpha, mode="constant")], mu, D))
    assert torch.allclose(fixed, x - alpha * beta, atol=1e-5)
    # constant mode ignores the centroid
    fixed_other_mu, _, _ = repair(
        x, compile_directions([Direction(beta, alpha=alpha, mode="constant")], mu * 5, D)
    )
    assert torch.allclose(fixed_other_mu, fixed, atol=1e-5)


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    alphas=st.tuples(st.floats(0.0, 2.0), st.floats(0.0, 2.0)),
    modes=st.tuples(st.sampled_from(MODES), st.sampled_from(MODES)),
    thresholds=st.tuples(st.floats(-1.0, 2.0), st.floats(-1.0, 2.0)),
)
def test_two_directions_follow_the_fused_formula(seed: int, alphas, modes, thresholds) -> None:
    mu = vectors(seed, D)
    betas = [vectors(seed + 1, D) * 3, vectors(seed + 2, D) * 2]  # not orthogonal in general
    directions = [
        Direction(b, alpha=a, mode=m, threshold=t, name=f"d{i}")
        for i, (b, a, m, t) in enumerate(zip(betas, alphas, modes, thresholds, strict=True))
    ]
    x = torch.cat(
        [
            torch.stack([mu + 1.2 * betas[0], mu + 0.8 * betas[1], mu + betas[0] + betas[1]]),
            vectors(seed + 3, 5, D) * 3,
        ]
    )
    compiled = compile_directions(directions, mu, D)
    assert compiled.units.shape == (2, D) and not compiled.empty
    fixed, score, flagged = repair(x, compiled)
    want, want_score, want_flagged = reference(x, mu, directions)
    assert torch.allclose(fixed.double(), want, atol=1e-4)
    assert torch.allclose(score.double(), want_score, atol=1e-5)
    ambiguous = torch.stack([(reference(x, mu, [d])[1] - d.threshold).abs() < 1e-5 for d in directions]).any(
        0
    )
    assert torch.equal(flagged[~ambiguous], want_flagged[~ambiguous])


def test_empty_direction_set_returns_the_input() -> None:
    compiled = compile_directions([], None, D)
    assert compiled.empty
    x = vectors(0, 4, 2, 2, 4)
    fixed, score, flagged = repair(x, compiled)
    assert torch.equal(fixed, x)
    assert torch.equal(score, torch.zeros(4))
    assert flagged.dtype == torch.bool and not flagged.any()
    fixed, _, _ = repair(x, compile_directions([], torch.zeros(D), D))
    assert torch.equal(fixed, x)


def test_score_is_one_for_a_shifted_sample_and_zero_at_the_centroid() -> None:
    beta, mu = vectors(1, D) * 5, vectors(2, D)
    compiled = compile_directions([Direction(beta)], mu, D)
    _, score, flagged = repair(torch.stack([mu + beta, mu, mu + 0.5 * beta + 1e-3 * beta]), compiled)
    assert torch.allclose(score, torch.tensor([1.0, 0.0, 0.501]), atol=1e-5)
    assert flagged.tolist() == [True, False, True]  # default threshold 0.5


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    c=st.floats(-2.0, 3.0),
    threshold=st.floats(-1.0, 2.0),
    mode=st.sampled_from(MODES),
)
def test_flagged_follows_the_threshold(seed: int, c: float, threshold: float, mode: str) -> None:
    beta, mu = vectors(seed, D) * 3, vectors(seed + 1, D)
    noise = vectors(seed + 2, D)
    noise = noise - (noise @ unit(beta)) * unit(beta)  # orthogonal: does not move the score
    compiled = compile_directions([Direction(beta, threshold=threshold, mode=mode)], mu, D)
    _, score, flagged = repair((mu + c * beta + noise)[None], compiled)
    assert abs(float(score) - c) < 1e-4
    if abs(c - threshold) > 1e-4:
        assert bool(flagged) == (c > threshold)


def test_repair_keeps_latent_shape_and_is_per_sample() -> None:
    mu = vectors(0, 4, 2, 2)
    beta = vectors(1, 4, 2, 2) * 3
    compiled = compile_directions(
        [Direction(beta), Direction(vectors(2, 16), mode="constant", alpha=0.5)], mu, 16
    )
    x = vectors(3, 6, 4, 2, 2) * 2 + beta
    fixed, score, flagged = repair(x, compiled)
    assert fixed.shape == x.shape and fixed.dtype == x.dtype
    assert score.shape == flagged.shape == (6,)
    for i in range(6):
        one, one_score, one_flag = repair(x[i : i + 1], compiled)
        assert torch.allclose(one, fixed[i : i + 1], atol=1e-5)
        assert torch.allclose(one_score, score[i : i + 1], atol=1e-6)


def test_compiled_layout() -> None:
    beta, mu = vectors(1, D) * 4, vectors(2, D)
    compiled = compile_directions(
        [Direction(beta, alpha=1.5, threshold=0.3), Direction(-beta, mode="constant")], mu, D, version=7
    )
    assert isinstance(compiled, CompiledRepair)
    assert compiled.version == 7
    assert torch.allclose(compiled.units.norm(dim=1), torch.ones(2))
    assert torch.allclose(compiled.norms, torch.full((2,), float(beta.norm())))
    assert torch.allclose(compiled.offsets, torch.stack([mu @ unit(beta), -(mu @ unit(beta))]), atol=1e-5)
    assert compiled.alphas.tolist() == [1.5, 1.0]
    assert compiled.projection.tolist() == [True, False]
    assert torch.allclose(compiled.thresholds, torch.tensor([0.3, 0.5]))


def test_compile_directions_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="8 values"):
        compile_directions([Direction(torch.ones(8))], torch.zeros(D), D)
    with pytest.raises(ValueError, match="zero norm"):
        compile_directions([Direction(torch.ones(D)), Direction(torch.zeros(D))], torch.zeros(D), D)
    with pytest.raises(ValueError, match="centroid"):
        compile_directions([Direction(torch.ones(D))], None, D)
    # a spatial beta is flattened, so (4, 2, 2) fits D = 16
    compile_directions([Direction(torch.ones(4, 2, 2))], torch.zeros(4, 2, 2), D)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_compile_directions_rejects_non_finite_betas(bad: float) -> None:
    beta = torch.ones(D)
    beta[3] = bad
    with pytest.raises(ValueError):
        compile_directions([Direction(beta)], torch.zeros(D), D)


def test_compile_directions_rejects_mismatched_lengths_with_value_error() -> None:
    with pytest.raises(ValueError):
        compile_directions([Direction(torch.ones(D)), Direction(torch.ones(D - 1))], torch.zeros(D), D)
    with pytest.raises(ValueError):
        compile_directions([Direction(torch.ones(D))], torch.zeros(D - 1), D)
