"""One encrypted scheduler step between the key holder and the worker (HE-Diffusion's loop, per step):

1. select the elements to encrypt (``selection.select``; dense packing encrypts all of them, in order);
2. encrypt them into as few ciphertexts as the slots allow (sparse: the selected values in order, with their
   positions; dense: the whole latent, positions implicit);
3. the worker adds the offset to the ciphertexts (offset / factor, so no rescale is needed) and applies
   factor x value + offset to the plaintext remainder;
4. check the reply (``KeyHolder.decrypt_reply``: each ciphertext is its sent one plus an offset in c0 alone),
   decrypt, check the values against f·z + b (which the key holder computes itself), multiply by the public
   factor, and merge with the plaintext remainder, which the key holder also recomputes and compares.
Any mismatch aborts the run in one line. An element once encrypted is never sent in plaintext again: its value
is a decryption, and decryptions carry CKKS noise that depends on the secret key. So with sparse packing the
encrypted set only grows over a run (for states of the same shape).
A step with factor 0 (Euler's last step, to sigma 0) keeps nothing of the state: the key holder takes the
offset (the model's prediction) itself and sends nothing.
With ``encrypt_offsets`` the offsets of the encrypted values are encrypted too, so the worker never sees the
model's prediction there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from privdiff.errors import PrivdiffError
from privdiff.he.ckks import KeyHolder
from privdiff.he.protocol import LocalWorker, RemoteWorker, Request
from privdiff.he.selection import check_threshold, select
from privdiff.he.steps import Update

PACKINGS = ("sparse", "dense")


@dataclass
class StepStats:
    """What the encrypted steps cost and covered."""

    steps: int = 0
    plain_steps: int = 0  # steps to sigma 0: the result is the model's prediction, nothing to encrypt
    encrypted: int = 0
    elements: int = 0
    seconds: float = 0.0
    sent: int = 0
    received: int = 0

    @property
    def fraction(self) -> float:
        return self.encrypted / self.elements if self.elements else 0.0


class EncryptedStepper:
    """Callable ``(state, update) -> next state`` whose update runs on ciphertexts for the selected elements."""

    def __init__(self, holder: KeyHolder, link: LocalWorker | RemoteWorker, threshold: float = 0.01,
                 packing: str = "dense", channels: str = "reference", encrypt_offsets: bool = True) -> None:
        if packing not in PACKINGS:
            raise PrivdiffError(f"packing={packing!r} is not one of {', '.join(PACKINGS)}")
        self.holder, self.link = holder, link
        self.threshold, self.packing, self.channels = check_threshold(threshold), packing, channels
        self.encrypt_offsets = encrypt_offsets
        self.stats = StepStats()
        self._decrypted: np.ndarray | None = None  # elements whose value came from a decryption

    def __call__(self, state: torch.Tensor, update: Update) -> torch.Tensor:
        if update.factor == 0:  # a step to sigma 0 keeps nothing of the state: the key holder takes the offset
            self.stats.plain_steps += 1
            return update.offset.to(state.device, state.dtype)
        start = time.perf_counter()
        z = state.detach().to("cpu", torch.float64).flatten()
        b = update.offset.detach().to("cpu", torch.float64).flatten()
        zn, bn = z.numpy(), b.numpy()
        mask = self._mask(state)
        values, scaled = zn[mask], bn[mask] / update.factor
        sent = self.holder.encrypt(values)
        hidden = self.holder.encrypt(scaled) if self.encrypt_offsets else None
        request = Request(
            factor=float(update.factor), ciphertexts=[v.serialize() for v in sent],
            offsets=np.zeros(0) if hidden else scaled,
            offset_ciphertexts=[v.serialize() for v in hidden] if hidden else [],
            plain=zn[~mask], plain_offsets=bn[~mask],
            indices=np.zeros(0, dtype=np.int64) if self.packing == "dense" else np.flatnonzero(mask).astype(np.int64))
        reply = self.link.update(request)
        out = update.factor * zn + bn
        self._check_plain(reply.plain, out[~mask])
        decrypted = self.holder.decrypt_reply(sent, reply.ciphertexts, hidden)
        self._check_values(decrypted, values + scaled)
        out[mask] = update.factor * decrypted
        self._decrypted = mask.copy()
        s = self.stats
        s.steps, s.encrypted, s.elements = s.steps + 1, s.encrypted + int(mask.sum()), s.elements + len(zn)
        s.sent, s.received = self.link.sent, self.link.received
        s.seconds += time.perf_counter() - start
        return torch.from_numpy(out).view(state.shape).to(state.device, state.dtype)

    def _mask(self, state: torch.Tensor) -> np.ndarray:
        """The elements to encrypt this step: all (dense), or the selection plus every element decrypted before."""
        if self.packing == "dense":
            return np.ones(state.numel(), dtype=bool)
        mask = select(state.detach().cpu(), self.threshold, self.channels).flatten().numpy()
        if self._decrypted is not None and len(self._decrypted) == len(mask):
            mask |= self._decrypted
        return mask

    @staticmethod
    def _check_plain(returned: np.ndarray, expected: np.ndarray) -> None:
        """The worker's plaintext remainder must be f·z + b as computed here (the key holder keeps its own)."""
        if len(returned) != len(expected) or not np.allclose(returned, expected, rtol=1e-12, atol=1e-12):
            raise PrivdiffError("the worker's plaintext values are not the update of those it was sent: run aborted "
                                "(a malicious or broken worker)")

    def _check_values(self, decrypted: np.ndarray, expected: np.ndarray) -> None:
        """Decrypted values must be z + b/f up to the context's precision (relative to the values' size)."""
        tolerance = self.holder.precision * max(1.0, float(np.abs(expected).max(initial=0.0)))
        if len(decrypted) != len(expected) or not np.all(np.abs(decrypted - expected) <= tolerance):
            raise PrivdiffError("the worker's encrypted values are not the update of those it was sent: run aborted "
                                "(a malicious or broken worker)")
