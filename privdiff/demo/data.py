"""A small "private" image set for the demo and tests, generated procedurally (no downloads).

The images share a style — warm concentric rings over diagonal stripes — with per-image variation,
so a style embedding has something common to learn.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def style_image(rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One image of the demo style."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cx, cy = rng.uniform(0.25, 0.75, 2)
    rings = np.sin(np.hypot(x - cx, y - cy) * rng.uniform(18, 30))
    stripes = np.sin((x + y) * rng.uniform(10, 20) + rng.uniform(0, np.pi))
    warm = np.array([0.95, 0.55, 0.15]) + rng.uniform(-0.08, 0.08, 3)
    cool = np.array([0.20, 0.15, 0.45]) + rng.uniform(-0.08, 0.08, 3)
    mix = (0.5 + 0.35 * rings + 0.15 * stripes)[..., None]
    pixels = np.clip(mix * warm + (1 - mix) * cool, 0, 1)
    return Image.fromarray((pixels * 255).astype(np.uint8), mode="RGB")


def write_style_images(folder: str | os.PathLike, count: int = 24, size: int = 64, seed: int = 0) -> Path:
    """Write ``count`` PNG images of the demo style into ``folder`` (created if needed)."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        style_image(rng, size).save(root / f"private_{i:03d}.png")
    return root
