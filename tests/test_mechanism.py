"""The subsampled Gaussian mechanism: generator seeding, bounding, Poisson sampling, noise scale."""

import pytest
import torch

from privdiff.errors import PrivdiffError
from privdiff.privacy import mechanism
from privdiff.privacy.mechanism import bound_vectors, gaussian_aggregate, poisson_sample, secure_generator


def test_unseeded_generators_differ():
    a = torch.randn(16, generator=secure_generator())
    b = torch.randn(16, generator=secure_generator())
    assert not torch.equal(a, b)


def test_unseeded_generator_is_seeded_from_secrets(monkeypatch):
    monkeypatch.setattr(mechanism.secrets, "randbits", lambda bits: 1234)
    a = torch.randn(4, generator=secure_generator())
    assert torch.equal(a, torch.randn(4, generator=torch.Generator().manual_seed(1234)))


def test_seeded_generators_reproduce():
    assert torch.equal(torch.randn(8, generator=secure_generator(7)), torch.randn(8, generator=secure_generator(7)))


@pytest.mark.parametrize("seed", [-1, 1.5, 2**64, True])
def test_bad_seed(seed):
    with pytest.raises(PrivdiffError, match="seed"):
        secure_generator(seed)


def test_clip_scales_only_long_rows():
    directions = torch.nn.functional.normalize(torch.randn(4, 2, 3, generator=secure_generator(0)), dim=(1, 2))
    vectors = directions * torch.tensor([0.0, 0.5, 2.0, 10.0])[:, None, None]
    out = bound_vectors(vectors, 1.0)
    norms = out.flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.tensor([0.0, 0.5, 1.0, 1.0]), atol=1e-6)
    assert torch.allclose(out[1:], directions[1:] * norms[1:, None, None], atol=1e-6)  # directions kept
    assert out.shape == vectors.shape and out.dtype == vectors.dtype


def test_normalize_sets_every_norm():
    vectors = torch.randn(5, 768, generator=secure_generator(1), dtype=torch.float64) * torch.arange(1, 6)[:, None]
    out = bound_vectors(vectors, 2.5, bound="normalize")
    assert torch.allclose(out.norm(dim=1), torch.full((5,), 2.5, dtype=torch.float64))
    assert torch.allclose(torch.nn.functional.normalize(out), torch.nn.functional.normalize(vectors))


def test_bounded_norm_never_exceeds_clip_norm_in_float32():
    vectors = torch.randn(1000, 768, generator=secure_generator(2)) * 50
    assert bound_vectors(vectors, 0.1).norm(dim=1).max() <= 0.1 * (1 + 1e-6)


@pytest.mark.parametrize(
    ("vectors", "kwargs", "fragment"),
    [
        (torch.tensor([[1.0, 2.0], [float("nan"), 0.0]]), {}, "vectors contain NaN or inf (row 1)"),
        (torch.tensor([[1.0, 2.0], [0.0, 1.0], [float("inf"), 0.0]]), {}, "vectors contain NaN or inf (row 2)"),
        (torch.ones(2, 3), {"clip_norm": 0.0}, "clip_norm must be > 0, got 0.0"),
        (torch.ones(2, 3), {"clip_norm": -1.0}, "clip_norm must be > 0, got -1.0"),
        (torch.ones(2, 3), {"clip_norm": float("nan")}, "clip_norm must be a finite number, got nan"),
        (torch.ones(2, 3), {"bound": "scale"}, "bound='scale' is not one of clip, normalize"),
        (torch.ones(2, 3, dtype=torch.long), {}, "vectors must be floating point"),
        (torch.tensor(1.0), {}, "vectors must have a leading row dimension"),
        (torch.tensor([[1.0, 0.0], [0.0, 0.0]]), {"bound": "normalize"}, "row 1 of the vectors is zero"),
    ],
)
def test_bound_vectors_bad_input(vectors, kwargs, fragment):
    with pytest.raises(PrivdiffError) as info:
        bound_vectors(vectors, **({"clip_norm": 1.0} | kwargs))
    assert fragment in str(info.value)


def test_poisson_sample_rate():
    n, q = 200_000, 0.1
    idx = poisson_sample(n, q, secure_generator(3))
    assert idx.dtype == torch.long
    assert torch.equal(idx, torch.unique(idx))  # sorted, no repeats
    assert int(idx.min()) >= 0 and int(idx.max()) < n
    assert abs(len(idx) - n * q) < 5 * (n * q * (1 - q)) ** 0.5


def test_poisson_sample_edges():
    assert torch.equal(poisson_sample(50, 1.0, secure_generator()), torch.arange(50))
    assert poisson_sample(0, 0.5, secure_generator()).numel() == 0
    for bad, fragment in [(0.0, "sample_rate must be in (0, 1], got 0.0"), (1.01, "got 1.01")]:
        with pytest.raises(PrivdiffError, match=fragment.replace("(", r"\(").replace("]", r"\]")):
            poisson_sample(10, bad, secure_generator())
    with pytest.raises(PrivdiffError, match="n must be an integer >= 0, got -1"):
        poisson_sample(-1, 0.5, secure_generator())


def test_gaussian_aggregate_noise_scale():
    gen = secure_generator(seed=20240611)  # fixed *test* seed: stable statistics
    m, dim, clip, sigma, expected = 30, 64, 2.0, 1.5, 25.0
    vectors = torch.randn(m, dim, generator=gen, dtype=torch.float64) * 3  # norms ~24 > clip: clipped
    mean = bound_vectors(vectors, clip).sum(dim=0) / expected
    draws = torch.stack([gaussian_aggregate(vectors, clip, sigma, expected, gen) for _ in range(3000)])
    noise = draws - mean
    target = sigma * clip / expected
    assert noise.std().item() == pytest.approx(target, rel=0.02)  # pooled over 192k values
    per_coordinate = noise.std(dim=0)
    assert ((per_coordinate / target - 1).abs() < 0.1).all()  # each coordinate from 3000 draws
    assert noise.mean().abs().item() < 0.02 * target


def test_gaussian_aggregate_empty_sample_and_shape():
    gen = secure_generator(5)
    out = gaussian_aggregate(torch.empty(0, 4, 768), 1.0, 2.0, 10.0, gen)
    assert out.shape == (4, 768) and out.dtype == torch.float32
    assert out.std().item() == pytest.approx(2.0 * 1.0 / 10.0, rel=0.05)


def test_gaussian_aggregate_is_reproducible_only_with_a_seed():
    vectors = torch.ones(3, 8)
    assert torch.equal(gaussian_aggregate(vectors, 1.0, 1.0, 3.0, secure_generator(9)),
                       gaussian_aggregate(vectors, 1.0, 1.0, 3.0, secure_generator(9)))
    assert not torch.equal(gaussian_aggregate(vectors, 1.0, 1.0, 3.0, secure_generator()),
                           gaussian_aggregate(vectors, 1.0, 1.0, 3.0, secure_generator()))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier must be > 0, got 0.0"),
        ({"expected_count": 0.0}, "expected_count must be > 0, got 0.0"),
        ({"expected_count": float("inf")}, "expected_count must be a finite number, got inf"),
        ({"clip_norm": -2.0}, "clip_norm must be > 0, got -2.0"),
        ({"vectors": torch.tensor([[0.0, float("nan")]])}, "vectors contain NaN or inf (row 0)"),
    ],
)
def test_gaussian_aggregate_bad_values(kwargs, fragment):
    args = {"vectors": torch.ones(2, 3), "clip_norm": 1.0, "noise_multiplier": 1.0, "expected_count": 2.0,
            "generator": secure_generator()} | kwargs
    with pytest.raises(PrivdiffError) as info:
        gaussian_aggregate(**args)
    assert fragment in str(info.value)
