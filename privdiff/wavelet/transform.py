"""The 2-D Haar wavelet transform of image batches, coarse to fine (PyWavelets).

PyWavelets is chosen over ptwt: the transform runs once per image on the CPU (tokenizing, decoding), where
numpy is enough, and PyWavelets is the reference implementation with wheels everywhere (ptwt pins torch
versions, which a ComfyUI or A1111 install must not have moved).

Bands are ``[LL_J, D_J, D_{J-1}, ..., D_1]``: the approximation at the deepest level J, then the detail
triples (horizontal, vertical, diagonal) from coarse to fine. With the orthonormal Haar filters, LL at
level j is 2^j times the 2^j x 2^j block mean, so the inverse of a prefix of the bands (finer details
zero) is the block-mean image at that level's resolution.
"""

from __future__ import annotations

import numpy as np
import pywt

from privdiff.errors import PrivdiffError

WAVELET = "haar"


def levels_for(size: int, base: int) -> int:
    """Levels J from ``size`` down to ``base`` (both powers of two, base <= size)."""
    for name, value in (("size", size), ("base", base)):
        if value < 1 or value & (value - 1):
            raise PrivdiffError(f"wavelet {name} {value} must be a power of two")
    if base > size:
        raise PrivdiffError(f"wavelet base {base} is larger than the size {size}")
    return int(np.log2(size // base))


def decompose(images: np.ndarray, levels: int) -> list[np.ndarray]:
    """[LL_J [B,C,s,s], D_J [B,3,C,s,s], ..., D_1] of images [B,C,H,W] (float64)."""
    coeffs = pywt.wavedec2(np.asarray(images, np.float64), WAVELET, level=levels, axes=(-2, -1))
    return [coeffs[0]] + [np.stack(triple, axis=1) for triple in coeffs[1:]]


def reconstruct(bands: list[np.ndarray]) -> np.ndarray:
    """The inverse of :func:`decompose` for the bands given: ``[LL_J, D_J, ..., D_j]`` gives LL_{j-1} (the
    approximation at twice D_j's size); ``[LL_J]`` alone is returned as it is."""
    coeffs = [bands[0]] + [tuple(d[:, i] for i in range(3)) for d in bands[1:]]
    if len(coeffs) == 1:
        return coeffs[0]
    return pywt.waverec2(coeffs, WAVELET, axes=(-2, -1))


def block_mean(images: np.ndarray, size: int) -> np.ndarray:
    """Images [B,C,H,W] averaged over blocks down to ``size`` x ``size`` (the Haar approximation, rescaled)."""
    b, c, h, w = images.shape
    if h % size or w % size:
        raise PrivdiffError(f"image size {h}x{w} is not a multiple of {size}")
    return images.reshape(b, c, size, h // size, size, w // size).mean(axis=(3, 5))
