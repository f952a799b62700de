"""Exact discrete Gaussian noise drawn where the tensors live (a GPU), from a ChaCha20 keystream made there.

``DeviceNoise(rng, device)`` keys a ChaCha20 keystream on ``device`` (``chacha``) with the next 256 bits of
``rng``, and spawns from ``rng`` a CPU stream of its own for the rare draws that floats cannot decide. Its
``discrete_gaussian`` runs the algorithm of ``SecureRandom.discrete_gaussian`` (Canonne, Kamath & Steinke
2020, Algorithms 2 and 3: the same proposals, acceptance, float fast path, margin and error bound) in torch
ops, so a DP-SGD step on a GPU never waits for CPU noise. Uniform bits come from 32-bit keystream words
assembled into non-negative int64: u and the geometric's U from 62 bits, the acceptance's U from 53 bits
(its 54th to 64th bits are further uniform bits, drawn from the CPU stream when a draw needs them), the sign
from one more bit. Draws whose comparison the fast path cannot settle (about 2**-35 of them) move to the CPU
and are settled exactly there. The device's exp is measured once per device type as numpy's is
(``exact.exp_error``); a device whose exp errs by more than the budget is refused.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from privdiff.errors import PrivdiffError
from privdiff.privacy import checks
from privdiff.privacy.chacha import BLOCK_WORDS, MAX_BLOCKS, keystream_words
from privdiff.privacy.exact import EXP_BUDGET, FLOAT_MARGIN, MAX_SIGMA, Proposals, exp_error, geometric_floors
from privdiff.privacy.randomness import SecureRandom

_ROUND = 1 << 20  # proposals per round on the device: each of its few hundred kernel launches covers a million
_WORDS = 6  # 32-bit keystream words per proposal: u (62 bits), the geometric's U (62), the acceptance's U (53) + sign
_LOW30, _LOW21 = (1 << 30) - 1, (1 << 21) - 1


class DeviceNoise:
    """Discrete Gaussian draws on ``device`` from a ChaCha20 keystream keyed with 256 bits of ``rng``."""

    def __init__(self, rng: SecureRandom, device: torch.device | str) -> None:
        if not isinstance(rng, SecureRandom):
            raise PrivdiffError(f"rng must be a SecureRandom, got {type(rng).__name__}")
        self.device = torch.device(device)
        self.reproducible = rng.reproducible
        self._key = rng.random_bytes(32)
        self._exact = rng.spawn()  # settles, on the CPU, the draws floats cannot
        self._block = 0

    def words(self, n: int) -> Tensor:
        """The next ``n`` 32-bit keystream words (int64 on the device); each block is used once."""
        blocks = -(-checks.count("n", n, minimum=0) // BLOCK_WORDS)
        if self._block + blocks > MAX_BLOCKS:
            raise PrivdiffError("this DeviceNoise stream is exhausted (2**32 ChaCha20 blocks); create a new one")
        out = keystream_words(self._key, bytes(12), self._block, blocks, self.device).reshape(-1)[:n]
        self._block += blocks
        return out

    def discrete_gaussian(self, size: int, sigma: float) -> Tensor:
        """``size`` i.i.d. samples (int64, on the device) of the discrete Gaussian N_Z(0, sigma^2), exactly as
        ``SecureRandom.discrete_gaussian``: the accepted proposals, in draw order, the first ``size`` of them."""
        size = checks.count("size", size, minimum=0)
        s = checks.positive("sigma", sigma)
        if s > MAX_SIGMA:
            raise PrivdiffError(f"sigma must be <= 2**55, got {sigma!r}")
        _check_device_exp(self.device.type)
        plan = Proposals.for_sigma(s)
        parts, have = [], 0
        while have < size:
            parts.append(self._proposal_round(plan, min(_ROUND, int(2.2 * (size - have)) + 64)))
            have += len(parts[-1])
        return torch.cat(parts)[:size] if parts else torch.zeros(0, dtype=torch.int64, device=self.device)

    def _proposal_round(self, plan: Proposals, m: int) -> Tensor:
        t = plan.t
        w = self.words(_WORDS * m).view(_WORDS, m)
        u = ((w[0] & _LOW30) << 32) | w[1]  # 62 uniform bits
        ok = u < 2**62 - 2**62 % t  # rejection sampling: u uniform on [0, t)
        u %= t
        v = self._geometric(((w[2] & _LOW30) << 32) | w[3])
        if int(v.max()) > (2**63 - 1 - t) // t:  # probability < exp(-2**7): never in practice
            raise PrivdiffError("a discrete Laplace proposal overflowed int64")
        top = ((w[4] & _LOW21) << 32) | w[5]  # the acceptance's U: its first 53 bits
        negative = (w[4] >> 31).bool()
        x = v * t + u
        ok &= ~(negative & (x == 0))  # -0 refused
        gamma = x.double() * plan.a - plan.b  # as on the CPU: one Bernoulli(exp(-(u/t + gamma))) decides both
        gamma = gamma * gamma + u.double() * plan.c
        room = torch.exp(-gamma) * 2.0**53 - top.double()
        below = room >= FLOAT_MARGIN * 2.0**53 + 2
        unsure = torch.nonzero(ok & ~below & (room > -FLOAT_MARGIN * 2.0**53)).flatten().tolist()
        if unsure:
            settled = [self._exact._below_exp_neg(int(top[i]), *plan.exponent(int(u[i]), int(x[i])), bits=53)
                       for i in unsure]
            below[unsure] = torch.tensor(settled, device=self.device)
        ok &= below
        samples = x[ok]
        return torch.where(negative[ok], -samples, samples)

    def _geometric(self, words: Tensor) -> Tensor:
        """``SecureRandom._geometric`` for U's first 62 bits ``words``: compared with c_k = floor(e^-k 2**62)."""
        floors, ascending = _device_floors(self.device)
        v = ((words < floors[0]).to(torch.int64) + (words < floors[1]).to(torch.int64)
             + (words < floors[2]).to(torch.int64))
        deep = torch.nonzero(words <= floors[2]).flatten()
        v[deep] = len(floors) - torch.searchsorted(ascending, words[deep], right=True)
        for i in torch.nonzero(words == floors[v]).flatten().tolist():
            v[i] = self._exact._exact_geometric(int(words[i]), bits=62)
        return v


@functools.lru_cache(maxsize=8)
def _device_floors(device: torch.device) -> tuple[Tensor, Tensor]:
    descending, ascending = geometric_floors(62)
    return (torch.tensor(descending.astype("int64"), device=device),
            torch.tensor(ascending.astype("int64"), device=device))


@functools.cache
def _check_device_exp(device_type: str) -> None:
    """Measure once per device type that torch's float64 exp there is within the fast path's budget."""
    worst = exp_error(lambda x: torch.exp(torch.from_numpy(x).to(device_type)).cpu().numpy())
    if worst > EXP_BUDGET:
        raise PrivdiffError(f"torch's exp on {device_type} errs by {worst:.3g}, more than the exact sampler allows "
                            f"(2**{math.log2(EXP_BUDGET):.0f})")
