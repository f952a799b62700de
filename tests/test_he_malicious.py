"""A malicious worker (issue 19): the key holder checks every reply before decrypting it, aborts on a mismatch,
and never hands back in plaintext an element it once encrypted; the noise is secret unless a seed is given."""

import struct

import numpy as np
import pytest
import tenseal as ts
import torch

from privdiff.errors import PrivdiffError
from privdiff.he import steps
from privdiff.he.ckks import KeyHolder
from privdiff.he.noise import LatentNoise
from privdiff.he.protocol import LocalWorker, Reply, Request, work
from privdiff.he.sampler import HEConfig
from privdiff.he.stepper import EncryptedStepper

KEY_MULTIPLE = 2**20  # the reply (0, NTT(m)) decrypts to m x the secret key


@pytest.fixture(scope="module")
def holder():
    return KeyHolder()


# -- crafting ciphertexts as an attacker does: TenSEAL's protobuf around SEAL's uncompressed format ------------

def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def _to_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _seal(version: bytes, body: bytes) -> bytes:
    """SEAL's serialisation header (magic, size, version, no compression) and ``body``."""
    return struct.pack("<HBBBBHQ", 0xA15E, 16, version[0], version[1], 0, 0, 16 + len(body)) + body


def craft(template: bytes, context, c0: np.ndarray, c1: np.ndarray) -> bytes:  # noqa: ANN001
    """A TenSEAL vector blob like ``template`` (one ciphertext at the data level) whose ciphertext is (c0, c1),
    both in NTT form: what a worker can build with no key at all."""
    fields, i = [], 0
    while i < len(template):
        tag = template[i]
        if tag & 7 == 2:  # length-delimited
            length, start = _varint(template, i + 1)
            fields.append((tag, template[start:start + length]))
            i = start + length
        else:  # fixed64 (the scale)
            fields.append((tag, template[i + 1:i + 9]))
            i += 9
    cipher = ts._ts_cpp.CKKSVector(context.data, template).ciphertext()[0]
    version = next(value for tag, value in fields if tag >> 3 == 2)[3:5]
    array = _seal(version, struct.pack("<Q", 2 * len(c0)) + np.concatenate([c0, c1]).astype("<u8").tobytes())
    members = struct.pack("<4Q", *cipher.parms_id()) + b"\x01" + struct.pack("<QQQdQ", 2, len(c0), 1,
                                                                               cipher.scale, 1)
    seal = _seal(version, members + array)
    out = b""
    for tag, value in fields:
        value = seal if tag >> 3 == 2 else value
        out += bytes([tag]) + (_to_varint(len(value)) + value if tag & 7 == 2 else value)
    return out


def key_ciphertext(template: bytes, holder: KeyHolder, multiple: int = KEY_MULTIPLE) -> bytes:
    """(0, NTT(m)): decrypted, it is m x s, the secret key (the key-recovery attack on a decryption oracle)."""
    n = holder.params.poly_modulus_degree
    return craft(template, holder.context, np.zeros(n, dtype=np.uint64), np.full(n, multiple, dtype=np.uint64))


def key_values(template: bytes, holder: KeyHolder) -> np.ndarray:
    """What the crafted reply decrypts to: values of m x s (the test may decrypt; the key holder must not)."""
    return np.asarray(ts._ts_cpp.CKKSVector(holder.context.data, key_ciphertext(template, holder)).decrypt())


def test_the_crafted_reply_decrypts_to_the_key_alone(holder):
    """The attack is real: (0, NTT(m)) decrypts to values linear in the key and nothing else (twice m, twice
    the values), which is what a key holder that decrypts every reply hands back."""
    template = holder.encrypt(np.zeros(8))[0].serialize()
    once = key_values(template, holder)
    twice = np.asarray(ts._ts_cpp.CKKSVector(holder.context.data,
                                             key_ciphertext(template, holder, 2 * KEY_MULTIPLE)).decrypt())
    assert np.abs(once).max() > 1e-6 and np.allclose(twice, 2 * once, rtol=1e-6, atol=1e-12)


# -- malicious workers ------------------------------------------------------------------------------------------

class MaliciousWorker(LocalWorker):
    """An honest worker until step ``at`` (1-based), where ``tamper(request, reply)`` rewrites its reply."""

    def __init__(self, holder: KeyHolder, at: int, tamper) -> None:  # noqa: ANN001
        super().__init__(holder.public_context(), record=[])
        self.holder, self.at, self.tamper = holder, at, tamper
        self.crafted: list[bytes] = []

    def update(self, request: Request) -> Reply:
        reply = super().update(request)
        if len(self.record) == self.at:
            reply = self.tamper(self, request, reply)
        return reply


def reply_key(worker: MaliciousWorker, request: Request, reply: Reply) -> Reply:
    crafted = [key_ciphertext(blob, worker.holder) for blob in reply.ciphertexts]
    worker.crafted += crafted
    return Reply(crafted, reply.plain)


def reply_replayed(worker: MaliciousWorker, request: Request, reply: Reply) -> Reply:
    """The previous step's reply: real ciphertexts of the key holder's, but not the update of these."""
    previous = work(worker.worker, worker.record[-2])
    return Reply(previous.ciphertexts, reply.plain)


def reply_shifted(worker: MaliciousWorker, request: Request, reply: Reply) -> Reply:
    """c1 untouched, c0 moved by a plaintext: the values are off."""
    vectors = [ts._ts_cpp.CKKSVector(worker.worker.context.data, blob) for blob in reply.ciphertexts]
    for vector in vectors:
        vector.add_plain_([0.5] * vector.size())
    return Reply([v.serialize() for v in vectors], reply.plain)


def reply_plain_changed(worker: MaliciousWorker, request: Request, reply: Reply) -> Reply:
    return Reply(reply.ciphertexts, reply.plain + 0.25)


def _run(holder: KeyHolder, worker: MaliciousWorker, packing: str, encrypt_offsets: bool) -> None:
    stepper = EncryptedStepper(holder, worker, 0.01, packing, encrypt_offsets=encrypt_offsets)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for i in range(3):
        eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(i + 1), dtype=torch.float64)
        z = stepper(z, steps.ddim(eps, 0.3 + 0.1 * i, 0.4 + 0.1 * i))


CONFIGS = [("sparse", False), ("sparse", True), ("dense", False), ("dense", True)]


@pytest.mark.parametrize("at", [1, 2])
@pytest.mark.parametrize(("packing", "encrypt_offsets"), CONFIGS)
def test_a_key_recovery_reply_aborts_the_run_undecrypted(holder, at, packing, encrypt_offsets):
    """Crafted at the first step, or at the second after an honest one: the run stops at that reply, so no
    decryption of it ever reaches the worker (the old key holder sent it back in the next step's remainder)."""
    worker = MaliciousWorker(holder, at, reply_key)
    with pytest.raises(PrivdiffError, match="not the update of the one it was sent: refused undecrypted"):
        _run(holder, worker, packing, encrypt_offsets)
    assert len(worker.record) == at and worker.crafted


@pytest.mark.parametrize(("packing", "encrypt_offsets"), CONFIGS)
@pytest.mark.parametrize(("tamper", "message"), [
    (reply_replayed, "refused undecrypted"),
    (reply_shifted, "encrypted values are not the update"),
    (lambda worker, request, reply: Reply(reply.ciphertexts[:-1], reply.plain), "returned 0 ciphertexts for the 1"),
])
def test_any_other_tampering_aborts_the_run(holder, packing, encrypt_offsets, tamper, message):
    with pytest.raises(PrivdiffError, match=message):
        _run(holder, MaliciousWorker(holder, 2, tamper), packing, encrypt_offsets)


def test_a_changed_plaintext_remainder_aborts_the_run(holder):
    with pytest.raises(PrivdiffError, match="plaintext values are not the update"):
        _run(holder, MaliciousWorker(holder, 2, reply_plain_changed), "sparse", False)


def test_check_refuses_a_crafted_ciphertext_before_decrypting(holder):
    sent = holder.encrypt(np.linspace(-1, 1, 100))
    reply = [key_ciphertext(sent[0].serialize(), holder)]
    with pytest.raises(PrivdiffError, match="refused undecrypted"):
        holder.decrypt_reply(sent, reply)
    honest = LocalWorker(holder.public_context()).worker.add([sent[0].serialize()], np.full(100, 0.5))
    assert np.allclose(holder.decrypt_reply(sent, honest), np.linspace(-1, 1, 100) + 0.5, atol=1e-6)


def test_sparse_packing_never_sends_a_once_encrypted_element_in_plaintext(holder):
    worker = LocalWorker(holder.public_context(), record=[])
    _run(holder, worker, "sparse", False)
    encrypted = np.zeros(4 * 16 * 16, dtype=bool)
    for request in worker.record:
        plain = np.ones_like(encrypted)
        plain[request.indices] = False
        assert not (plain & encrypted).any()
        encrypted[request.indices] = True
    assert len(worker.record[-1].plain) <= len(worker.record[1].plain) <= len(worker.record[0].plain)


# -- the noise ----------------------------------------------------------------------------------------------------

def test_secret_noise_differs_every_run_whatever_torch_is_seeded_with():
    torch.manual_seed(0)
    first = LatentNoise()((2, 4, 8, 8))
    torch.manual_seed(0)
    assert not torch.equal(first, LatentNoise()((2, 4, 8, 8)))
    assert "256-bit key" in LatentNoise().describe()


def test_a_seed_gives_reproducible_noise_and_says_what_it_gives_away():
    noise = LatentNoise(7)
    assert torch.equal(noise((3, 5)), LatentNoise(7)((3, 5))) and not torch.equal(noise((3, 5)), LatentNoise(8)((3, 5)))
    assert "seed 7" in noise.describe() and "initial latent" in noise.describe()


def test_standard_normal_from_the_stream_is_standard_normal():
    from privdiff.privacy.randomness import SecureRandom

    draws = SecureRandom(1).standard_normal(200_001)
    assert len(draws) == 200_001 and np.isfinite(draws).all()
    assert abs(draws.mean()) < 0.01 and abs(draws.std() - 1) < 0.01
    assert abs(np.mean(np.abs(draws) < 1) - 0.6827) < 0.005  # the one-sigma mass


def test_the_report_names_the_noise(sd1_backend, holder):
    from privdiff.he.sampler import sample_images

    _, secret = sample_images(sd1_backend, "a photo", "", 1, (32, 32), HEConfig(steps=2, cfg=1.0), holder=holder)
    _, seeded = sample_images(sd1_backend, "a photo", "", 1, (32, 32), HEConfig(steps=2, cfg=1.0), seed=3,
                              holder=holder)
    assert "not recorded" in secret and "seed 3" in seeded
