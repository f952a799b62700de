"""The one source of randomness for privacy: a ChaCha20 keystream, and exact samplers built on it.

``SecureRandom()`` keys ChaCha20 (``cryptography``) with 256 bits from ``os.urandom``; ``SecureRandom(seed)``
keys it with SHA-256 of the seed, a reproducible stream for tests and demos whose releases the callers mark
NOT private. One encryptor runs over the whole stream, so no keystream byte is ever used twice.

Everything the guarantee relies on (Poisson sampling, the noise) is drawn from the stream exactly: ``bernoulli``
compares uniform 64-bit integers with the exact binary expansion of p, and ``discrete_gaussian`` is Algorithms 2-3
of Canonne, Kamath & Steinke 2020 ("The Discrete Gaussian for Differential Privacy"), vectorised in numpy. Each of
its Bernoulli(exp(-gamma)) draws compares a uniform U with exp(-gamma): floats decide only when U clears a float64
exp(-gamma) by 2**-36, 2**9 times the 2**-45 error budget for numpy's exp, and the remaining cases (about 2**-35
of them) are decided from U's exact bits against rigorous Decimal brackets. That budget is not proven for every
input: ``_check_float_exp`` measures numpy's exp once per process at 4,401 points of [0, 40] against exact
brackets (IEEE libmath's exp is documented within a few ulps, ~2**-52); an exp that errs by more there stops the
sampler. So the samples are exactly discrete Gaussian, and
neither floating point nor a weak seed leaks the noise.
"""

from __future__ import annotations

import functools
import hashlib
import math
import numbers
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from privdiff.errors import PrivdiffError
from privdiff.privacy import checks
from privdiff.privacy.exact import (
    EXP_BUDGET,
    FLOAT_MARGIN,
    MAX_SIGMA,
    TWO64,
    Proposals,
    exp_error,
    exp_neg_bracket,
    geometric_floors,
)

_SEED_DOMAIN = b"privdiff/SecureRandom/seed/v1\x00"
_WORDS_PER_REFILL = 8192
_MAX_STREAM_BYTES = 2**38  # ChaCha20's 32-bit block counter covers 2**38 bytes for one nonce
_ROUND = 1 << 14  # proposals per round of the discrete Gaussian: its ~20 working arrays stay in the cache


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
        self._start(key, seed is not None)

    def _start(self, key: bytes, reproducible: bool) -> None:
        self._reproducible = reproducible
        self._encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
        self._used = 0
        self._zeros, self._buffer = b"", bytearray()
        self._next_word = self._words().__next__

    def spawn(self) -> SecureRandom:
        """A new, independent stream keyed with the next 256 bits of this one (reproducible if this one is)."""
        child = SecureRandom.__new__(SecureRandom)
        child._start(self.random_bytes(32), self._reproducible)
        return child

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

    def standard_normal(self, n: int) -> np.ndarray:
        """``n`` independent standard normal floats (float64; Box-Muller on 53-bit uniforms from the stream).

        For noise that must stay secret but carries no DP guarantee (a sampler's initial and ancestral noise);
        DP noise is ``discrete_gaussian``.
        """
        n = checks.count("n", n, minimum=0)
        half = (n + 1) // 2
        words = self.uint64(2 * half) >> np.uint64(11)
        radius = np.sqrt(-2.0 * np.log((words[:half].astype(np.float64) + 1.0) * 2.0**-53))  # uniform in (0, 1]
        angle = (2.0 * np.pi * 2.0**-53) * words[half:].astype(np.float64)
        return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]

    def _words(self) -> Iterator[int]:
        """Uniform 64-bit Python ints, read from the stream in prefetched blocks (each word used once)."""
        while True:
            yield from np.frombuffer(self.random_bytes(8 * _WORDS_PER_REFILL), dtype="<u8").tolist()

    def randbelow(self, k: int) -> int:
        """A uniform integer in [0, k), unbiased (rejection sampling), for any positive Python int ``k``."""
        k = checks.count("k", k, minimum=1)
        if k <= TWO64:
            limit = TWO64 - TWO64 % k
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
        scaled = Fraction(p) * TWO64
        digit = math.floor(scaled)
        words = self.uint64(n)
        keep = words < np.uint64(digit)
        rest = scaled - digit
        if rest:
            for i in np.flatnonzero(words == np.uint64(digit)):
                keep[i] = self._bern(rest.numerator, rest.denominator)
        return keep

    def _below_exp_neg(self, prefix: int, num: int, den: int, bits: int = 64) -> bool:
        """Exactly whether U < exp(-num/den), for a uniform U in [0, 1) whose first ``bits`` bits are ``prefix``.

        Further bits of U are drawn 64 at a time until a bracket of exp(-num/den) settles the comparison
        (exp of a rational is irrational, so this ends with probability 1).
        """
        while True:
            low, high = exp_neg_bracket(num, den, bits)
            if prefix + 1 <= low:  # U < (prefix + 1) / 2**bits <= exp(-num/den)
                return True
            if prefix >= high:  # U >= prefix / 2**bits >= exp(-num/den)
                return False
            prefix, bits = (prefix << 64) | self._next_word(), bits + 64

    def _round_bytes(self, n: int) -> memoryview:
        """The next ``n`` keystream bytes in a buffer that the next call overwrites (a sampler round's draws)."""
        self._used += n
        if self._used > _MAX_STREAM_BYTES:
            raise PrivdiffError("this SecureRandom stream is exhausted (2**38 bytes); create a new one")
        if len(self._zeros) < n:
            self._zeros, self._buffer = bytes(n), bytearray(n)
        view = memoryview(self._buffer)[:n]
        self._encryptor.update_into(memoryview(self._zeros)[:n], view)
        return view

    def _geometric(self, words: np.ndarray) -> np.ndarray:
        """V = #{k >= 1 : U < e^-k} (int64) for uniforms U whose first 64 bits are ``words``: P(V >= k) = e^-k,
        Algorithm 2's count of Bernoulli(exp(-1)) successes before a failure (the events are nested).

        With c_k = floor(e^-k 2**64), exact (e^-k 2**64 is irrational): w < c_k makes U < e^-k sure and w > c_k
        makes U > e^-k sure, so V = #{k : w < c_k} unless w equals c_(V+1), the one floor it can equal
        (probability 2**-64); ``_exact_geometric`` settles those from U's further bits. Three comparisons
        count the 95% of words above c_3; the rest are looked up among all floors.
        """
        floors, ascending = geometric_floors(64)
        v = (words < floors[0]).astype(np.int64)
        v += words < floors[1]
        v += words < floors[2]
        deep = np.flatnonzero(words <= floors[2])
        v[deep] = len(floors) - np.searchsorted(ascending, words[deep], side="right")
        for i in np.flatnonzero(words == floors.take(v)):
            v[i] = self._exact_geometric(int(words[i]))
        return v

    def _exact_geometric(self, prefix: int, bits: int = 64) -> int:
        """#{k >= 1 : U < e^-k} for a uniform U whose first ``bits`` bits are ``prefix``, drawing further bits as
        needed."""
        v = 0
        while True:
            low, high = exp_neg_bracket(v + 1, 1, bits)
            if prefix + 1 <= low:
                v += 1
            elif prefix >= high:
                return v
            else:
                prefix, bits = (prefix << 64) | self._next_word(), bits + 64

    def _bernoulli_exp_neg(self, words: np.ndarray, gamma: np.ndarray, exact: Callable[[int], tuple[int, int]],
                           wanted: np.ndarray | None = None) -> np.ndarray:
        """Independent exact Bernoulli(exp(-gamma_i)) draws (bool array) from uniforms U_i whose first 64 bits are
        ``words``, vectorised; where ``wanted`` is given, only its True entries are settled (others: False).

        ``gamma`` is a float64 approximation of gamma_i = num_i/den_i, close enough that
        |exp(-gamma) - exp(-gamma_i)| <= 2**-44 with numpy's exp; ``exact(i)`` gives (num_i, den_i). U_i's first
        53 bits decide U_i < exp(-gamma_i) whenever they clear exp(-gamma) by the margin 2**-36 (far above the
        float error budget that ``_check_float_exp`` measures), and ``_below_exp_neg`` settles the rest
        (probability about 2**-35 each) from U_i's exact bits.
        """
        top = (words >> np.uint64(11)).astype(np.float64)  # U's first 53 bits, exact
        room = np.exp(np.negative(gamma), out=np.empty_like(gamma))
        room *= 2.0**53  # exact
        room -= top  # exp(-gamma) 2**53 - top, rounded by <= 1/2: far inside the margin
        below = room >= FLOAT_MARGIN * 2.0**53 + 2  # U < (top + 1) 2**-53 <= exp(-gamma) - margin
        unsure = ~below
        unsure &= room > -FLOAT_MARGIN * 2.0**53  # not sure either that U >= top 2**-53 >= exp(-gamma) + margin
        if wanted is not None:
            below &= wanted
            unsure &= wanted
        for i in np.flatnonzero(unsure):
            below[i] = self._below_exp_neg(int(words[i]), *exact(int(i)))
        return below

    def discrete_gaussian(self, size: int, sigma: float) -> np.ndarray:
        """``size`` i.i.d. samples (int64) of the discrete Gaussian N_Z(0, sigma^2), P(x) ~ exp(-x^2 / (2 sigma^2)).

        Exact (CKS 2020, Algorithms 2 and 3), vectorised: discrete Laplace proposals y = ±(u + t v) with
        t = floor(sigma) + 1, u uniform on [0, t) kept with probability exp(-u/t), V geometric
        (``_geometric``), -0 refused, each accepted with probability exp(-(|y| - sigma^2/t)^2 / (2 sigma^2));
        sigma^2 is taken exactly from the float as a fraction num/den, and every Bernoulli is decided exactly
        (``_bernoulli_exp_neg``). Proposals are drawn in rounds of at most _ROUND, whose working arrays stay in
        the CPU cache; the accepted ones, in draw order, are i.i.d., and the first ``size`` are returned.

        Float error of the fast path's exponent z^2 + u c, z = x a - b, with a, b, c the rounded
        1/(sigma sqrt 2), sigma/(t sqrt 2), 1/t (each within 4 units of 2**-53 relative) and Z the exact z
        (|x a| <= |Z| + 1): z errs by (7|Z| + 12) 2**-53, z^2 by (15 Z^2 + 24|Z|) 2**-53, u c by 3 * 2**-53, the
        sum adds (Z^2 + 1) 2**-53; exp(-gamma) (<= exp(-Z^2)) then errs by at most
        max_Z exp(-Z^2) (16 Z^2 + 24|Z| + 4) 2**-53 < 18 * 2**-53 < 2**-48, and numpy's exp adds its error,
        budgeted at 2**-45 (measured, not proven: ``_check_float_exp``). Both are far inside
        ``_bernoulli_exp_neg``'s margin of 2**-36.
        """
        size = checks.count("size", size, minimum=0)
        s = checks.positive("sigma", sigma)
        if s > MAX_SIGMA:
            raise PrivdiffError(f"sigma must be <= 2**55, got {sigma!r}")
        _check_float_exp()
        plan = Proposals.for_sigma(s)
        out = np.empty(size, dtype=np.int64)
        have = 0
        while have < size:
            kept = self._proposal_round(plan, min(_ROUND, int(2.2 * (size - have)) + 64))  # ~48% accepted
            take = min(len(kept), size - have)
            out[have:have + take] = kept[:take]
            have += take
        return out

    def _proposal_round(self, plan: Proposals, m: int) -> np.ndarray:
        """The accepted samples, in draw order, of ``m`` proposals (see ``discrete_gaussian``)."""
        t = plan.t
        raw = self._round_bytes(24 * m + -(-m // 8))
        words = np.frombuffer(raw, dtype="<u8", count=3 * m)
        negative = np.unpackbits(np.frombuffer(raw, dtype=np.uint8, offset=24 * m))[:m].view(bool)
        ok = words[:m] <= plan.limit  # rejection sampling: u uniform on [0, t)
        u = (words[:m] % np.uint64(t)).view(np.int64)
        v = self._geometric(words[m:2 * m])
        if int(v.max(initial=0)) > (2**63 - 1 - t) // t:  # probability < exp(-2**7): never in practice
            raise PrivdiffError("a discrete Laplace proposal overflowed int64")
        x = v * t
        x += u
        zeros = np.flatnonzero(x == 0)
        ok[zeros[negative[zeros]]] = False  # -0 refused
        # Algorithm 2's Bernoulli(exp(-u/t)) and Algorithm 3's acceptance are independent given (u, v, sign):
        # one Bernoulli(exp(-(u/t + gamma))) decides both.
        gamma = x.astype(np.float64)
        gamma *= plan.a
        gamma -= plan.b
        np.square(gamma, out=gamma)
        gamma += u * plan.c
        ok = self._bernoulli_exp_neg(words[2 * m:], gamma, lambda i: plan.exponent(int(u[i]), int(x[i])), ok)
        kept = np.flatnonzero(ok)
        samples = x.take(kept)
        np.negative(samples, out=samples, where=negative.take(kept))
        return samples


class NoiseAhead:
    """Discrete Gaussian draws from a stream of their own, each next draw prepared in a background thread.

    DP-SGD's noise does not depend on the data (its size and sigma are public), so the next step's noise can
    be drawn while the current step computes. Asking again for the same (size, sigma) returns the prepared
    draw; other arguments wait for it, discard it and draw afresh, so no keystream byte is used twice, and
    the stream is only ever read by one thread at a time. The draws are those of ``rng.spawn()``, in order.
    """

    def __init__(self, rng: SecureRandom) -> None:
        self.rng = rng.spawn()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="privdiff-noise")
        self._next: tuple[tuple[int, float], Future] | None = None

    def discrete_gaussian(self, size: int, sigma: float) -> np.ndarray:
        """As :meth:`SecureRandom.discrete_gaussian`; the following draw starts in the background."""
        drawn = None
        if self._next is not None:
            args, future = self._next
            self._next = None
            ready = future.result()
            drawn = ready if args == (size, sigma) else None
        if drawn is None:
            drawn = self.rng.discrete_gaussian(size, sigma)
        self._next = ((size, sigma), self._pool.submit(self.rng.discrete_gaussian, size, sigma))
        return drawn

    def wait(self) -> None:
        """Block until the draw being prepared is ready (to time what runs next without it)."""
        if self._next is not None:
            self._next[1].result()

    def close(self) -> None:
        """Stop the background thread (a prepared draw is discarded)."""
        if self._next is not None:
            self._next[1].cancel()
            self._next = None
        self._pool.shutdown(wait=True)


@functools.cache
def _check_float_exp() -> None:
    """Measure once that numpy's exp is as accurate as ``_bernoulli_exp_neg`` assumes (2**-45 absolute; IEEE
    libraries are within a few units in the last place, about 2**-52), at 4,401 points (``exp_error``): a check
    of this process's exp at those points, not a proof for every input."""
    worst = exp_error(np.exp)
    if worst > EXP_BUDGET:
        raise PrivdiffError(f"numpy's exp errs by {worst:.3g} here, more than the exact sampler allows (2**-45)")
