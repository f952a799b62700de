"""One encrypted scheduler step between the key holder and the worker (HE-Diffusion's loop, per step):

1. select the elements to encrypt (``selection.select``; dense packing encrypts all of them, in order);
2. encrypt them into as few ciphertexts as the slots allow (sparse: the selected values in order, with their
   positions; dense: the whole latent, positions implicit);
3. the worker adds the offset to the ciphertexts (offset / factor, so no rescale is needed) and applies
   factor x value + offset to the plaintext remainder;
4. decrypt, multiply the decrypted values by the public factor, and merge.
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
                 packing: str = "sparse", channels: str = "reference", encrypt_offsets: bool = False) -> None:
        if packing not in PACKINGS:
            raise PrivdiffError(f"packing={packing!r} is not one of {', '.join(PACKINGS)}")
        self.holder, self.link = holder, link
        self.threshold, self.packing, self.channels = check_threshold(threshold), packing, channels
        self.encrypt_offsets = encrypt_offsets
        self.stats = StepStats()

    def __call__(self, state: torch.Tensor, update: Update) -> torch.Tensor:
        if update.factor == 0:  # a step to sigma 0 keeps nothing of the state: the key holder takes the offset
            self.stats.plain_steps += 1
            return update.offset.to(state.device, state.dtype)
        start = time.perf_counter()
        z = state.detach().to("cpu", torch.float64).flatten()
        b = update.offset.detach().to("cpu", torch.float64).flatten()
        if self.packing == "dense":
            mask = np.ones(len(z), dtype=bool)
            indices = np.zeros(0, dtype=np.int64)
        else:
            mask = select(state.detach().cpu(), self.threshold, self.channels).flatten().numpy()
            indices = np.flatnonzero(mask).astype(np.int64)
        values, zn, bn = z.numpy()[mask], z.numpy(), b.numpy()
        scaled = bn[mask] / update.factor
        request = Request(
            factor=float(update.factor), ciphertexts=self.holder.encrypt(values),
            offsets=np.zeros(0) if self.encrypt_offsets else scaled,
            offset_ciphertexts=self.holder.encrypt(scaled) if self.encrypt_offsets else [],
            plain=zn[~mask], plain_offsets=bn[~mask], indices=indices)
        reply = self.link.update(request)
        if len(reply.plain) != len(request.plain):
            raise PrivdiffError(f"the worker returned {len(reply.plain)} plaintext values, not {len(request.plain)}")
        out = np.empty(len(zn))
        out[mask] = update.factor * self.holder.decrypt(reply.ciphertexts, int(mask.sum()))
        out[~mask] = reply.plain
        s = self.stats
        s.steps, s.encrypted, s.elements = s.steps + 1, s.encrypted + int(mask.sum()), s.elements + len(zn)
        s.sent, s.received = self.link.sent, self.link.received
        s.seconds += time.perf_counter() - start
        return torch.from_numpy(out).view(state.shape).to(state.device, state.dtype)
