"""Generated images to disk: numbered PNGs that never overwrite, their settings in a PNG text chunk."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from privdiff.atomic import atomic_write


def save_images(images: torch.Tensor, folder: Path, settings: dict[str, object],
                prefix: str = "privdiff") -> list[Path]:
    """Write images [B,3,H,W] in 0..1 as ``<prefix>_NNNNN.png`` after the highest number already in ``folder``.

    Each file carries ``settings`` as JSON in its "parameters" text chunk; writes are atomic.
    """
    numbers = (p.stem.rsplit("_", 1)[1] for p in folder.glob(f"{prefix}_*.png"))
    taken = [int(n) for n in numbers if n.isdigit()]
    start = max(taken, default=-1) + 1
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", json.dumps(settings))
    written = []
    for i, image in enumerate(images):
        array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu() * 255).round().byte().numpy()
        path = folder / f"{prefix}_{start + i:05d}.png"
        atomic_write(path, lambda tmp, a=array: Image.fromarray(a).save(tmp, format="PNG", pnginfo=info))
        written.append(path)
    return written
