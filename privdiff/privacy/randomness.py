"""The one source of randomness for privacy: a ChaCha20 keystream, and exact samplers built on it.

``SecureRandom()`` keys ChaCha20 (``cryptography``) with 256 bits from ``os.urandom``; ``SecureRandom(seed)``
keys it with SHA-256 of the seed, a reproducible stream for tests and demos whose releases the callers mark
NOT private. One encryptor runs over the whole stream, so no keystream byte is ever used twice.

Everything the guarantee relies on (Poisson sampling, the noise) is drawn from the stream exactly: ``bernoulli``
compares uniform 64-bit integers with the exact binary expansion of p, and ``discrete_gaussian`` is Algorithms 2-3
of Canonne, Kamath & Steinke 2020 ("The Discrete Gaussian for Differential Privacy"), vectorised in numpy. Each of
its Bernoulli(exp(-gamma)) draws compares a uniform U with exp(-gamma): floats decide only when U clears a float64
exp(-gamma) by 2**-36, a thousand times its proven error, and the remaining cases (about 2**-35 of them) are
decided from U's exact bits against rigorous Decimal brackets. So the samples are exactly discrete Gaussian, and
neither floating point nor a weak seed leaks the noise.
"""

from __future__ import annotations

import functools
import hashlib
import math
import numbers
import os
from collections.abc import Callable, Iterator
from decimal import MIN_EMIN, ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal, localcontext
from fractions import Fraction

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from privdiff.errors import PrivdiffError
from privdiff.privacy import checks

_SEED_DOMAIN = b"privdiff/SecureRandom/seed/v1\x00"
_WORDS_PER_REFILL = 8192
_MAX_STREAM_BYTES = 2**38  # ChaCha20's 32-bit block counter covers 2**38 bytes for one nonce
_MAX_SIGMA = 2.0**55  # samples must fit int64 with a wide margin
_TWO64 = 1 << 64
_FLOAT_MARGIN = 2.0**-36  # how far a uniform must clear a float exp(-gamma) to be decided without exact bits


class SecureRandom:
    """A ChaCha20 keystream: 256-bit key from ``os.urandom``, or derived from a 64-bit ``seed``.

    A seeded stream is reproducible by anyone who knows the seed, so releases drawn from it are not private.
    """

    def __init__(self, seed: int | None = None) -> None:
        if seed is None:
            key = os.urandom(32)
        else:
            if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
                raise PrivdiffError(f"seed must be an integer in [0, 2**64), got {seed!r}")
            key = hashlib.sha256(_SEED_DOMAIN + int(seed).to_bytes(8, "little")).digest()
        self._reproducible = seed is not None
        self._encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
        self._used = 0
        self._next_word = self._words().__next__

    @property
    def reproducible(self) -> bool:
        """True for a seeded (recomputable, hence not private) stream."""
        return self._reproducible

    def random_bytes(self, n: int) -> bytes:
        """The next ``n`` bytes of the keystream."""
        n = checks.count("n", n, minimum=0)
        self._used += n
        if self._used > _MAX_STREAM_BYTES:
            raise PrivdiffError("this SecureRandom stream is exhausted (2**38 bytes); create a new one")
        return self._encryptor.update(bytes(n))

    def uint64(self, n: int) -> np.ndarray:
        """``n`` independent uniform 64-bit integers (dtype uint64)."""
        n = checks.count("n", n, minimum=0)
        return np.frombuffer(self.random_bytes(8 * n), dtype="<u8").astype(np.uint64, copy=False)

    def _words(self) -> Iterator[int]:
        """Uniform 64-bit Python ints, read from the stream in prefetched blocks (each word used once)."""
        while True:
            yield from np.frombuffer(self.random_bytes(8 * _WORDS_PER_REFILL), dtype="<u8").tolist()

    def randbelow(self, k: int) -> int:
        """A uniform integer in [0, k), unbiased (rejection sampling), for any positive Python int ``k``."""
        k = checks.count("k", k, minimum=1)
        if k <= _TWO64:
            limit = _TWO64 - _TWO64 % k
            while True:
                w = self._next_word()
                if w < limit:
                    return w % k
        nbits = (k - 1).bit_length()
        nwords = -(-nbits // 64)
        while True:
            x = 0
            for _ in range(nwords):
                x = (x << 64) | self._next_word()
            x >>= 64 * nwords - nbits
            if x < k:
                return x

    def _bern(self, num: int, den: int) -> bool:
        """Exact Bernoulli(num/den), 0 <= num <= den: compare a lazily drawn uniform with num/den, 64 bits a time."""
        word = self._next_word
        while True:
            digit, num = divmod(num << 64, den)
            w = word()
            if w != digit:
                return w < digit
            if num == 0:
                return False

    def bernoulli(self, n: int, p: float) -> np.ndarray:
        """``n`` independent exact Bernoulli(p) draws (bool array): uniform 64-bit integers compared with p.

        ``p`` (a float in [0, 1]) is a dyadic rational; a 64-bit draw equal to the first 64 bits of p (probability
        2**-64) is settled exactly with further bits. ``p == 1`` keeps everything.
        """
        n = checks.count("n", n, minimum=0)
        p = checks.real("p", p)
        if not 0 <= p <= 1:
            raise PrivdiffError(f"p must be in [0, 1], got {p!r}")
        if p == 1:
            return np.ones(n, dtype=bool)
        scaled = Fraction(p) * _TWO64
        digit = math.floor(scaled)
        words = self.uint64(n)
        keep = words < np.uint64(digit)
        rest = scaled - digit
        if rest:
            for i in np.flatnonzero(words == np.uint64(digit)):
                keep[i] = self._bern(rest.numerator, rest.denominator)
        return keep

    def _below_exp_neg(self, prefix: int, num: int, den: int) -> bool:
        """Exactly whether U < exp(-num/den), for a uniform U in [0, 1) whose first 64 bits are ``prefix``.

        Further bits of U are drawn 64 at a time until a bracket of exp(-num/den) settles the comparison
        (exp of a rational is irrational, so this ends with probability 1).
        """
        bits = 64
        while True:
            low, high = _exp_neg_bracket(num, den, bits)
            if prefix + 1 <= low:  # U < (prefix + 1) / 2**bits <= exp(-num/den)
                return True
            if prefix >= high:  # U >= prefix / 2**bits >= exp(-num/den)
                return False
            prefix, bits = (prefix << 64) | self._next_word(), bits + 64

    def _bernoulli_exp_neg(self, gamma: np.ndarray, exact: Callable[[int], tuple[int, int]]) -> np.ndarray:
        """Independent exact Bernoulli(exp(-gamma_i)) draws (bool array), vectorised.

        ``gamma`` is a float64 approximation of gamma_i = num_i/den_i, close enough that
        |exp(-gamma) - exp(-gamma_i)| <= 2**-44 with numpy's exp; ``exact(i)`` gives (num_i, den_i). A uniform U_i
        is drawn per element; its first 53 bits decide U_i < exp(-gamma_i) whenever they clear exp(-gamma) by the margin
        2**-36 (far above the float error: see ``_check_float_exp``), and ``_below_exp_neg`` settles the rest
        (probability about 2**-35 each) from U_i's exact bits.
        """
        words = self.uint64(len(gamma))
        top = (words >> np.uint64(11)).astype(np.float64)  # exact: < 2**53
        p = np.exp(-gamma)
        below = top + 2 <= (p - _FLOAT_MARGIN) * 2.0**53
        above = top >= (p + _FLOAT_MARGIN) * 2.0**53
        for i in np.flatnonzero(~(below | above)):
            below[i] = self._below_exp_neg(int(words[i]), *exact(int(i)))
        return below

    def _laplace_proposals(self, m: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        """``m`` attempts of CKS Algorithm 2 (discrete Laplace, scale t): magnitudes x (int64) and signs, and which
        attempts succeeded; a failed attempt is dropped, which is the algorithm's own retry."""
        words = self.uint64(m)
        ok = words <= np.uint64(_TWO64 - _TWO64 % t - 1)  # rejection sampling: u uniform on [0, t)
        u = (words % np.uint64(t)).astype(np.int64)
        ok &= self._bernoulli_exp_neg(u.astype(np.float64) / t, lambda i: (int(u[i]), t))
        v = np.zeros(m, dtype=np.int64)  # V ~ Geometric(1 - e^-1): Bernoulli(exp(-1)) successes before a failure
        going = np.arange(m)
        while len(going):
            going = going[self._bernoulli_exp_neg(np.ones(len(going)), lambda i: (1, 1))]
            v[going] += 1
        if int(v.max(initial=0)) > (2**63 - 1 - t) // t:  # probability < exp(-2**7): never in practice
            raise PrivdiffError("a discrete Laplace proposal overflowed int64")
        x = u + t * v
        negative = (self.uint64(m) & np.uint64(1)).astype(bool)
        ok &= ~(negative & (x == 0))
        return np.where(negative, -x, x), ok

    def discrete_gaussian(self, size: int, sigma: float) -> np.ndarray:
        """``size`` i.i.d. samples (int64) of the discrete Gaussian N_Z(0, sigma^2), P(x) ~ exp(-x^2 / (2 sigma^2)).

        Exact (CKS 2020, Algorithm 3), vectorised: discrete Laplace proposals y with t = floor(sigma) + 1, each
        accepted with probability exp(-(|y| - sigma^2/t)^2 / (2 sigma^2)); sigma^2 is taken exactly from the float
        as a fraction num/den, and every Bernoulli is decided exactly (``_bernoulli_exp_neg``). Proposals are
        drawn in rounds; the accepted ones, in draw order, are i.i.d., and the first ``size`` are returned.

        Float error of the fast paths (absolute, on exp(-gamma) <= 1): u/t with u < t <= 2**56 errs by 3 * 2**-53
        relative; z = |y|/sigma - sigma/t by (|z| + 2) 2**-51, so gamma = z^2/2 by |z|(|z| + 2) 2**-51 and
        exp(-gamma) by at most max_z exp(-z^2/2) |z|(|z| + 2) 2**-51 < 2**-49; numpy's exp adds <= 2**-45
        (``_check_float_exp``). Both are far inside ``_bernoulli_exp_neg``'s margin of 2**-36.
        """
        size = checks.count("size", size, minimum=0)
        s = checks.positive("sigma", sigma)
        if s > _MAX_SIGMA:
            raise PrivdiffError(f"sigma must be <= 2**55, got {sigma!r}")
        _check_float_exp()
        var = Fraction(s) ** 2
        num, den = var.numerator, var.denominator
        t = math.isqrt(num // den) + 1  # floor(sigma) + 1
        # Acceptance exponent (|y| - sigma^2/t)^2 / (2 sigma^2) = (|y| den t - num)^2 / (2 num den t^2)
        #                                                      = ((|y|/sigma - sigma/t)^2) / 2 in floats.
        scale, gamma_den = den * t, 2 * num * den * t * t
        out: list[np.ndarray] = []
        have = 0
        while have < size:
            y, ok = self._laplace_proposals(int(2.2 * (size - have)) + 64, t)  # about 48% are accepted
            magnitude = np.abs(y)
            gamma = 0.5 * (magnitude.astype(np.float64) / s - s / t) ** 2
            ok &= self._bernoulli_exp_neg(gamma,
                                          lambda i, x=magnitude: ((int(x[i]) * scale - num) ** 2, gamma_den))
            out.append(y[ok])
            have += len(out[-1])
        return np.concatenate(out)[:size] if out else np.zeros(0, dtype=np.int64)


def _exp_neg_bracket(num: int, den: int, bits: int) -> tuple[int, int]:
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
def _check_float_exp() -> None:
    """Verify once that numpy's exp is as accurate as ``_bernoulli_exp_neg`` assumes (2**-45 absolute; IEEE
    libraries are within a few units in the last place, about 2**-52), against rigorous Decimal brackets."""
    gamma = np.concatenate([np.linspace(0.0, 40.0, 4001), np.geomspace(1e-12, 1.0, 400)])
    worst = 0.0
    for g, p in zip(gamma.tolist(), np.exp(-gamma).tolist(), strict=True):
        num, den = Fraction(g).as_integer_ratio()
        low, high = _exp_neg_bracket(num, den, 80)
        worst = max(worst, float(abs(Fraction(p) - Fraction(low + high, 2 * 2**80))))
    if worst > 2.0**-45:
        raise PrivdiffError(f"numpy's exp errs by {worst:.3g} here, more than the exact sampler allows (2**-45)")
