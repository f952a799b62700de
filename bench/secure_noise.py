"""The price of secure noise: the exact discrete Gaussian against the ChaCha20 keystream it reads, and
``noisy_sum`` against the floating-point Gaussian of a once-seeded torch generator (not secure: a baseline).

One core (torch and the sampler on one thread). For the grid sigma that ``noisy_sum`` uses at noise
multiplier 1.1 (and, for reference, a small and a very large sigma) it prints samples per second of
  - the keystream alone, at the bytes per sample the sampler consumes (ChaCha20 into a reused buffer, in
    rounds of the sampler's size: the fastest the same bytes come out of the cipher),
  - the sampler (``SecureRandom.discrete_gaussian``),
then ``noisy_sum`` and the float baseline at d = 768 (SD1 embedding), 2048 (SDXL) and 32,768 (a DP-SGD step
over 16 SDXL vectors), each the best of ``--repeats``. Last line: the sampler's rate over the keystream's.

    .venv/bin/python bench/secure_noise.py [--repeats 5] [--samples 1048576]
"""

from __future__ import annotations

import argparse
import time

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from privdiff.privacy.mechanism import noise_grid, noisy_sum
from privdiff.privacy.randomness import _ROUND, SecureRandom

SIGMA, CLIP = 1.1, 1.0


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _keystream_seconds(total_bytes: int, repeats: int) -> float:
    """Seconds for ChaCha20 to produce ``total_bytes`` in rounds of the sampler's size."""
    chunk = 25 * _ROUND
    zeros, out = bytes(chunk), bytearray(chunk)
    encryptor = Cipher(algorithms.ChaCha20(bytes(32), bytes(16)), mode=None).encryptor()

    def run() -> None:
        for _ in range(-(-total_bytes // chunk)):
            encryptor.update_into(zeros, out)

    return _best(run, repeats)


def _sampler(rng: SecureRandom, sigma: float, n: int, repeats: int) -> tuple[float, float, float]:
    """(sampler samples/s, keystream samples/s at the sampler's bytes per sample, bytes per sample)."""
    rng.discrete_gaussian(1000, sigma)  # warm: the float exp check, the constants for sigma
    used = rng._used
    seconds = _best(lambda: rng.discrete_gaussian(n, sigma), repeats)
    per_sample = (rng._used - used) / (repeats * n)
    return n / seconds, n / _keystream_seconds(round(per_sample * n), repeats), per_sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=1 << 20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng, generator = SecureRandom(), torch.Generator().manual_seed(0)
    grid_sigma = SIGMA * CLIP / noise_grid(CLIP, SIGMA)
    ratio = 0.0
    for sigma, label in ((3.0, "small"), (2.0**41, "very large"), (grid_sigma, "noisy_sum's grid")):
        sampler, keystream, per_sample = _sampler(rng, sigma, args.samples, args.repeats)
        ratio = sampler / keystream
        print(f"sigma {sigma:10.4g} ({label}): keystream {keystream / 1e6:6.2f} M samples/s at {per_sample:.1f} "
              f"bytes/sample, sampler {sampler / 1e6:6.2f} M samples/s ({ratio:.2f} of the keystream)")
    for d in (768, 2048, 16 * 2048):
        total = torch.randn(d, dtype=torch.float64) * 0.1
        secure = _best(lambda t=total: noisy_sum(t, CLIP, SIGMA, rng), args.repeats)
        plain = _best(lambda t=total: t + SIGMA * CLIP * torch.randn(t.shape, generator=generator,
                                                                     dtype=torch.float64), args.repeats)
        print(f"d={d:6d}: noisy_sum {secure * 1e3:7.2f} ms ({d / secure / 1e6:5.2f} M samples/s), "
              f"float randn {plain * 1e3:6.3f} ms, ratio secure/float {secure / plain:6.1f}x")
    print(f"ratio sampler/keystream samples per second: {ratio:.2f}")


if __name__ == "__main__":
    main()
