"""Initial and ancestral noise for encrypted sampling, drawn from the CSPRNG.

A worker that knows the initial latent replays the updates it sees in plaintext (z' = f·z + b, with plain
offsets) and rebuilds the final latent, so the noise must be as secret as the key: by default it comes from
ChaCha20 keyed with 256 bits of ``os.urandom`` and is not recorded. A user seed keys the stream with SHA-256 of
the seed instead, for reproducible runs; the report then says what anyone who knows the seed can rebuild.
"""

from __future__ import annotations

import torch

from privdiff.privacy.randomness import SecureRandom


class LatentNoise:
    """Standard normal tensors from one ``SecureRandom`` stream (secret, or reproducible from ``seed``)."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self.rng = SecureRandom(seed)

    def __call__(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """A float32 tensor of ``shape`` on the CPU."""
        count = 1
        for size in shape:
            count *= int(size)
        return torch.from_numpy(self.rng.standard_normal(count)).float().view(*shape)

    def describe(self) -> str:
        """The report's line on the noise: where it came from, and what knowing the seed gives away."""
        if self.seed is None:
            return "noise: initial and ancestral noise from a 256-bit key (os.urandom), not recorded"
        return (f"noise: seed {self.seed}, a reproducible stream; anyone who knows the seed (a worker too) knows the "
                "initial latent, and with plain offsets replays every update to the final latent (see README)")
