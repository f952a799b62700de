"""Loading a folder of private images as a float tensor, with one-line errors naming the bad file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from privdiff.errors import PrivdiffError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly inside ``folder`` (hidden files skipped), sorted by name."""
    root = Path(folder)
    if not root.is_dir():
        raise PrivdiffError(f"image folder {root} does not exist or is not a folder")
    files = sorted(
        p for p in root.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise PrivdiffError(f"image folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def to_square_rgb(image: Image.Image, resolution: int) -> torch.Tensor:
    """Centre-crop to a square, resize to ``resolution`` and return [3, H, W] floats in 0..1.

    Grayscale, palette and RGBA images are converted to RGB (alpha composited on white).
    """
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """One image file as [3, resolution, resolution] in 0..1; corrupt files raise PrivdiffError."""
    try:
        with Image.open(path) as im:
            im.load()
            return to_square_rgb(im, resolution)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise PrivdiffError(f"cannot read image {path}: {exc}") from None


def load_image_folder(folder: str | os.PathLike, resolution: int) -> tuple[list[Path], torch.Tensor]:
    """All images of ``folder`` as ([paths], [N, 3, resolution, resolution] in 0..1)."""
    if resolution < 8:
        raise PrivdiffError(f"resolution {resolution} is too small (at least 8 pixels)")
    files = list_images(folder)
    return files, torch.stack([load_image(p, resolution) for p in files])


@dataclass(frozen=True)
class PrivateDataset:
    """A folder of private images, loaded: the files (for the local ledger only) and the pixels."""

    files: list[Path]
    images: torch.Tensor

    def __len__(self) -> int:
        return len(self.files)


def load_private_dataset(folder: str | os.PathLike, resolution: int) -> PrivateDataset:
    """Load ``folder`` as a PrivateDataset of [N, 3, resolution, resolution] images in 0..1."""
    files, images = load_image_folder(folder, resolution)
    return PrivateDataset(files, images)
