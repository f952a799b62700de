"""The keystream and the exact discrete Gaussian that run on the tensors' device (tested on the CPU device)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from scipy import stats

from privdiff.errors import PrivdiffError
from privdiff.privacy import device_noise, dpsgd
from privdiff.privacy.chacha import keystream_words
from privdiff.privacy.device_noise import DeviceNoise
from privdiff.privacy.exact import geometric_floors
from privdiff.privacy.mechanism import noise_grid, noisy_sum
from privdiff.privacy.randomness import SecureRandom


@pytest.mark.parametrize(("first", "blocks"), [(0, 1), (0, 37), (5, 3), (2**32 - 3, 3)])
def test_keystream_matches_cryptography_word_for_word(first, blocks):
    key, nonce = os.urandom(32), os.urandom(12)
    cipher = Cipher(algorithms.ChaCha20(key, first.to_bytes(4, "little") + nonce), mode=None)
    want = np.frombuffer(cipher.encryptor().update(bytes(64 * blocks)), dtype="<u4")
    got = keystream_words(key, nonce, first, blocks, "cpu")
    assert got.shape == (blocks, 16) and got.dtype == torch.int64
    assert np.array_equal(got.reshape(-1).numpy(), want.astype(np.int64))


def test_keystream_refuses_bad_keys_and_counter_overflow():
    with pytest.raises(PrivdiffError, match="32-byte key and a 12-byte nonce"):
        keystream_words(bytes(31), bytes(12), 0, 1, "cpu")
    with pytest.raises(PrivdiffError, match="block counter covers 2\\*\\*32 blocks"):
        keystream_words(bytes(32), bytes(12), 2**32 - 1, 2, "cpu")


def test_words_continue_the_stream_and_never_reuse_a_block():
    a, b = DeviceNoise(SecureRandom(1), "cpu"), DeviceNoise(SecureRandom(1), "cpu")
    first, second = a.words(20), a.words(16)  # 20 words take two blocks: the next call starts on block 2
    both = b.words(64)
    assert torch.equal(first, both[:20]) and torch.equal(second, both[32:48])
    assert not torch.equal(DeviceNoise(SecureRandom(2), "cpu").words(16), both[:16])


def _pmf(sigma: float, support: np.ndarray) -> np.ndarray:
    weights = np.exp(-(support.astype(np.float64) ** 2) / (2 * sigma**2))
    return weights / weights.sum()


def _matches_pmf(draws: np.ndarray, sigma: float) -> None:
    top = int(12 * sigma) + 2
    support = np.arange(-top, top + 1)
    assert np.abs(draws).max() <= top
    observed = np.bincount(draws + top, minlength=len(support))
    expected = len(draws) * _pmf(sigma, support)
    cells = expected >= 5
    assert stats.chisquare(np.append(observed[cells], observed[~cells].sum()),
                           np.append(expected[cells], expected[~cells].sum())).pvalue > 1e-4


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0, 40.0])
def test_discrete_gaussian_matches_the_exact_pmf(sigma):
    draws = DeviceNoise(SecureRandom(9), "cpu").discrete_gaussian(40_000, sigma)
    assert draws.dtype == torch.int64 and draws.shape == (40_000,)
    _matches_pmf(draws.numpy(), sigma)


@pytest.mark.parametrize("sigma", [2.0**20, 1.37 * 2**30, 2.0**40])
def test_discrete_gaussian_large_sigma_is_normal(sigma):
    z = DeviceNoise(SecureRandom(10), "cpu").discrete_gaussian(20_000, sigma).numpy() / sigma
    assert abs(z.mean()) < 5 / math.sqrt(len(z)) and z.std() == pytest.approx(1.0, rel=0.03)
    assert stats.kstest(z, "norm").pvalue > 1e-3


def test_draws_the_fast_path_leaves_are_settled_exactly(monkeypatch):
    """With a margin of 1/8, about a quarter of the acceptances go to the exact CPU comparison: still exact."""
    calls = []
    settle = SecureRandom._below_exp_neg
    monkeypatch.setattr(device_noise, "FLOAT_MARGIN", 0.125)
    monkeypatch.setattr(SecureRandom, "_below_exp_neg", lambda self, *a, **k: calls.append(k) or settle(self, *a, **k))
    draws = DeviceNoise(SecureRandom(11), "cpu").discrete_gaussian(20_000, 2.5)
    assert len(calls) > 2_000 and all(k == {"bits": 53} for k in calls)
    _matches_pmf(draws.numpy(), 2.5)


def test_geometric_sends_exactly_the_words_equal_to_a_floor_to_the_exact_path(monkeypatch):
    floors = geometric_floors(62)[0].tolist()
    assert len(floors) == 43 and floors[-1] == 0 and floors[-2] >= 1
    words = sorted({w for x in floors for w in range(max(0, x - 2), x + 3)})
    noise, sent = DeviceNoise(SecureRandom(12), "cpu"), []
    monkeypatch.setattr(noise._exact, "_exact_geometric", lambda w, bits: sent.append((w, bits)) or 0)
    v = noise._geometric(torch.tensor(words, dtype=torch.int64))
    assert sent == [(w, 62) for w in words if w in set(floors)]
    assert all(int(x) == sum(w < c for c in floors) for w, x in zip(words, v, strict=True) if w not in set(floors))


def test_noisy_sum_takes_device_noise_on_the_grid():
    total = torch.randn(1000, dtype=torch.float64)
    noisy = noisy_sum(total, 1.0, 1.1, DeviceNoise(SecureRandom(13), "cpu"))
    gamma = noise_grid(1.0, 1.1)
    steps = noisy / gamma
    assert torch.equal(steps, steps.round()) and (noisy - total).std().item() == pytest.approx(1.1, rel=0.1)


def test_dp_optimizer_draws_on_the_device_types_listed(monkeypatch):
    model = torch.nn.Linear(3, 1)
    optimizer = dpsgd.PrivdiffDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), rng=SecureRandom(14),
                                          noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    assert optimizer._noise_for(torch.device("cpu")) is optimizer.noise and not isinstance(optimizer.noise, DeviceNoise)
    monkeypatch.setattr(dpsgd, "DEVICE_NOISE", ("cpu",))
    source = optimizer._noise_for(torch.device("cpu"))
    assert isinstance(source, DeviceNoise) and optimizer._noise_for(torch.device("cpu")) is source
    optimizer.close()


def test_a_device_whose_exp_errs_is_refused(monkeypatch):
    device_noise._check_device_exp.cache_clear()
    monkeypatch.setattr(device_noise.torch, "exp", lambda x: torch.special.expm1(x) + (1 + 2.0**-30))
    with pytest.raises(PrivdiffError, match="torch's exp on cpu errs by"):
        DeviceNoise(SecureRandom(15), "cpu").discrete_gaussian(10, 3.0)
    monkeypatch.undo()
    device_noise._check_device_exp.cache_clear()
