"""The one subsampled Gaussian mechanism (DESIGN.md §3): bound, Poisson-sample, sum, add noise.

Every DP feature (DPAgg-TI, DP guidance targets, the aggregate command) goes through
``gaussian_aggregate``; its accounting is ``accountants.epsilon_for(sigma, q, 1, delta)``.
"""

from __future__ import annotations

import math
import secrets

import torch
from torch import Tensor

from privdiff.errors import PrivdiffError
from privdiff.privacy import checks

BOUNDS = ("clip", "normalize")


def secure_generator(seed: int | None = None, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded from the OS CSPRNG (``secrets``), or from ``seed`` for reproducibility.

    A reproducible seed makes the noise recomputable: the caller must then mark the release not private.
    """
    if seed is None:
        seed = secrets.randbits(64)
    else:
        seed = checks.count("seed", seed, minimum=0)
        if seed >= 2**64:
            raise PrivdiffError(f"seed must be < 2**64, got {seed}")
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def bound_vectors(vectors: Tensor, clip_norm: float, bound: str = "clip") -> Tensor:
    """Bound each row (first dim; L2 norm over all other dims) to norm ``clip_norm``.

    ``"clip"`` scales rows with a larger norm down to ``clip_norm``; ``"normalize"`` scales every row to
    exactly ``clip_norm`` (a zero row is refused). Returns a new tensor of the input's dtype.
    """
    c = checks.positive("clip_norm", clip_norm)
    if bound not in BOUNDS:
        raise PrivdiffError(f"bound={bound!r} is not one of {', '.join(BOUNDS)}")
    _check_vectors(vectors)
    rows = vectors.shape[0]
    flat = vectors.reshape(rows, math.prod(vectors.shape[1:])).double()
    norms = flat.norm(dim=1)
    if bound == "normalize":
        zero = (norms == 0).nonzero()
        if len(zero):
            raise PrivdiffError(f"cannot normalize: row {int(zero[0])} of the vectors is zero")
        scale = c / norms
    else:
        scale = (c / norms).clamp(max=1.0)  # a zero row gives inf, clamped to 1
    return (flat * scale[:, None]).reshape(vectors.shape).to(vectors.dtype)


def poisson_sample(n: int, sample_rate: float, generator: torch.Generator) -> Tensor:
    """Indices (long, on the generator's device) of a Poisson sample: each of ``n`` kept with prob. q."""
    n = checks.count("n", n, minimum=0)
    q = checks.sample_rate(sample_rate)
    draws = torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device)
    return torch.nonzero(draws < q).flatten()


def gaussian_aggregate(
    vectors: Tensor,
    clip_norm: float,
    noise_multiplier: float,
    expected_count: float,
    generator: torch.Generator,
    bound: str = "clip",
) -> Tensor:
    """DP mean of the rows of ``vectors``: bound each to ``clip_norm``, sum, add N(0, sigma^2 C^2 I) noise,
    divide by the public ``expected_count`` (q * N).

    ``vectors`` [m, ...] are the sampled rows (m may be 0); the result has shape ``vectors.shape[1:]``,
    the input's dtype and device. Noise is drawn in float64 on the generator's device.
    """
    sigma = checks.positive("noise_multiplier", noise_multiplier)
    count = checks.positive("expected_count", expected_count)
    bounded = bound_vectors(vectors, clip_norm, bound)
    total = bounded.double().sum(dim=0)
    noise = torch.randn(total.shape, generator=generator, dtype=torch.float64, device=generator.device)
    noisy = total + (sigma * float(clip_norm)) * noise.to(total.device)
    return (noisy / count).to(vectors.dtype)


def _check_vectors(vectors: Tensor) -> None:
    if not isinstance(vectors, Tensor):
        raise PrivdiffError(f"vectors must be a torch tensor, got {type(vectors).__name__}")
    if vectors.dim() < 1:
        raise PrivdiffError("vectors must have a leading row dimension, got a 0-d tensor")
    if not vectors.is_floating_point():
        raise PrivdiffError(f"vectors must be floating point, got dtype {vectors.dtype}")
    finite = torch.isfinite(vectors)
    if not bool(finite.all()):
        row = int((~finite).reshape(vectors.shape[0], -1).any(dim=1).nonzero()[0])
        raise PrivdiffError(f"vectors contain NaN or inf (row {row})")
