"""Canaries: records no real dataset holds, drawn from the CSPRNG, each included with probability 1/2.

Canaries live in memory only: an audit never writes them, nor anything computed from them, to disk.
"""

from __future__ import annotations

import numpy as np
import torch

from privdiff.errors import PrivdiffError
from privdiff.privacy.randomness import SecureRandom

MAX_CANARIES = 100_000
MOSAIC_CELLS = 8
"""A canary image is a MOSAIC_CELLS x MOSAIC_CELLS mosaic of uniformly random colours."""


def check_count(count: int) -> int:
    """``count`` canaries: an integer from 2 to MAX_CANARIES."""
    if isinstance(count, bool) or not isinstance(count, int) or not 2 <= count <= MAX_CANARIES:
        raise PrivdiffError(f"canaries {count!r} must be an integer from 2 to {MAX_CANARIES}")
    return count


def draw_inclusion(count: int, rng: SecureRandom) -> np.ndarray:
    """Which of ``count`` canaries go into the release: each independently with probability 1/2 (bool)."""
    return rng.bernoulli(check_count(count), 0.5).astype(bool)


def canary_images(count: int, size: int, rng: SecureRandom) -> torch.Tensor:
    """``count`` images [count, 3, size, size] in 0..1: mosaics of uniformly random colours, which no photograph
    or drawing holds, distinct from one another with overwhelming probability."""
    count = check_count(count)
    if isinstance(size, bool) or not isinstance(size, int) or size < MOSAIC_CELLS:
        raise PrivdiffError(f"canary image size {size!r} must be an integer of at least {MOSAIC_CELLS} pixels")
    cells = np.frombuffer(rng.random_bytes(count * 3 * MOSAIC_CELLS**2), dtype=np.uint8)
    mosaic = torch.from_numpy(cells.astype(np.float32) / 255).view(count, 3, MOSAIC_CELLS, MOSAIC_CELLS)
    return torch.nn.functional.interpolate(mosaic, size=(size, size), mode="nearest")


def canary_offsets(count: int, dim: int, norm: float, rng: SecureRandom) -> torch.Tensor:
    """``count`` vectors [count, dim] (float32) of norm ``norm``: orthogonal directions, uniformly random as a set,
    when ``count <= dim`` (each canary alone on its axis: the strongest canaries for a sum), else random directions
    (more canaries than dimensions cannot all be apart, and their projections pick up one another)."""
    count = check_count(count)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise PrivdiffError(f"canary dimension {dim!r} must be a positive integer")
    gaussian = torch.from_numpy(rng.standard_normal(count * dim)).view(count, dim)
    if count <= dim:
        q, r = torch.linalg.qr(gaussian.T)  # [dim, count], orthonormal columns
        gaussian = (q * torch.sign(torch.diagonal(r))).T  # the signs make the basis uniformly random (Haar)
    return (gaussian * (norm / gaussian.norm(dim=1, keepdim=True))).to(torch.float32)


def projection_scores(released: torch.Tensor, directions: torch.Tensor) -> np.ndarray:
    """Each canary's score: the released vector projected on the canary's own direction, taken from the
    canaries' mean (what all canaries share says nothing about any one of them). ``released`` [d],
    ``directions`` [m, d]; float64."""
    released = released.detach().to(torch.float64).flatten()
    own = directions.detach().to(torch.float64).flatten(1)
    own = own - own.mean(dim=0, keepdim=True)
    unit = own / own.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return (unit @ released).numpy()
