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
from safetensors import SafetensorError
from safetensors.torch import save_file

from privdiff.errors import PrivdiffError
from privdiff.io.atomic import atomic_write, os_reason
from privdiff.io.images import half_memory
from privdiff.io.untrusted import config_int
from privdiff.io.untrusted_tensors import TensorSpec, open_tensor_file
from privdiff.wavelet.transform import block_mean, decompose, levels_for, reconstruct

KIND = "privdiff spectral tokenizer"
MAX_SIZE, MAX_BASE, MAX_CODES = 1024, 64, 65536
"""The largest coarse size, base and codebook a tokenizer may have (``privdiff wavelet tokenizer``'s ranges)."""


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
        return write_tensors(path, tensors, metadata, force=force)


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                  force: bool = False) -> Path:
    """Write a safetensors file atomically; a failure is one line naming ``path`` (never its temporary)."""
    try:
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), force=force)
    except (OSError, SafetensorError) as exc:
        raise PrivdiffError(f"cannot write {path}: {os_reason(exc)}") from None


def load_tokenizer(path: str | Path) -> SpectralTokenizer:
    """A tokenizer file, checked before its codebooks are read; anything else raises one line naming the file."""
    with open_tensor_file(path, "tokenizer") as file:
        if file.metadata.get("privdiff_kind") != KIND:
            raise PrivdiffError(f"{file.what} is not a privdiff spectral tokenizer file")
        size, base = geometry(file.metadata, file.what)
        check_codebooks(file.specs, size, base, file.what)
        tensors = file.tensors()
    codebooks = tuple(tensors[f"codebook_{k}"].to(torch.float32) for k in range(len(tensors)))
    return checked_tokenizer(SpectralTokenizer(size, base, codebooks), file.metadata.get("identity"), file.what)


def geometry(metadata: dict[str, str], what: str) -> tuple[int, int]:
    """(size, base) from a tokenizer's or prior's metadata: whole numbers in range, powers of two, base <= size."""
    size, base = (_metadata_int(metadata, key, 1, high, what) for key, high in (("size", MAX_SIZE), ("base", MAX_BASE)))
    try:
        levels_for(size, base)
    except PrivdiffError as exc:
        raise PrivdiffError(f"{what}: {exc}") from None
    return size, base


def _metadata_int(metadata: dict[str, str], key: str, low: int, high: int, what: str) -> int:
    text = metadata.get(key)
    if not isinstance(text, str) or not (text.isascii() and text.isdigit()) or len(text) > 9:
        raise PrivdiffError(f"{what}'s {key} {text!r:.40} is not a whole number")
    return config_int(int(text), f"{what}'s {key}", low, high)


def codebook_dims(size: int, base: int) -> tuple[int, ...]:
    """Each scale's vector length: 3 for the approximation, then 9·p² for detail patches of side p = 1, 2, 4, ..."""
    return (3, *(9 * 4**k for k in range(levels_for(size, base))))


def check_codebooks(specs: dict[str, TensorSpec], size: int, base: int, what: str,
                    vocab_sizes: tuple[int, ...] | None = None) -> None:
    """``specs`` must be exactly one codebook [K_k, dim_k] per scale, 1 <= K_k <= MAX_CODES (``vocab_sizes``, when
    given: the sizes a prior's config records)."""
    dims = codebook_dims(size, base)
    names = [f"codebook_{k}" for k in range(len(dims))]
    if set(specs) != set(names):
        found = sum(name.startswith("codebook_") for name in specs)
        raise PrivdiffError(f"{what} has {found} codebooks and {len(specs) - found} other tensors, but size {size} "
                            f"and base {base} need {len(dims)} codebooks (one per scale) and nothing else")
    for k, (name, dim) in enumerate(zip(names, dims, strict=True)):
        shape = specs[name].shape
        if len(shape) != 2 or shape[1] != dim or not 1 <= shape[0] <= MAX_CODES:
            raise PrivdiffError(f"{what}'s {name} has shape {list(shape)}, not [codes (1..{MAX_CODES}), {dim}]")
        if vocab_sizes is not None and shape[0] != vocab_sizes[k]:
            raise PrivdiffError(f"{what} is damaged: its config records {vocab_sizes[k]} codes for scale {k}, its "
                                f"codebook has {shape[0]}")


def checked_tokenizer(tokenizer: SpectralTokenizer, identity: object, what: str) -> SpectralTokenizer:
    """``tokenizer`` if its codebooks are finite and match the ``identity`` recorded with them."""
    if not all(torch.isfinite(c).all() for c in tokenizer.codebooks):
        raise PrivdiffError(f"{what} holds non-finite codebook values")
    if not isinstance(identity, str) or not identity:
        raise PrivdiffError(f"{what} has no tokenizer identity record")
    if tokenizer.identity != identity:
        raise PrivdiffError(f"{what} is damaged: its codebooks do not match its tokenizer record {identity[:20]!r}")
    return tokenizer


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


def check_fit_memory(count: int, size: int, base: int, codebook_size: int) -> None:
    """Refuse k-means over ``count`` images when its float64 distances and patches need over half the memory."""
    rows = count * base * base
    dims = codebook_dims(size, base)

    def need(codes: int) -> int:
        return 8 * 3 * (rows * (min(codes, rows) + max(dims)) + count * 3 * size * size)

    half = half_memory()
    if half is not None and need(codebook_size) > half:
        fits = max((k for k in range(2, codebook_size) if need(k) <= half), default=None) if need(2) <= half else None
        hint = f"at most {fits} codes per scale fit" if fits else "use fewer images or a smaller --size"
        raise PrivdiffError(f"k-means over {count} images with {codebook_size} codes per scale needs about "
                            f"{need(codebook_size) / 2**20:,.0f} MiB, over half of this machine's "
                            f"{2 * half / 2**20:,.0f} MiB of memory; {hint}")


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
