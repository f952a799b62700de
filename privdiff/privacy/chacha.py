"""ChaCha20 (RFC 8439) keystream in torch integer ops, so that noise can be drawn where the tensors live (a GPU).

The same cipher and block layout as ``cryptography``'s ChaCha20 with a 16-byte nonce (a 4-byte little-endian
block counter, then 12 bytes): one key gives the same bytes on every device, which the tests check word for
word. Words are 32-bit values held in int64 (torch has no unsigned 32-bit arithmetic on every device and
version), reduced mod 2**32 after each addition and rotation; nothing ever exceeds 2**48.
"""

from __future__ import annotations

import struct

import torch
from torch import Tensor

from privdiff.errors import PrivdiffError

BLOCK_WORDS = 16
MAX_BLOCKS = 2**32  # the 32-bit block counter
_MASK = 0xFFFFFFFF
_CONSTANTS = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)  # "expand 32-byte k"


def keystream_words(key: bytes, nonce: bytes, first_block: int, blocks: int, device: torch.device | str) -> Tensor:
    """Keystream blocks ``first_block`` to ``first_block + blocks - 1`` of ChaCha20 under ``key`` (32 bytes) and
    ``nonce`` (12 bytes), as their little-endian 32-bit words: int64, shape (blocks, 16), on ``device``."""
    if len(key) != 32 or len(nonce) != 12:
        raise PrivdiffError(f"ChaCha20 takes a 32-byte key and a 12-byte nonce, got {len(key)} and {len(nonce)}")
    if not 0 <= first_block <= first_block + blocks <= MAX_BLOCKS:
        raise PrivdiffError(f"ChaCha20's block counter covers 2**32 blocks; blocks {first_block} + {blocks} do not fit")
    fixed = torch.tensor(_CONSTANTS + struct.unpack("<8I", key), dtype=torch.int64, device=device)
    state = torch.empty(BLOCK_WORDS, blocks, dtype=torch.int64, device=device)
    state[:12] = fixed[:, None]
    state[12] = torch.arange(first_block, first_block + blocks, dtype=torch.int64, device=device)
    state[13:] = torch.tensor(struct.unpack("<3I", nonce), dtype=torch.int64, device=device)[:, None]
    a, b, c, d = (rows.clone() for rows in state.split(4))  # each row of a column of the 4x4 state
    for _ in range(10):
        a, b, c, d = _quarter_rounds(a, b, c, d)  # the columns
        b, c, d = b.roll(-1, 0), c.roll(-2, 0), d.roll(-3, 0)  # the diagonals, lined up as columns
        a, b, c, d = _quarter_rounds(a, b, c, d)
        b, c, d = b.roll(1, 0), c.roll(2, 0), d.roll(3, 0)
    out = torch.cat([a, b, c, d])
    out += state
    out &= _MASK
    return out.T


def _quarter_rounds(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ChaCha's quarter round on four columns at once (each argument: one row of the four columns)."""
    a = (a + b) & _MASK
    d = _rotate(d ^ a, 16)
    c = (c + d) & _MASK
    b = _rotate(b ^ c, 12)
    a = (a + b) & _MASK
    d = _rotate(d ^ a, 8)
    c = (c + d) & _MASK
    b = _rotate(b ^ c, 7)
    return a, b, c, d


def _rotate(x: Tensor, bits: int) -> Tensor:
    """32-bit left rotation of values in [0, 2**32)."""
    return ((x << bits) & _MASK) | (x >> (32 - bits))
