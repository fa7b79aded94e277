"""Direction estimators on synthetic latents with a planted trigger direction; streaming == batch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fire_backend.fire import (
    AugmentedEstimator,
    PairedEstimator,
    RunningMean,
    UnpairedEstimator,
    centroid,
)

N, D = 200, 64
SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().reshape(1, -1), b.double().reshape(1, -1)))


def planted(seed: int = 0, dtype: torch.dtype = torch.float32, beta_norm: float = 10.0):
    """clean ~ N(0, I); poisoned = clean + beta + small noise; plus a separate clean set for the centroid."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(N, D, generator=g, dtype=dtype)
    beta = torch.randn(D, generator=g, dtype=dtype)
    beta = beta / beta.norm() * beta_norm
    poisoned = clean + beta + 0.05 * torch.randn(N, D, generator=g, dtype=dtype)
    other_clean = torch.randn(N, D, generator=g, dtype=dtype)
    return clean, poisoned, beta, other_clean


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paired_recovers_beta(seed: int) -> None:
    clean, poisoned, beta, _ = planted(seed)
    est = PairedEstimator(D)
    est.observe(poisoned, clean)
    assert est.count == N
    assert est.direction().dtype == torch.float32
    assert est.direction().shape == (D,)
    assert cosine(est.direction(), beta) >= 0.99
    assert (est.direction() - beta).norm() / beta.norm() < 0.05


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unpaired_recovers_beta_with_separate_centroid(seed: int) -> None:
    _, poisoned, beta, other_clean = planted(seed)
    mu = centroid(other_clean)
    est = UnpairedEstimator(D, mu, clean_count=N)
    est.observe(poisoned=poisoned)
    assert est.count == N
    assert cosine(est.direction(), beta) >= 0.99
    assert torch.allclose(est.direction(), (poisoned.double().mean(0) - mu.double()).float(), atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_augmented_recovers_beta_from_noisy_twins(seed: int) -> None:
    clean, poisoned, beta, _ = planted(seed)
    g = torch.Generator().manual_seed(100 + seed)
    twins = [clean + 0.1 * torch.randn(N, D, generator=g) for _ in range(4)]
    est = AugmentedEstimator(D)
    est.observe_augmented(poisoned, twins)
    assert est.count == N
    assert cosine(est.direction(), beta) >= 0.99
    expected = (poisoned.double() - torch.stack([t.double() for t in twins]).mean(0)).mean(0)
    assert torch.allclose(est.direction().double(), expected, atol=1e-5)


def test_estimators_flatten_spatial_latents() -> None:
    g = torch.Generator().manual_seed(5)
    clean = torch.randn(30, 4, 2, 2, generator=g)
    beta = torch.randn(4, 2, 2, generator=g) * 3
    poisoned = clean + beta
    paired = PairedEstimator(16)
    paired.observe(poisoned, clean)
    assert torch.allclose(paired.direction(), beta.reshape(-1), atol=1e-5)
    aug = AugmentedEstimator(16)
    aug.observe_augmented(poisoned, [clean, clean])
    assert torch.allclose(aug.direction(), beta.reshape(-1), atol=1e-5)
    unpaired = UnpairedEstimator(16, centroid(clean), clean_count=30)
    unpaired.observe(poisoned=poisoned)
    assert torch.allclose(unpaired.direction(), beta.reshape(-1), atol=1e-5)
    assert centroid(clean).shape == (16,)


def test_estimator_input_errors() -> None:
    with pytest.raises(ValueError, match="shape"):
        PairedEstimator(4).observe(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="at least one"):
        AugmentedEstimator(4).observe_augmented(torch.zeros(3, 4), [])


def test_counts_accumulate_and_empty_batches_are_ignored() -> None:
    est = UnpairedEstimator(3, torch.zeros(3), clean_count=7)
    assert est.count == 0
    assert est.clean.count == 7
    est.observe(poisoned=torch.ones(2, 3))
    est.observe(clean=torch.zeros(5, 3))
    assert est.count == 2
    assert est.clean.count == 12
    paired = PairedEstimator(3)
    paired.observe(torch.ones(4, 3), torch.zeros(4, 3))
    paired.observe(torch.ones(1, 3), torch.zeros(1, 3))
    assert paired.count == 5
    aug = AugmentedEstimator(3)
    aug.observe_augmented(torch.ones(2, 3), [torch.zeros(2, 3)] * 3)
    assert aug.count == 2  # samples, not augmented copies
    mean = RunningMean(3)
    mean.update(torch.ones(3))  # one sample as a plain vector
    mean.update(torch.ones(0, 3))  # an empty batch changes nothing
    assert mean.count == 1
    assert torch.equal(mean.value(), torch.ones(3))


def test_estimators_accept_an_empty_batch() -> None:
    paired = PairedEstimator(3)
    paired.observe(torch.ones(0, 3), torch.zeros(0, 3))
    unpaired = UnpairedEstimator(3, torch.zeros(3))
    unpaired.observe(poisoned=torch.ones(0, 3))
    assert paired.count == unpaired.count == 0


def test_unpaired_clean_observations_refine_the_centroid_by_count() -> None:
    mu = torch.tensor([1.0, 2.0])
    est = UnpairedEstimator(2, mu, clean_count=3)
    est.observe(clean=torch.tensor([[5.0, 6.0]]))
    # (3 * mu + x) / 4
    assert torch.allclose(est.clean.mean, torch.tensor([2.0, 3.0], dtype=torch.float64))
    est.observe(poisoned=torch.tensor([[10.0, 10.0], [12.0, 12.0]]))
    assert torch.allclose(est.direction(), torch.tensor([9.0, 8.0]))


# --- streaming equals batch -------------------------------------------------------------------


@st.composite
def chunked(draw, max_rows: int = 40):
    """A row count and a split of range(rows) into consecutive (possibly empty) chunks."""
    rows = draw(st.integers(1, max_rows))
    cuts = sorted(draw(st.lists(st.integers(0, rows), max_size=8)))
    bounds = [0, *cuts, rows]
    return rows, list(zip(bounds[:-1], bounds[1:], strict=True))


def stream_data(rows: int, seed: int, dtype: torch.dtype, dim: int = 6):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(rows, dim, generator=g, dtype=dtype) * 3 + 5,
        torch.randn(rows, dim, generator=g, dtype=dtype),
    )


@SETTINGS
@given(split=chunked(), seed=st.integers(0, 2**16))
def test_running_mean_stream_equals_batch_float64(split, seed: int) -> None:
    rows, chunks = split
    x, _ = stream_data(rows, seed, torch.float64)
    mean = RunningMean(6)
    for a, b in chunks:
        mean.update(x[a:b])
    assert mean.count == rows
    assert torch.allclose(mean.mean, x.mean(0), rtol=0, atol=1e-10)
    one_by_one = RunningMean(6)
    for row in x:
        one_by_one.update(row)
    assert torch.allclose(one_by_one.mean, mean.mean, rtol=0, atol=1e-10)


@SETTINGS
@given(split=chunked(), seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_estimators_stream_equals_batch(split, seed: int, dtype: torch.dtype) -> None:
    rows, chunks = split
    chunks = [(a, b) for a, b in chunks if b > a]  # empty batches: see test_estimators_accept_an_empty_batch
    poisoned, clean = stream_data(rows, seed, dtype)
    mu = centroid(clean)

    def compare(streamed: torch.Tensor, batch: torch.Tensor) -> None:
        # directions are float32: equal up to float32 rounding of the same float64 accumulators
        assert streamed.dtype == torch.float32
        assert torch.allclose(streamed.double(), batch.double(), rtol=1e-6, atol=1e-6)

    paired_batch, paired_stream = PairedEstimator(6), PairedEstimator(6)
    paired_batch.observe(poisoned, clean)
    unpaired_batch, unpaired_stream = UnpairedEstimator(6, mu, rows), UnpairedEstimator(6, mu, rows)
    unpaired_batch.observe(poisoned=poisoned, clean=clean)
    twins = [clean, clean * 0.5]
    aug_batch, aug_stream = AugmentedEstimator(6), AugmentedEstimator(6)
    aug_batch.observe_augmented(poisoned, twins)
    for a, b in chunks:
        paired_stream.observe(poisoned[a:b], clean[a:b])
        unpaired_stream.observe(poisoned=poisoned[a:b])
        unpaired_stream.observe(clean=clean[a:b])
        aug_stream.observe_augmented(poisoned[a:b], [t[a:b] for t in twins])
    for batch, stream in (
        (paired_batch, paired_stream),
        (unpaired_batch, unpaired_stream),
        (aug_batch, aug_stream),
    ):
        assert batch.count == stream.count == rows
        compare(stream.direction(), batch.direction())
    # the float64 accumulators themselves agree to 1e-10 (1e-6 relative for float32 inputs)
    tol = {"rtol": 0, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-6, "atol": 1e-6}
    assert torch.allclose(paired_stream.diff.mean, paired_batch.diff.mean, **tol)
    assert torch.allclose(aug_stream.diff.mean, aug_batch.diff.mean, **tol)
    assert torch.allclose(unpaired_stream.poisoned.mean, unpaired_batch.poisoned.mean, **tol)
    assert torch.allclose(unpaired_stream.clean.mean, unpaired_batch.clean.mean, **tol)
    compare(paired_stream.direction(), (poisoned.double() - clean.double()).mean(0))
    compare(
        unpaired_stream.direction(), poisoned.double().mean(0) - (mu.double() + clean.double().mean(0)) / 2
    )


@SETTINGS
@given(seed=st.integers(0, 2**16))
def test_paired_one_sample_at_a_time_float64(seed: int) -> None:
    poisoned, clean = stream_data(30, seed, torch.float64)
    stream, batch = PairedEstimator(6), PairedEstimator(6)
    for p, c in zip(poisoned, clean, strict=True):
        stream.observe(p[None], c[None])
    batch.observe(poisoned, clean)
    assert stream.count == 30
    assert torch.allclose(stream.diff.mean, batch.diff.mean, rtol=0, atol=1e-10)
    assert torch.allclose(stream.diff.mean, (poisoned - clean).mean(0), rtol=0, atol=1e-10)


def test_running_mean_long_stream_stays_accurate() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, 4, generator=g, dtype=torch.float64) + 1e3
    mean = RunningMean(4)
    for chunk in x.split(7):
        mean.update(chunk)
    assert torch.allclose(mean.mean, x.mean(0), rtol=0, atol=1e-9)


def test_running_mean_rejects_rows_of_the_wrong_width() -> None:
    mean = RunningMean(4)
    with pytest.raises(ValueError):
        mean.update(torch.ones(3, 8))  # 3 samples of 8 values: today counted as 6 samples of 4
