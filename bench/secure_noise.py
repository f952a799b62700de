"""The price of secure noise: ``noisy_sum`` (ChaCha20 + exact discrete Gaussian on a grid) against the
floating-point Gaussian of a once-seeded torch generator that privdiff used before (not secure: a baseline).

For each size d (SD1 embedding 768, SDXL 2048, a DP-SGD step over 16 SDXL vectors) prints the best of
``--repeats`` times of each and their ratio, then one DP-SGD-like figure: the extra seconds secure noise
adds to ``--steps`` steps at the largest d.

    .venv/bin/python bench/secure_noise.py [--repeats 5] [--steps 200]
"""

from __future__ import annotations

import argparse
import time

import torch

from privdiff.privacy.mechanism import noisy_sum
from privdiff.privacy.randomness import SecureRandom


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    sigma, clip = 1.1, 1.0
    rng, generator = SecureRandom(), torch.Generator().manual_seed(0)
    secure_total = 0.0
    for d in (768, 2048, 16 * 2048):
        total = torch.randn(d, dtype=torch.float64) * 0.1
        secure = _best(lambda t=total: noisy_sum(t, clip, sigma, rng), args.repeats)
        plain = _best(lambda t=total: t + sigma * clip * torch.randn(t.shape, generator=generator,
                                                                     dtype=torch.float64), args.repeats)
        secure_total = secure
        print(f"d={d:6d}: secure noisy_sum {secure * 1e3:8.2f} ms, float randn {plain * 1e3:6.3f} ms, "
              f"ratio secure/float {secure / plain:7.1f}x")
    print(f"DP-SGD at d={16 * 2048}: secure noise adds {secure_total * args.steps:.1f} s over {args.steps} steps")


if __name__ == "__main__":
    main()
