"""The subsampled Gaussian mechanism: bounding, Poisson sampling, grid noise (noisy_sum), the aggregate."""

import logging
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils._python_dispatch import TorchDispatchMode

from privdiff.errors import PrivdiffError
from privdiff.privacy.mechanism import (
    MAX_SUM_ROWS,
    _row_norm_bounds,
    bound_vectors,
    clipped_sum,
    gaussian_aggregate,
    noise_grid,
    noisy_sum,
    pairwise_sum_,
    poisson_sample,
)
from privdiff.privacy.randomness import SecureRandom
from privdiff.release import dp_params


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_clip_scales_only_long_rows():
    directions = torch.nn.functional.normalize(_randn(4, 2, 3), dim=(1, 2))
    vectors = directions * torch.tensor([0.0, 0.5, 2.0, 10.0])[:, None, None]
    out = bound_vectors(vectors, 1.0)
    assert out.shape == vectors.shape and out.dtype == torch.float64
    norms = out.flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.tensor([0.0, 0.5, 1.0, 1.0], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(out[1:], directions[1:].double() * norms[1:, None, None], atol=1e-6)  # directions kept


def test_normalize_sets_every_norm():
    vectors = _randn(5, 768, seed=1, dtype=torch.float64) * torch.arange(1, 6)[:, None]
    out = bound_vectors(vectors, 2.5, bound="normalize")
    assert torch.allclose(out.norm(dim=1), torch.full((5,), 2.5, dtype=torch.float64))
    assert torch.allclose(torch.nn.functional.normalize(out), torch.nn.functional.normalize(vectors))


@pytest.mark.parametrize("bound", ["clip", "normalize"])
@pytest.mark.parametrize("clip", [1e-3, 0.1, 1.0, 3.7, 1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bounded_norm_never_exceeds_clip_norm(bound, clip, dtype):
    """1000 rows at scales 1e-3..1e6: no float64 norm above C, not even by one ulp."""
    scales = torch.logspace(-3, 6, 1000, dtype=torch.float64)[:, None]
    vectors = (_randn(1000, 768, seed=2, dtype=torch.float64) / 768**0.5 * scales).to(dtype)
    out = bound_vectors(vectors, clip, bound=bound)
    assert out.dtype == torch.float64
    assert float(out.norm(dim=1).max()) <= clip
    assert float(out.flatten(1).norm(dim=1).max()) <= clip
    if bound == "normalize":
        assert torch.allclose(out.norm(dim=1), torch.full((1000,), clip, dtype=torch.float64), rtol=1e-12)


@pytest.mark.parametrize("bound", ["clip", "normalize"])
def test_bad_rows_become_zero_with_one_anonymous_warning(bound, caplog):
    vectors = torch.tensor([[3.0, 4.0], [float("nan"), 0.0], [0.0, float("inf")], [0.0, 0.0], [0.3, 0.4]])
    with caplog.at_level(logging.WARNING, logger="privdiff"):
        out = bound_vectors(vectors, 1.0, bound=bound)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1:4], torch.zeros(3, 2, dtype=torch.float64))
    assert torch.allclose(out[0], torch.tensor([0.6, 0.8], dtype=torch.float64))
    want_last = [0.6, 0.8] if bound == "normalize" else [0.3, 0.4]
    assert torch.allclose(out[4], torch.tensor(want_last, dtype=torch.float64))
    (record,) = caplog.records
    replaced = 3 if bound == "normalize" else 2  # a zero row is only refused by normalize
    assert record.getMessage().startswith(f"{replaced} of 5 vectors")
    assert "row" not in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="privdiff"):
        bound_vectors(vectors[[0, 4]], 1.0, bound=bound)
    assert not caplog.records


@pytest.mark.parametrize(
    ("vectors", "kwargs", "fragment"),
    [
        (torch.ones(2, 3), {"clip_norm": 0.0}, "clip_norm must be > 0, got 0.0"),
        (torch.ones(2, 3), {"clip_norm": -1.0}, "clip_norm must be > 0, got -1.0"),
        (torch.ones(2, 3), {"clip_norm": float("nan")}, "clip_norm must be a finite number, got nan"),
        (torch.ones(2, 3), {"bound": "scale"}, "bound='scale' is not one of clip, normalize"),
        (torch.ones(2, 3, dtype=torch.long), {}, "vectors must be floating point"),
        (torch.tensor(1.0), {}, "vectors must have a leading row dimension"),
        ([[1.0]], {}, "vectors must be a torch tensor, got list"),
    ],
)
def test_bound_vectors_bad_input(vectors, kwargs, fragment):
    with pytest.raises(PrivdiffError) as info:
        bound_vectors(vectors, **({"clip_norm": 1.0} | kwargs))
    assert fragment in str(info.value)


def _exact_norm_squared(row: torch.Tensor) -> Fraction:
    return sum(Fraction(x) ** 2 for x in row.tolist())


@pytest.mark.parametrize("clip", [1.0, 0.37, 3e-4])
def test_clipped_sum_matches_bound_vectors_without_concatenating(clip):
    parts = [_randn(9, 5, 7, seed=1), _randn(9, 300, seed=2) * 0.1, _randn(9, 1, seed=3)]
    want = bound_vectors(torch.cat([p.flatten(1) for p in parts], dim=1), clip).sum(dim=0)
    got = clipped_sum(parts, clip)
    assert [g.shape for g in got] == [p.shape[1:] for p in parts] and all(g.dtype == torch.float64 for g in got)
    # the norm bounds are at most 2**-12 above the exact norms: clipped rows are that much shorter at most
    torch.testing.assert_close(torch.cat([g.flatten() for g in got]), want, rtol=2.0**-11, atol=1e-15)
    short = [p * clip / 100 for p in parts]  # rows far below C are not scaled: an exact float64 sum
    want = torch.cat([p.flatten(1) for p in short], dim=1).double().sum(dim=0)
    torch.testing.assert_close(torch.cat([g.flatten() for g in clipped_sum(short, clip)]), want, rtol=1e-13, atol=0)


class _Ops(TorchDispatchMode):
    """Records the aten ops that run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_a_rows_norm_bound_is_computed_elementwise():
    """No reduction kernel: on CUDA its summation order follows the number of rows (Reduce.cuh sizes its blocks by
    the output count), which would make a row's clip depend on the other rows of the Poisson batch."""
    x = _randn(5, 3000, seed=4)
    with _Ops() as ops:  # clipped_sum's row scales come from these bounds, elementwise
        _row_norm_bounds([x[:, :2500], x[:, 2500:]])
    reductions = {"sum", "norm", "linalg_vector_norm", "mean", "mv", "mm", "addmv", "dot", "prod", "cumsum"}
    assert ops.names and not ops.names & reductions, sorted(ops.names)
    bounds = torch.stack([_row_norm_bounds([x[i:i + 1]])[0][0] for i in range(5)])
    assert torch.equal(_row_norm_bounds([x])[0], bounds)


def test_clipped_sum_float32_overflow_falls_back_to_float64():
    rows = torch.full((2, 3000), 1e35)  # each norm overflows float32 but not float64
    out = clipped_sum([rows[:, :2000], rows[:, 2000:]], 1.0)
    assert float(torch.cat(out).norm()) == pytest.approx(2.0, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clipped_rows_have_exact_norm_at_most_clip(dtype):
    """One row at a time the sum is the clipped row: its exact (rational) norm never exceeds C, at C and just
    above or below it, where rounding decides."""
    clip = 0.7
    for seed in range(40):
        row = _randn(1, 257, seed=seed, dtype=torch.float64)
        for factor in (1 - 2.0**-52, 1.0, 1 + 2.0**-52, 1 + 2.0**-40, 3.0, 1e-3):
            scaled = (row / row.norm() * clip * factor).to(dtype)
            out = clipped_sum([scaled[:, :100], scaled[:, 100:]], clip)
            assert _exact_norm_squared(torch.cat(out)) <= Fraction(clip) ** 2


# Values whose low bits a running (BLAS) sum of ~1e5 rows rounds away in one direction, add after add.
_HARD_VALUES = (1.5 + 2.0**-40, 1.875 + 2.0**-41 + 2.0**-45, 1 + 2.0**-20 + 2.0**-45, 0.75 + 2.0**-41)


@pytest.mark.parametrize("rows", [8192, dp_params.MAX_RECORDS + 1])
def test_clipped_sum_error_is_within_the_grid_slack_at_the_record_cap(rows):
    """Every coordinate of the float64 sum is within the proven pairwise bound gamma_{L+1} m C, and so within half
    a grid step of the exact sum of the scaled rows, up to the record cap (torch.mv erred by 5x at 8192 rows)."""
    clip = 2 - 2.0**-40
    half_step = noise_grid(clip, 1.0) / 2
    depth = math.ceil(math.log2(rows)) + 1
    proven = depth * 2.0**-53 / (1 - depth * 2.0**-53) * rows * clip
    assert proven < half_step
    for value in _HARD_VALUES:
        x = torch.zeros(rows, 2, dtype=torch.float64)
        x[:, 0] = value  # row norm value < C (1 - 2**-11): each row is scaled by exactly 1 - 2**-50, a rounded product
        (got,) = clipped_sum([x], clip)
        exact = Fraction(value * (1 - 2.0**-50)) * rows
        assert abs(Fraction(float(got[0])) - exact) <= Fraction(proven), value
        assert float(got[1]) == 0.0


def test_pairwise_sum_is_exact_on_a_tree_and_bounded_on_hard_rows():
    for rows in (0, 1, 2, 3, 5, 1000, 1023):
        x = torch.arange(rows * 3, dtype=torch.float64).view(rows, 3)
        assert torch.equal(pairwise_sum_(x.clone()), x.sum(dim=0))  # small integers: every order is exact
    rows = dp_params.MAX_RECORDS
    depth = math.ceil(math.log2(rows))
    for value in _HARD_VALUES:
        got = float(pairwise_sum_(torch.full((rows, 1), value, dtype=torch.float64))[0])
        assert abs(Fraction(got) - Fraction(value) * rows) <= Fraction(depth * 2.0**-53 * rows * value)
    with pytest.raises(PrivdiffError, match="float64"):
        pairwise_sum_(torch.ones(2, 2))
    with pytest.raises(PrivdiffError, match=f"{MAX_SUM_ROWS + 1} rows are over"):
        clipped_sum([torch.zeros(MAX_SUM_ROWS + 1, 1)], 1.0)


def test_clipped_sum_drops_nan_rows_with_a_count(caplog):
    parts = [torch.ones(4, 3), torch.ones(4, 2)]
    parts[1][2, 0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="privdiff"):
        out = clipped_sum(parts, 10.0)
    torch.testing.assert_close(out[0], torch.full((3,), 3.0, dtype=torch.float64), rtol=1e-14, atol=0)
    (record,) = caplog.records
    assert record.getMessage().startswith("1 of 4 vectors held NaN/inf")
    empty = clipped_sum([torch.zeros(0, 3), torch.zeros(0, 5, 1000)], 1.0)  # an empty Poisson batch
    assert [e.shape for e in empty] == [(3,), (5, 1000)] and not any(e.any() for e in empty)
    with pytest.raises(PrivdiffError, match="parts disagree on the number of rows"):
        clipped_sum([torch.ones(2, 3), torch.ones(3, 3)], 1.0)
    with pytest.raises(PrivdiffError, match="clip_norm must be > 0"):
        clipped_sum([torch.ones(2, 3)], 0.0)


def test_poisson_sample_rate():
    n, q = 200_000, 0.1
    idx = poisson_sample(n, q, SecureRandom(3))
    assert idx.dtype == torch.long and idx.device.type == "cpu"
    assert torch.equal(idx, torch.unique(idx))  # sorted, no repeats
    assert int(idx.min()) >= 0 and int(idx.max()) < n
    assert abs(len(idx) - n * q) < 5 * (n * q * (1 - q)) ** 0.5


def test_poisson_sample_edges():
    assert torch.equal(poisson_sample(50, 1.0, SecureRandom()), torch.arange(50))
    assert poisson_sample(0, 0.5, SecureRandom()).numel() == 0
    for bad, fragment in [(0.0, "sample_rate must be in (0, 1], got 0.0"), (1.01, "got 1.01")]:
        with pytest.raises(PrivdiffError, match=fragment.replace("(", r"\(").replace("]", r"\]")):
            poisson_sample(10, bad, SecureRandom())
    with pytest.raises(PrivdiffError, match="n must be an integer >= 0, got -1"):
        poisson_sample(-1, 0.5, SecureRandom())
    with pytest.raises(PrivdiffError, match="rng must be a SecureRandom, got Generator"):
        poisson_sample(10, 0.5, torch.Generator())


@pytest.mark.parametrize(("clip", "sigma"), [(1.0, 1.0), (0.3, 0.7), (5.0, 3000.0), (2.0**-20, 2.0**25)])
def test_noisy_sum_lies_on_a_power_of_two_grid(clip, sigma):
    gamma = noise_grid(clip, sigma)
    assert math.frexp(gamma)[0] == 0.5  # a power of two
    assert gamma <= clip * 2.0**-10 and gamma > clip * 2.0**-31
    total = _randn(4, 300, seed=3, dtype=torch.float64) * clip * 7
    out = noisy_sum(total, clip, sigma, SecureRandom(4))
    assert out.shape == total.shape and out.dtype == torch.float64
    steps = out / gamma
    assert torch.equal(steps, torch.round(steps))
    noise = out - total
    assert noise.std().item() == pytest.approx(sigma * clip, rel=0.1)


def test_noisy_sum_snaps_to_the_grid_before_adding_noise(monkeypatch):
    gamma = noise_grid(1.0, 1.0)
    rng = SecureRandom(5)
    monkeypatch.setattr(rng, "discrete_gaussian", lambda size, sigma: np.zeros(size, dtype=np.int64))
    total = torch.tensor([0.3 * gamma, 0.7 * gamma, -2.5 * gamma, 1.0], dtype=torch.float64)
    assert torch.equal(noisy_sum(total, 1.0, 1.0, rng), torch.tensor([0.0, gamma, -2 * gamma, 1.0],
                                                                      dtype=torch.float64))


def test_noisy_sum_grid_noise_covers_the_rounding(monkeypatch):
    """The discrete Gaussian's std is sigma (C + 2 gamma sqrt(d)) / gamma grid steps, never less."""
    rng, seen = SecureRandom(6), []
    monkeypatch.setattr(rng, "discrete_gaussian", lambda size, sigma: seen.append(sigma) or np.zeros(size, np.int64))
    clip, sigma, d = 0.8, 1.3, 16384
    gamma = noise_grid(clip, sigma)
    noisy_sum(torch.zeros(d, dtype=torch.float64), clip, sigma, rng)
    (grid_sigma,) = seen
    assert grid_sigma >= sigma * (clip + 2 * gamma * d**0.5) / gamma
    assert grid_sigma == pytest.approx(sigma * clip / gamma, rel=1e-5)


def test_noisy_sum_bad_input():
    for total, fragment in [(torch.tensor([1.0, float("nan")]), "total contains NaN or inf"),
                            (torch.ones(3, dtype=torch.long), "total must be a floating-point torch tensor")]:
        with pytest.raises(PrivdiffError, match=fragment):
            noisy_sum(total, 1.0, 1.0, SecureRandom())
    with pytest.raises(PrivdiffError, match="rng must be a SecureRandom"):
        noisy_sum(torch.ones(3), 1.0, 1.0, torch.Generator())


def test_gaussian_aggregate_noise_scale_and_normality():
    rng = SecureRandom(20240611)  # fixed *test* seed: stable statistics
    m, dim, clip, sigma, divisor = 30, 64, 2.0, 1.5, 25.0
    vectors = _randn(m, dim, seed=7, dtype=torch.float64) * 3  # norms ~24 > clip: clipped
    mean = bound_vectors(vectors, clip).sum(dim=0) / divisor
    draws = torch.stack([gaussian_aggregate(vectors, clip, sigma, divisor, rng) for _ in range(3000)])
    noise = draws - mean
    target = sigma * clip / divisor
    assert noise.std().item() == pytest.approx(target, rel=0.02)  # pooled over 192k values
    per_coordinate = noise.std(dim=0)
    assert ((per_coordinate / target - 1).abs() < 0.1).all()  # each coordinate from 3000 draws
    assert noise.mean().abs().item() < 0.02 * target
    assert stats.kstest((noise / target).flatten().numpy(), "norm").pvalue > 1e-3


def test_gaussian_aggregate_with_bad_rows_keeps_its_distribution(caplog):
    """A NaN, inf or zero row adds nothing: same mean (the clean rows' sum / divisor), same noise std."""
    clip, sigma, divisor, draws = 1.0, 2.0, 4.0, 2000
    clean = _randn(3, 32, seed=8, dtype=torch.float64) * 0.1
    dirty = torch.cat([clean, torch.full((1, 32), float("nan"), dtype=torch.float64)])
    dirty[-1, 5] = float("inf")
    rng = SecureRandom(11)
    with caplog.at_level(logging.WARNING, logger="privdiff"):
        with_bad = torch.stack([gaussian_aggregate(dirty, clip, sigma, divisor, rng) for _ in range(draws)])
    without = torch.stack([gaussian_aggregate(clean, clip, sigma, divisor, rng) for _ in range(draws)])
    want = clean.sum(dim=0) / divisor
    target = sigma * clip / divisor
    for release in (with_bad, without):
        assert torch.isfinite(release).all()
        assert release.std().item() == pytest.approx(target, rel=0.03)
        assert (release.mean(dim=0) - want).abs().max().item() < 5 * target / draws**0.5
    assert with_bad.std().item() == pytest.approx(without.std().item(), rel=0.04)
    assert len(caplog.records) == draws and "row" not in caplog.records[0].getMessage()


def test_gaussian_aggregate_empty_sample_and_shape():
    out = gaussian_aggregate(torch.empty(0, 4, 768), 1.0, 2.0, 10.0, SecureRandom(5))
    assert out.shape == (4, 768) and out.dtype == torch.float32
    assert out.std().item() == pytest.approx(2.0 * 1.0 / 10.0, rel=0.05)


def test_gaussian_aggregate_is_reproducible_only_with_a_seed():
    vectors = torch.ones(3, 8)
    assert torch.equal(gaussian_aggregate(vectors, 1.0, 1.0, 3.0, SecureRandom(9)),
                       gaussian_aggregate(vectors, 1.0, 1.0, 3.0, SecureRandom(9)))
    assert not torch.equal(gaussian_aggregate(vectors, 1.0, 1.0, 3.0, SecureRandom()),
                           gaussian_aggregate(vectors, 1.0, 1.0, 3.0, SecureRandom()))


def test_seeds_differing_in_high_bits_give_different_noise():
    vectors = torch.ones(3, 8)
    releases = [gaussian_aggregate(vectors, 1.0, 1.0, 3.0, SecureRandom(s)) for s in (5, 5 + 2**32, 5 + 2**40)]
    assert len({tuple(r.tolist()) for r in releases}) == 3


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier must be > 0, got 0.0"),
        ({"divisor": 0.0}, "divisor must be > 0, got 0.0"),
        ({"divisor": float("inf")}, "divisor must be a finite number, got inf"),
        ({"clip_norm": -2.0}, "clip_norm must be > 0, got -2.0"),
        ({"rng": torch.Generator()}, "rng must be a SecureRandom, got Generator"),
    ],
)
def test_gaussian_aggregate_bad_values(kwargs, fragment):
    args = {"vectors": torch.ones(2, 3), "clip_norm": 1.0, "noise_multiplier": 1.0, "divisor": 2.0,
            "rng": SecureRandom()} | kwargs
    with pytest.raises(PrivdiffError) as info:
        gaussian_aggregate(**args)
    assert fragment in str(info.value)
