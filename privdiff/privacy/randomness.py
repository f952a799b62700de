"""The one source of randomness for privacy: a ChaCha20 keystream, and exact samplers built on it.

``SecureRandom()`` keys ChaCha20 (``cryptography``) with 256 bits from ``os.urandom``; ``SecureRandom(seed)``
keys it with SHA-256 of the seed, a reproducible stream for tests and demos whose releases the callers mark
NOT private. One encryptor runs over the whole stream, so no keystream byte is ever used twice.

Everything the guarantee relies on (Poisson sampling, the noise) is drawn from the stream with exact
integer arithmetic: ``bernoulli`` compares uniform 64-bit integers with the exact binary expansion of p, and
``discrete_gaussian`` is Algorithms 1-3 of Canonne, Kamath & Steinke 2020 ("The Discrete Gaussian for
Differential Privacy") on Python integers, so neither floating point nor a weak seed leaks the noise.
"""

from __future__ import annotations

import functools
import hashlib
import math
import numbers
import os
from collections.abc import Iterator
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
        return np.frombuffer(self.random_bytes(8 * n), dtype="<u8").astype(np.uint64)

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

    def _bern_exp(self, num: int, den: int) -> bool:
        """Exact Bernoulli(exp(-num/den)) for num/den >= 0 (CKS 2020, Algorithm 1)."""
        whole, num = divmod(num, den)
        for _ in range(whole):  # exp(-g) = exp(-1)^floor(g) * exp(-(g - floor(g)))
            if not self._bern_exp1(self._next_word()):
                return False
        return self._bern_exp_unit(num, den)

    def _bern_exp_unit(self, num: int, den: int) -> bool:
        """Algorithm 1 for gamma = num/den in [0, 1]: count K while Bernoulli(gamma/K) succeeds; K odd w.p. e^-gamma."""
        next_word, k = self._next_word, 1
        shifted = num << 64
        while True:
            d = den * k
            digit = shifted // d
            w = next_word()
            if w < digit or (w == digit and self._bern(shifted - digit * d, d)):
                k += 1
            else:
                return k % 2 == 1

    def _bern_exp1(self, prefix: int) -> bool:
        """Exact Bernoulli(exp(-1)): a uniform (first 64 bits ``prefix``) against exp(-1)'s exact binary digits.

        Equivalent to Algorithm 1 with gamma = 1, in one 64-bit draw except with probability 2**-64.
        """
        bits = 64
        while True:
            digits = _exp_neg1_digits(bits)
            if prefix != digits:
                return prefix < digits
            prefix, bits = (prefix << 64) | self._next_word(), bits + 64

    def _discrete_gaussian(self, size: int, num: int, den: int) -> list[int]:
        """Algorithm 3 for sigma^2 = num/den with Algorithm 2 (discrete Laplace, t = floor(sigma) + 1) inlined."""
        next_word, bern_exp, bern_exp_unit = self._next_word, self._bern_exp, self._bern_exp_unit
        e1 = _exp_neg1_digits(64)
        t = math.isqrt(num // den) + 1  # floor(sigma) + 1
        limit = _TWO64 - _TWO64 % t
        # Acceptance exponent (|y| - sigma^2/t)^2 / (2 sigma^2) = (|y| den t - num)^2 / (2 num den t^2).
        scale, gamma_den = den * t, 2 * num * den * t * t
        out: list[int] = []
        while len(out) < size:
            while True:  # discrete Laplace proposal: x = |y|, sign
                u = next_word()
                if u >= limit:
                    continue
                u %= t
                if not bern_exp_unit(u, t):
                    continue
                v = 0
                while True:  # V ~ Geometric(1 - e^-1): count Bernoulli(exp(-1)) successes
                    w = next_word()
                    if w < e1 or (w == e1 and self._bern_exp1(w)):
                        v += 1
                    else:
                        break
                x = u + t * v
                negative = next_word() & 1
                if not (negative and x == 0):
                    break
            if bern_exp((x * scale - num) ** 2, gamma_den):
                out.append(-x if negative else x)
        return out

    def discrete_gaussian(self, size: int, sigma: float) -> np.ndarray:
        """``size`` i.i.d. samples (int64) of the discrete Gaussian N_Z(0, sigma^2), P(x) ~ exp(-x^2 / (2 sigma^2)).

        Exact (CKS 2020, Algorithm 3): discrete Laplace proposals with t = floor(sigma) + 1, accepted with
        probability exp(-(|y| - sigma^2/t)^2 / (2 sigma^2)); sigma^2 is taken exactly from the float as a
        fraction num/den, and every test is on Python integers against 64-bit words of the stream.
        """
        size = checks.count("size", size, minimum=0)
        s = checks.positive("sigma", sigma)
        if s > _MAX_SIGMA:
            raise PrivdiffError(f"sigma must be <= 2**55, got {sigma!r}")
        var = Fraction(s) ** 2
        return np.array(self._discrete_gaussian(size, var.numerator, var.denominator), dtype=np.int64)


@functools.lru_cache(maxsize=64)
def _exp_neg1_digits(bits: int) -> int:
    """floor(exp(-1) * 2**bits), exactly: partial sums of sum (-1)^k / k! bracket exp(-1) (alternating series)."""
    total, term, k = Fraction(0), Fraction(1), 0
    while True:
        total += term
        k += 1
        term = -term / k
        low, high = sorted((total, total + term))
        if math.floor(low * 2**bits) == math.floor(high * 2**bits):
            return math.floor(low * 2**bits)
