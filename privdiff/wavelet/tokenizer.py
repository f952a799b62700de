"""The spectral tokenizer: Haar bands cut into per-scale patches, each quantised by a codebook learned on
public images (k-means), coarse to fine.

With coarse size C and base b, there are J = log2(C/b) levels and J+1 scales: the approximation LL_J
(b x b) and the detail triples D_J ... D_1 (b x b up to C/2 x C/2). Every scale is cut into b x b patches,
so finer scales get bigger patches (patch side s/b for a band of side s) and each scale costs b² tokens.
Because the Haar filters are orthonormal, k-means in coefficient space minimises pixel-space MSE, and a
prefix of whole scales decodes to the block-mean image at that scale's resolution.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from privdiff.atomic import atomic_write
from privdiff.errors import PrivdiffError
from privdiff.wavelet.transform import block_mean, decompose, levels_for, reconstruct

KIND = "privdiff spectral tokenizer"


@dataclass(frozen=True)
class SpectralTokenizer:
    """``codebooks[k]`` [K_k, dim_k] for scale k (0: LL_J, then D_J ... D_1) of images at ``size`` px."""

    size: int
    base: int
    codebooks: tuple[torch.Tensor, ...]

    @property
    def levels(self) -> int:
        return levels_for(self.size, self.base)

    @property
    def tokens_per_scale(self) -> int:
        return self.base * self.base

    @property
    def length(self) -> int:
        """Tokens per image."""
        return (self.levels + 1) * self.tokens_per_scale

    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        return tuple(len(c) for c in self.codebooks)

    @property
    def identity(self) -> str:
        """A digest of the configuration and codebooks: a prior records the tokenizer it was trained with."""
        digest = hashlib.sha256(f"{self.size},{self.base}".encode())
        for codebook in self.codebooks:
            digest.update(codebook.to(torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def scale_of_position(self) -> torch.Tensor:
        """The scale index [length] of each token position."""
        return torch.arange(self.levels + 1).repeat_interleave(self.tokens_per_scale)

    def patches(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per scale, the patch vectors [B, b², dim_k] of images [B,3,H,W] in 0..1 (block-averaged to ``size``)."""
        x = images.detach().to(torch.float64).cpu().numpy()
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3] or x.shape[2] < self.size:
            raise PrivdiffError(f"images of shape {tuple(x.shape)} are not square RGB of at least {self.size} px")
        bands = decompose(block_mean(x, self.size), self.levels)
        return [_to_patches(band, self.base) for band in bands]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Token ids [B, length] (per-scale codebook indices), coarse to fine."""
        out = [torch.cdist(p, c.to(torch.float64)).argmin(-1) for p, c in
               zip(self.patches(images), self.codebooks, strict=True)]
        return torch.cat(out, dim=1)

    def decode(self, tokens: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Images [B,3,r,r] (clamped to 0..1 unless ``clamp`` is off) from a prefix of whole scales,
        r = b·2^(scales−1): the block mean, at r, of what the whole sequence decodes to."""
        n = tokens.shape[1]
        if n == 0 or n % self.tokens_per_scale or n > self.length:
            raise PrivdiffError(f"{n} tokens are not a prefix of whole scales ({self.tokens_per_scale} tokens each, "
                                f"{self.length} in all)")
        bands = []
        for k, chunk in enumerate(tokens.split(self.tokens_per_scale, dim=1)):
            vectors = self.codebooks[k].to(torch.float64)[chunk.long().cpu()]
            bands.append(_from_patches(vectors.numpy(), self.base, detail=k > 0))
        image = reconstruct(bands) / 2 ** (self.levels - (len(bands) - 1))
        out = torch.from_numpy(image).float()
        return out.clamp(0, 1) if clamp else out

    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write the tokenizer file atomically (an existing file needs ``force``)."""
        tensors = {f"codebook_{k}": c.to(torch.float32).contiguous() for k, c in enumerate(self.codebooks)}
        metadata = {"privdiff_kind": KIND, "size": str(self.size), "base": str(self.base),
                    "identity": self.identity}
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), force=force)


def load_tokenizer(path: str | Path) -> SpectralTokenizer:
    """A tokenizer file; anything else raises a one-line PrivdiffError naming the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("privdiff_kind") != KIND:
                raise PrivdiffError(f"{path} is not a privdiff spectral tokenizer file")
            n = len([k for k in list(f.keys()) if k.startswith("codebook_")])
            codebooks = tuple(f.get_tensor(f"codebook_{k}") for k in range(n))
        return SpectralTokenizer(int(metadata["size"]), int(metadata["base"]), codebooks)
    except (OSError, SafetensorError, ValueError, KeyError) as exc:
        raise PrivdiffError(f"cannot read tokenizer {path}: {' '.join(str(exc).split())}") from exc


def _to_patches(band: np.ndarray, base: int) -> torch.Tensor:
    """[B, (3,) C, s, s] → [B, base², (3·) C·p²] with p = s / base (patches in raster order)."""
    b, s = band.shape[0], band.shape[-1]
    p = s // base
    x = band.reshape(b, -1, base, p, base, p)  # [B, channels, by, py, bx, px]
    x = x.transpose(0, 2, 4, 1, 3, 5).reshape(b, base * base, -1)
    return torch.from_numpy(np.ascontiguousarray(x))


def _from_patches(vectors: np.ndarray, base: int, detail: bool) -> np.ndarray:
    """The inverse of :func:`_to_patches`: [B, base², dim] → [B, (3,) 3, s, s]."""
    b, _, dim = vectors.shape
    channels = 9 if detail else 3
    p = int(round((dim / channels) ** 0.5))
    x = vectors.reshape(b, base, base, channels, p, p).transpose(0, 3, 1, 4, 2, 5)
    x = x.reshape(b, channels, base * p, base * p)
    return x.reshape(b, 3, 3, base * p, base * p) if detail else x


def fit_tokenizer(
    images: torch.Tensor, size: int = 32, base: int = 4, codebook_size: int = 256, iterations: int = 25,
    seed: int = 0,
) -> SpectralTokenizer:
    """Learn the per-scale codebooks from **public** images [B,3,H,W] by k-means (k-means++ start, seeded:
    the data are public, so no privacy randomness is involved)."""
    levels_for(size, base)
    if codebook_size < 2:
        raise PrivdiffError(f"codebook size {codebook_size} must be at least 2")
    probe = SpectralTokenizer(size, base, ())
    generator = torch.Generator().manual_seed(seed)
    codebooks = tuple(_kmeans(p.reshape(-1, p.shape[-1]), codebook_size, iterations, generator)
                      for p in probe.patches(images))
    return SpectralTokenizer(size, base, codebooks)


def _kmeans(x: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means on rows of ``x`` (float64); k is capped by the number of distinct rows."""
    x = x.to(torch.float64)
    k = min(k, len(torch.unique(x, dim=0)))
    centers = x[torch.randint(len(x), (1,), generator=generator)]
    for _ in range(1, k):  # k-means++: next centre drawn in proportion to the squared distance
        d = torch.cdist(x, centers).min(dim=1).values.pow(2)
        centers = torch.cat([centers, x[torch.multinomial(d / d.sum(), 1, generator=generator)]])
    for _ in range(iterations):
        assign = torch.cdist(x, centers).argmin(dim=1)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        centers = torch.where(counts > 0, sums / counts.clamp(min=1), centers)
    return centers.to(torch.float32)
