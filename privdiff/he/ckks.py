"""CKKS through TenSEAL: parameters, and the two roles of an encrypted step.

The **key holder** owns the secret key: it encrypts (symmetric CKKS: only it ever encrypts) and decrypts.
The **worker** gets the context serialised without the secret key; it can add to ciphertexts but cannot
decrypt them. Ciphertexts hold the values at scale 2**scale_bits under a single data prime, so the worker's
additions never need a rescale (depth 0): the update's scalar factor is public and applied in the clear.
Vectors are built, read and added through TenSEAL's C++ objects (``tenseal._ts_cpp``), which its Python
wrappers wrap: the wrappers' conversions cost about as much as the encryption itself.

The worker is untrusted. A ciphertext (c0, c1) decrypts to c0 + c1·s, so a key holder that decrypted whatever
came back would be a decryption oracle: a reply (0, 1) decrypts to the secret key itself. Before decrypting
anything, ``KeyHolder.decrypt_reply`` checks that each reply differs from what the worker may compute (the
ciphertext sent, plus the encrypted offset sent with it) in c0 alone: their difference must be transparent
(c1 = 0). Then decryption gives the sent value plus whatever the worker added to c0, which is a function of
nothing secret; the caller checks that value against the update it expects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from privdiff.errors import PrivdiffError

try:
    import tenseal as ts
except ImportError:  # pragma: no cover - tenseal is a dependency; this keeps the message one line
    ts = None

# SEAL's largest total coefficient modulus (bits) for 128-bit security, per polynomial degree.
SECURE_BITS = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
PRECISION = 1e-6  # the largest round-trip error a context may show on its probe


def _tenseal():
    if ts is None:
        raise PrivdiffError("encrypted steps need TenSEAL: pip install tenseal")
    return ts


@dataclass(frozen=True)
class CKKSParams:
    """Polynomial degree, coefficient modulus primes (bits) and scale; ``reference()`` is HE-Diffusion's."""

    poly_modulus_degree: int = 16384
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 60)
    scale_bits: int = 40

    @classmethod
    def reference(cls) -> CKKSParams:
        """The released HE-Diffusion code's parameters: 8192, [31, 26 x 6, 31], scale 2**26."""
        return cls(8192, (31, 26, 26, 26, 26, 26, 26, 31), 26)

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def capacity(self) -> float:
        """Largest |value| a fresh ciphertext holds: the first (data) prime over the scale, with a bit spare."""
        return 2.0 ** (self.coeff_mod_bit_sizes[0] - self.scale_bits - 2)

    def check(self) -> None:
        """Refuse parameters SEAL cannot use securely or that leave no room for the values."""
        n, bits = self.poly_modulus_degree, self.coeff_mod_bit_sizes
        if n not in SECURE_BITS:
            raise PrivdiffError(f"poly modulus degree {n} is not one of {', '.join(map(str, SECURE_BITS))}")
        if len(bits) < 2 or any(not 20 <= b <= 60 for b in bits):
            raise PrivdiffError(f"coefficient modulus {list(bits)} needs at least two primes of 20 to 60 bits")
        if sum(bits) > SECURE_BITS[n]:
            raise PrivdiffError(f"coefficient modulus {list(bits)} has {sum(bits)} bits, over the 128-bit security "
                                f"limit of {SECURE_BITS[n]} for poly modulus degree {n}")
        if not 20 <= self.scale_bits <= bits[0] - 4:
            raise PrivdiffError(f"scale 2**{self.scale_bits} leaves no room for values under a {bits[0]}-bit "
                                f"first prime (use 20 to {bits[0] - 4} bits)")


DEFAULT_PARAMS = CKKSParams()


class KeyHolder:
    """The secret-key side: encrypts values into ciphertexts of ``slots`` values, decrypts checked replies.

    ``precision`` bounds the round-trip error a context may show on its probe (None: no probe).
    """

    def __init__(self, params: CKKSParams = DEFAULT_PARAMS, precision: float | None = PRECISION) -> None:
        tenseal = _tenseal()
        params.check()
        self.params = params
        self.precision = PRECISION if precision is None else precision
        self.context = tenseal.context(tenseal.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
                                       coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
                                       encryption_type=tenseal.ENCRYPTION_TYPE.SYMMETRIC)
        self.context.global_scale = 2.0**params.scale_bits
        if precision is not None:
            error = self._probe_error()
            if error > precision:
                raise PrivdiffError(f"CKKS parameters {params} lose precision: a round trip errs by {error:.1e}, "
                                    f"more than {precision:g} (raise scale_bits)")

    def public_context(self) -> bytes:
        """The context without its secret key: all a worker gets."""
        return self.context.serialize(save_secret_key=False)

    def encrypt(self, values: np.ndarray) -> list:
        """TenSEAL C++ vectors of ``values`` (1-D), ``slots`` values each; refuses values the modulus cannot hold.
        Serialise them with ``.serialize()``; keep them to check the worker's reply (``decrypt_reply``)."""
        values = np.asarray(values, dtype=np.float64)
        top = float(np.abs(values).max(initial=0.0))
        if not math.isfinite(top) or top >= self.params.capacity:
            raise PrivdiffError(f"latent values up to {top:.3g} do not fit the CKKS parameters (|x| < "
                                f"{self.params.capacity:g} with a {self.params.coeff_mod_bit_sizes[0]}-bit first "
                                f"prime and scale 2**{self.params.scale_bits})")
        slots, scale = self.params.slots, self.context.global_scale
        return [ts._ts_cpp.CKKSVector(self.context.data, values[i:i + slots].tolist(), scale)
                for i in range(0, len(values), slots)]

    def decrypt_reply(self, sent: list, reply: list[bytes], added: list | None = None) -> np.ndarray:
        """The values (float64) of the worker's ``reply`` to the vectors ``sent`` (plus ``added``, the encrypted
        offsets sent with them), decrypted only once every reply ciphertext is shown to differ from its sent
        ciphertext (+ added) in c0 alone; anything else is refused in one line before any decryption."""
        if len(reply) != len(sent):
            raise PrivdiffError(f"the worker returned {len(reply)} ciphertexts for the {len(sent)} it was sent")
        vectors = []
        for i, blob in enumerate(reply):
            try:
                vector = ts._ts_cpp.CKKSVector(self.context.data, blob)
            except Exception as error:  # noqa: BLE001 - any parse failure is a bad reply
                raise PrivdiffError(f"the worker's reply holds an unreadable ciphertext ({error})") from None
            expected = sent[i] if added is None else sent[i].add(added[i])
            if vector.size() != sent[i].size() or not _differ_in_c0_only(vector, expected):
                raise PrivdiffError(f"the worker's ciphertext {i + 1} is not the update of the one it was sent: "
                                    "refused undecrypted (a malicious or broken worker)")
            vectors.append(vector)
        return np.concatenate([np.asarray(v.decrypt(), dtype=np.float64) for v in vectors] or [np.zeros(0)])

    def _probe_error(self) -> float:
        probe = np.random.default_rng(0).uniform(-4, 4, min(self.params.slots, 4096))
        worker = Worker(self.public_context())
        sent = self.encrypt(probe)
        reply = worker.add([sent[0].serialize()], probe)
        return float(np.abs(self.decrypt_reply(sent, reply) - 2 * probe).max())


def _differ_in_c0_only(vector, expected) -> bool:  # noqa: ANN001 - TenSEAL's C++ CKKSVectors
    """Whether ``vector - expected`` is transparent (c1 = 0 and no further polynomial): the worker changed c0 only.
    SEAL refuses to return a transparent result where it is built to ("result ciphertext is transparent"); a
    mismatch of parameters, level or scale raises something else and counts as a difference."""
    if len(vector.ciphertext()) != 1 or len(expected.ciphertext()) != 1:
        return False
    try:
        difference = vector.sub(expected)
    except Exception as error:  # noqa: BLE001 - SEAL's refusal is the answer
        return "transparent" in str(error)
    return all(c.is_transparent() for c in difference.ciphertext())


class Worker:
    """The public side: a context without the secret key, adding to ciphertexts it cannot read."""

    def __init__(self, public_context: bytes) -> None:
        tenseal = _tenseal()
        try:
            self.context = tenseal.context_from(public_context)
        except Exception as error:  # noqa: BLE001 - any parse failure is a bad message
            raise PrivdiffError(f"the public context could not be read ({error})") from None
        if self.context.is_private():
            raise PrivdiffError("the context holds a secret key: a worker must get the public context only")

    def load(self, blob: bytes):  # noqa: ANN201 - TenSEAL's C++ CKKSVector
        try:
            return ts._ts_cpp.CKKSVector(self.context.data, blob)
        except Exception as error:  # noqa: BLE001
            raise PrivdiffError(f"a ciphertext could not be read ({error})") from None

    def add(self, ciphertexts: list[bytes], offsets: np.ndarray | list[bytes]) -> list[bytes]:
        """Each ciphertext plus its offsets, serialised again: plain offsets are one array over all the
        ciphertexts' values in order; encrypted offsets are one ciphertext per ciphertext."""
        encrypted = isinstance(offsets, list)
        if encrypted and len(offsets) != len(ciphertexts):
            raise PrivdiffError(f"{len(ciphertexts)} ciphertexts but {len(offsets)} encrypted offsets")
        out, at = [], 0
        for i, blob in enumerate(ciphertexts):
            vector = self.load(blob)
            size = vector.size()
            if encrypted:
                other = self.load(offsets[i])
                if other.size() != size:
                    raise PrivdiffError("a ciphertext and its encrypted offset differ in length")
                vector.add_(other)
            else:
                vector.add_plain_(offsets[at:at + size].tolist())
                at += size
            out.append(vector.serialize())
        if not encrypted and at != len(offsets):
            raise PrivdiffError(f"{at} encrypted values but {len(offsets)} offsets")
        return out
