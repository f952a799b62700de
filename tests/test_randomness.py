"""SecureRandom: ChaCha20 keying and seeding, exact integer/Bernoulli draws, the exact discrete Gaussian."""

import math
from decimal import Decimal, localcontext
from fractions import Fraction

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from scipy import stats

from privdiff.errors import PrivdiffError
from privdiff.privacy import exact, randomness
from privdiff.privacy.randomness import NoiseAhead, SecureRandom

HIGH_BIT_SEEDS = [5, 5 + 2**32, 5 + 2**40]


def test_unseeded_key_is_256_bits_from_urandom_and_the_stream_is_chacha20(monkeypatch):
    key = bytes(range(32))
    asked = []
    monkeypatch.setattr(randomness.os, "urandom", lambda n: asked.append(n) or key)
    rng = SecureRandom()
    assert asked == [32] and not rng.reproducible
    want = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(96))
    assert rng.random_bytes(40) + rng.random_bytes(56) == want  # one continuous keystream


def test_unseeded_streams_differ():
    assert SecureRandom().random_bytes(32) != SecureRandom().random_bytes(32)
    assert not np.array_equal(SecureRandom().discrete_gaussian(8, 1e6), SecureRandom().discrete_gaussian(8, 1e6))


def test_seeded_streams_reproduce():
    a, b = SecureRandom(7), SecureRandom(7)
    assert a.reproducible
    assert a.random_bytes(64) == b.random_bytes(64)
    assert np.array_equal(a.uint64(10), b.uint64(10))
    assert np.array_equal(a.discrete_gaussian(50, 3.5), b.discrete_gaussian(50, 3.5))


def test_seeds_differing_only_in_high_bits_give_different_streams():
    """torch's Mersenne Twister kept only 32 bits of a seed: these three seeds must not collide."""
    rngs = [SecureRandom(s) for s in HIGH_BIT_SEEDS]
    assert len({r.random_bytes(32) for r in rngs}) == 3
    rngs = [SecureRandom(s) for s in HIGH_BIT_SEEDS]
    draws = [tuple(r.discrete_gaussian(16, 2.0**30)) for r in rngs]
    assert len(set(draws)) == 3


@pytest.mark.parametrize("seed", [-1, 1.5, 2**64, True, "3", 7.0])
def test_bad_seed(seed):
    with pytest.raises(PrivdiffError, match="seed"):
        SecureRandom(seed)


def test_largest_seed_and_numpy_integers():
    assert SecureRandom(2**64 - 1).reproducible
    assert SecureRandom(np.uint64(3)).random_bytes(16) == SecureRandom(3).random_bytes(16)


def test_uint64_bits_are_balanced():
    words = SecureRandom(1).uint64(20_000)
    assert words.dtype == np.uint64 and words.shape == (20_000,)
    bits = np.unpackbits(words.view(np.uint8))
    assert abs(bits.mean() - 0.5) < 5 * 0.5 / math.sqrt(bits.size)
    assert SecureRandom(1).uint64(0).shape == (0,)


@pytest.mark.parametrize("k", [1, 6, 2**64 - 59, 3 * 2**70 + 1])
def test_randbelow_range_and_uniformity(k):
    rng = SecureRandom(2)
    draws = [rng.randbelow(k) for _ in range(6000)]
    assert all(isinstance(x, int) and 0 <= x < k for x in draws)
    if k == 1:
        return
    bins = np.minimum(np.array([x * 6 // k for x in draws]), 5)  # six equal-mass bins (up to rounding)
    assert stats.chisquare(np.bincount(bins, minlength=6)).pvalue > 1e-4


@pytest.mark.parametrize("k", [0, -3, 2.0, True])
def test_randbelow_bad_bound(k):
    with pytest.raises(PrivdiffError, match="k must be an integer >= 1"):
        SecureRandom(0).randbelow(k)


@pytest.mark.parametrize("p", [0.0, 1e-3, 0.3, 0.5, 0.999])
def test_bernoulli_rate(p):
    n = 200_000
    keep = SecureRandom(3).bernoulli(n, p)
    assert keep.dtype == bool and keep.shape == (n,)
    assert abs(keep.mean() - p) <= 5 * math.sqrt(p * (1 - p) / n)


def test_bernoulli_edges():
    assert SecureRandom().bernoulli(100, 1.0).all()
    assert SecureRandom().bernoulli(0, 0.5).shape == (0,)
    for bad in [-0.1, 1.5, float("nan"), True]:
        with pytest.raises(PrivdiffError, match="p must be"):
            SecureRandom().bernoulli(3, bad)


def test_bernoulli_settles_64_bit_ties_exactly(monkeypatch):
    """p = 3 * 2**-70 has first 64 bits 0: a zero word is a tie, settled by further bits with odds 3/64."""
    rng = SecureRandom(4)
    monkeypatch.setattr(rng, "uint64", lambda n: np.zeros(n, dtype=np.uint64))
    keep = rng.bernoulli(40_000, 3 * 2.0**-70)
    assert abs(keep.mean() - 3 / 64) < 5 * math.sqrt(3 / 64 / 40_000)


def test_exact_bernoulli_helper():
    rng, n = SecureRandom(5), 40_000
    assert abs(np.mean([rng._bern(1, 3) for _ in range(n)]) - 1 / 3) < 5 * math.sqrt(2 / 9 / n)


def _exp_neg(num: int, den: int, bits: int) -> Decimal:
    with localcontext() as ctx:
        ctx.prec = 200
        return (-Decimal(num) / den).exp() * 2**bits


@pytest.mark.parametrize(("num", "den"), [(0, 1), (1, 1), (3, 10), (17, 10), (10**30 + 7, 10**29), (2**80 + 1, 2**75)])
def test_exp_neg_bracket_is_rigorous_and_tight(num, den):
    for bits in (64, 128, 256):
        low, high = exact.exp_neg_bracket(num, den, bits)
        assert low <= _exp_neg(num, den, bits) <= high and high - low <= 3


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0, 2.5, 9.0])
def test_bernoulli_exp_neg_rate(gamma):
    n, rng = 100_000, SecureRandom(5)
    num, den = Fraction(gamma).as_integer_ratio()
    keep = rng._bernoulli_exp_neg(rng.uint64(n), np.full(n, gamma), lambda i: (num, den))
    p = math.exp(-gamma)
    assert keep.dtype == bool and abs(keep.mean() - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12


def test_bernoulli_exp_neg_settles_near_ties_from_exact_bits(monkeypatch):
    """Words within the float margin of exp(-0.3) go to the exact comparison; words beyond it are decided."""
    rng, n = SecureRandom(6), 20_000
    exact = _exp_neg(3, 10, 64)
    tie = int(exact)
    calls = []
    below = rng._below_exp_neg
    monkeypatch.setattr(rng, "_below_exp_neg", lambda *a: calls.append(a) or below(*a))
    for word, want in [(tie - 2**30, True), (tie + 2**30, False)]:
        words = np.full(8, word, dtype=np.uint64)
        assert (rng._bernoulli_exp_neg(words, np.full(8, 0.3), lambda i: (3, 10)) == want).all() and not calls
    words = np.full(n, tie, dtype=np.uint64)
    keep = rng._bernoulli_exp_neg(words, np.full(n, 0.3), lambda i: (3, 10))
    rest = float(exact - tie)  # P(U < exp(-0.3) | U's first 64 bits are exp(-0.3)'s)
    assert len(calls) == n and abs(keep.mean() - rest) < 5 * math.sqrt(rest * (1 - rest) / n)
    wanted = np.arange(n) % 2 == 0  # only the wanted draws are settled; the others are False, unread
    calls.clear()
    keep = rng._bernoulli_exp_neg(words, np.full(n, 0.3), lambda i: (3, 10), wanted)
    assert len(calls) == n // 2 and not keep[~wanted].any()


def test_geometric_matches_its_pmf():
    n, rng = 100_000, SecureRandom(7)
    v = rng._geometric(rng.uint64(n))
    assert v.dtype == np.int64 and v.min() >= 0
    top = 12
    observed = np.bincount(np.minimum(v, top), minlength=top + 1)
    pmf = (1 - math.exp(-1)) * np.exp(-np.arange(top + 1.0))
    pmf[top] = math.exp(-top)  # P(V >= top)
    assert stats.chisquare(observed, n * pmf).pvalue > 1e-4


def test_geometric_floors_are_exact():
    floors, ascending = exact.geometric_floors(64)
    assert len(floors) == 45 and floors[-1] == 0 and floors[-2] == 1 and (ascending == floors[::-1]).all()
    assert all(int(c) == int(_exp_neg(k, 1, 64)) for k, c in enumerate(floors.tolist(), start=1))


def test_geometric_sends_exactly_the_words_equal_to_a_floor_to_the_exact_path(monkeypatch):
    floors, _ = exact.geometric_floors(64)
    words = sorted({w for x in floors.tolist() for w in range(max(0, x - 3), x + 4)} | set(range(64)))
    rng, sent = SecureRandom(9), []
    monkeypatch.setattr(rng, "_exact_geometric", lambda w: sent.append(w) or 0)
    v = rng._geometric(np.array(words, dtype=np.uint64))
    assert sent == [w for w in words if w in set(floors.tolist())]
    decided = [(w, int(x)) for w, x in zip(words, v, strict=True) if w not in set(floors.tolist())]
    assert all(x == sum(w < c for c in floors.tolist()) for w, x in decided)


def test_geometric_settles_words_equal_to_a_floor_exactly():
    """w = floor(e^-1 2**64): U < e^-1 depends on U's further bits (odds: the fraction), and U < e^-2 cannot hold."""
    rng, n = SecureRandom(8), 20_000
    exact = _exp_neg(1, 1, 64)
    tie = int(exact)
    v = rng._geometric(np.full(n, tie, dtype=np.uint64))
    rest = float(exact - tie)
    assert set(np.unique(v)) <= {0, 1} and abs(v.mean() - rest) < 5 * math.sqrt(rest * (1 - rest) / n)
    assert (rng._geometric(np.zeros(20, dtype=np.uint64)) >= 44).all()  # U < 2**-64: V is 44 or more


def test_spawned_streams_are_independent_and_reproducible_when_seeded():
    parent = SecureRandom(11)
    child = parent.spawn()
    assert child.reproducible and child.random_bytes(32) != parent.random_bytes(32)
    assert SecureRandom(11).spawn().random_bytes(32) == SecureRandom(11).spawn().random_bytes(32)
    assert not SecureRandom().spawn().reproducible


def test_noise_ahead_gives_the_spawned_stream_draws_in_order(monkeypatch):
    ahead = NoiseAhead(SecureRandom(12))
    twin = SecureRandom(12).spawn()
    try:
        for _ in range(3):  # repeated arguments: each draw was prepared in the background
            assert np.array_equal(ahead.discrete_gaussian(500, 2.0**30), twin.discrete_gaussian(500, 2.0**30))
        changed = ahead.discrete_gaussian(40, 3.0)  # the prepared draw is discarded, never reused
        twin.discrete_gaussian(500, 2.0**30)
        assert np.array_equal(changed, twin.discrete_gaussian(40, 3.0))
        assert ahead._next is not None and ahead._next[0] == (40, 3.0)
        ahead.wait()
        assert ahead._next[1].done()
    finally:
        ahead.close()
    assert ahead._next is None


def test_float_exp_is_checked_against_exact_brackets(monkeypatch):
    randomness._check_float_exp.cache_clear()
    monkeypatch.setattr(randomness.np, "exp", lambda x: np.multiply(np.e ** -np.asarray(x), 1 + 2.0**-30))
    with pytest.raises(PrivdiffError, match="numpy's exp errs by"):
        randomness._check_float_exp()
    monkeypatch.undo()
    randomness._check_float_exp.cache_clear()
    randomness._check_float_exp()


def _discrete_gaussian_pmf(sigma: float, support: np.ndarray) -> np.ndarray:
    weights = np.exp(-(support.astype(np.float64) ** 2) / (2 * sigma**2))
    return weights / weights.sum()


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0, 40.0])
def test_discrete_gaussian_matches_the_exact_pmf(sigma):
    n = 40_000
    draws = SecureRandom(9).discrete_gaussian(n, sigma)
    assert draws.dtype == np.int64
    top = int(12 * sigma) + 2
    support = np.arange(-top, top + 1)
    assert np.abs(draws).max() <= top
    observed = np.bincount(draws + top, minlength=len(support))
    expected = n * _discrete_gaussian_pmf(sigma, support)
    cells = expected >= 5  # pool the far tails into one cell
    obs = np.append(observed[cells], observed[~cells].sum())
    exp = np.append(expected[cells], expected[~cells].sum())
    assert stats.chisquare(obs, exp).pvalue > 1e-4
    var = float((support**2 * _discrete_gaussian_pmf(sigma, support)).sum())
    assert abs(draws.mean()) < 5 * math.sqrt(var / n)
    assert draws.var() == pytest.approx(var, rel=0.05)


@pytest.mark.parametrize("sigma", [2.0**20, 1.37 * 2**30, 2.0**40])
def test_discrete_gaussian_large_sigma_is_normal(sigma):
    n = 20_000
    draws = SecureRandom(10).discrete_gaussian(n, sigma)
    z = draws / sigma
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert z.std() == pytest.approx(1.0, rel=0.03)
    assert stats.kstest(z, "norm").pvalue > 1e-3


def test_discrete_gaussian_bad_arguments():
    assert SecureRandom(0).discrete_gaussian(0, 1.0).shape == (0,)
    for size, sigma, fragment in [(-1, 1.0, "size"), (3, 0.0, "sigma"), (3, float("inf"), "sigma"),
                                  (3, 2.0**60, r"sigma must be <= 2\*\*55")]:
        with pytest.raises(PrivdiffError, match=fragment):
            SecureRandom(0).discrete_gaussian(size, sigma)
