"""Exact arithmetic shared by the discrete Gaussian samplers (CPU: ``randomness``; device: ``device_noise``).

Rigorous brackets of exp(-num/den), the exact floors of e^-k 2**bits that the geometric draw compares words
with, the measured error of a float exp against those brackets, and the constants of the proposals for one
sigma (CKS 2020, Algorithms 2 and 3, as the samplers' docstrings describe).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from decimal import MIN_EMIN, ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal, localcontext
from fractions import Fraction

import numpy as np

MAX_SIGMA = 2.0**55  # samples must fit int64 with a wide margin
TWO64 = 1 << 64
EXP_BUDGET = 2.0**-45  # the absolute error of exp the float fast path allows for (measured: exp_error)
FLOAT_MARGIN = 2.0**-36  # how far a uniform must clear a float exp(-gamma) to be decided without exact bits


@dataclasses.dataclass(frozen=True)
class Proposals:
    """Constants of ``discrete_gaussian``'s proposals for one sigma: sigma^2 = num/den exactly, t = floor(sigma)
    + 1, the rejection limit of u's 64-bit words, and the fast path's rounded coefficients a, b, c."""

    num: int
    den: int
    t: int
    limit: np.uint64
    a: float
    b: float
    c: float

    @staticmethod
    @functools.lru_cache(maxsize=16)
    def for_sigma(sigma: float) -> Proposals:
        num, den = (Fraction(sigma) ** 2).as_integer_ratio()
        t = math.isqrt(num // den) + 1
        root2 = math.sqrt(2.0)
        return Proposals(num, den, t, np.uint64(TWO64 - TWO64 % t - 1), 1.0 / (sigma * root2),
                          sigma / (t * root2), 1.0 / t)

    def exponent(self, u: int, x: int) -> tuple[int, int]:
        """u/t + (x - sigma^2/t)^2 / (2 sigma^2) = u/t + (x den t - num)^2 / (2 num den t^2), as (numerator,
        denominator)."""
        t, num, den = self.t, self.num, self.den
        gamma_den = 2 * num * den * t * t
        return u * gamma_den + t * (x * den * t - num) ** 2, t * gamma_den


def exp_neg_bracket(num: int, den: int, bits: int) -> tuple[int, int]:
    """Integers low <= exp(-num/den) * 2**bits <= high, high - low <= 3, for integers num >= 0, den > 0.

    Decimal's ``exp`` is correctly rounded; num/den is rounded down and up, and each exp is widened by one
    unit in the last place, so the bracket is rigorous.
    """
    with localcontext() as ctx:
        ctx.prec = bits * 31 // 100 + len(str(num // den)) + 12
        ctx.Emin = MIN_EMIN
        ctx.rounding = ROUND_FLOOR
        gamma_low = Decimal(num) / den
        ctx.rounding = ROUND_CEILING
        gamma_high = Decimal(num) / den
        ctx.rounding = ROUND_HALF_EVEN
        high = (-gamma_low).exp().next_plus()
        low = (-gamma_high).exp().next_minus()
    return math.floor(Fraction(low) * 2**bits), math.ceil(Fraction(high) * 2**bits)


@functools.cache
def geometric_floors(bits: int) -> tuple[np.ndarray, np.ndarray]:
    """c_k = floor(e^-k 2**bits) exactly, for k = 1 up to the first k where it is 0 (uint64, descending), and the
    same ascending. Brackets are narrowed until both ends have the same floor."""
    floors = [1]
    while floors[-1]:
        k, extra = len(floors), 64
        while (bracket := exp_neg_bracket(k, 1, bits + extra))[0] >> extra != bracket[1] >> extra:
            extra += 64
        floors.append(bracket[0] >> extra)
    descending = np.array(floors[1:], dtype=np.uint64)
    return descending, descending[::-1].copy()


def exp_error(exp: Callable[[np.ndarray], np.ndarray]) -> float:
    """The largest absolute error of ``exp`` (float64 in, float64 out) on exp(-gamma) at 4,401 points gamma of
    [0, 40], against rigorous Decimal brackets: what the exact samplers' float fast path is checked with."""
    gamma = np.concatenate([np.linspace(0.0, 40.0, 4001), np.geomspace(1e-12, 1.0, 400)])
    worst = 0.0
    for g, p in zip(gamma.tolist(), np.asarray(exp(-gamma), dtype=np.float64).tolist(), strict=True):
        num, den = Fraction(g).as_integer_ratio()
        low, high = exp_neg_bracket(num, den, 80)
        worst = max(worst, float(abs(Fraction(p) - Fraction(low + high, 2 * 2**80))))
    return worst
