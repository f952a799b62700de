"""Generated images to disk: numbered PNGs that never overwrite, their settings in a PNG text chunk.

The settings travel with every copy of an image: they name input files by :func:`file_name` only (never a
path, which tells where the user keeps private work) and leave out what a mode hides unless asked.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from privdiff.errors import PrivdiffError
from privdiff.io.atomic import atomic_write, os_reason


def file_name(path: str | os.PathLike | None) -> str | None:
    """The last part of ``path`` (a file's base name, or a registry name as given), for PNG settings."""
    return None if path is None else Path(path).name


def prompt_settings(prompt: str, negative_prompt: str, seed: int | None, save: bool) -> dict[str, object]:
    """The prompt, negative prompt and seed (None: secret noise, no seed) as PNG settings when the user asks to
    ``save`` them, else none: encrypted denoising hides them from the worker, and a shared image should not give
    them away."""
    if not save:
        return {}
    return {"prompt": prompt, "negative_prompt": negative_prompt, **({} if seed is None else {"seed": seed})}


def check_image_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """``path`` as a Path if ``save_images`` can write there: an existing folder that takes a new file, or a
    missing one whose nearest existing parent is a folder that takes a new folder. Creates nothing (a probe
    is made and removed at once), so a run refused later leaves no folder behind."""
    out = Path(path).expanduser()
    parent = out
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise PrivdiffError(f"{what} {out} is a file, not a folder" if parent == out else
                            f"{what} {out} cannot be created: {parent} is not a folder")
    try:
        if parent == out:
            fd, probe = tempfile.mkstemp(prefix=".privdiff-", suffix=".probe.tmp", dir=out)
            os.close(fd)
            os.unlink(probe)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".privdiff-", suffix=".probe", dir=parent))
    except OSError as exc:
        raise PrivdiffError(f"{what} {out} is not writable: {os_reason(exc)}") from None
    return out


def save_images(images: torch.Tensor, folder: Path, settings: dict[str, object],
                prefix: str = "privdiff") -> list[Path]:
    """Write images [B,3,H,W] in 0..1 as ``<prefix>_NNNNN.png`` after the highest number already in ``folder``
    (created when missing: callers check it first with ``check_image_folder``).

    Each file carries ``settings`` as JSON in its "parameters" text chunk; writes are atomic.
    """
    folder.mkdir(parents=True, exist_ok=True)
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
