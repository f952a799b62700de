"""The registry of model names: "small", "tiny", "tiny-sdxl", or a local diffusers folder or checkpoint file.

Every front and tool resolves a model name here, offline: the shipped small reference model
(``privdiff.models.small``), the tiny random-weight test models (``privdiff.models.tiny``), a local diffusers
folder or a single-file checkpoint (``privdiff.models.single_file``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from privdiff.errors import PrivdiffError
from privdiff.models.single_file import load_single_file
from privdiff.models.small import load_small
from privdiff.models.tiny import DTYPE_KW, tiny_pipeline


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _from_folder(path: Path, dtype: torch.dtype | None) -> DiffusionPipeline:
    if not (path / "model_index.json").is_file():
        raise PrivdiffError(f"{path} is not a diffusers model folder (no model_index.json)")
    kwargs = {"local_files_only": True, DTYPE_KW: dtype}
    try:
        if (path / "text_encoder_2").is_dir():
            return StableDiffusionXLPipeline.from_pretrained(path, **kwargs)
        return StableDiffusionPipeline.from_pretrained(
            path, safety_checker=None, requires_safety_checker=False, **kwargs
        )
    except (OSError, ValueError) as exc:
        raise PrivdiffError(f"cannot load diffusers folder {path}: {_first_line(exc)}") from exc


def _from_single_file(path: Path, config: Path | None, dtype: torch.dtype | None) -> DiffusionPipeline:
    try:
        if config is None:
            return load_single_file(path, dtype, DTYPE_KW)
        xl = (config / "text_encoder_2").is_dir()
        cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
        kwargs = {} if xl else {"safety_checker": None, "requires_safety_checker": False}
        return cls.from_single_file(str(path), config=str(config), local_files_only=True, **{DTYPE_KW: dtype},
                                    **kwargs)
    except PrivdiffError:
        raise
    except Exception as exc:  # diffusers raises many types here; all mean "cannot load this file offline"
        raise PrivdiffError(f"cannot load {path} offline: {_first_line(exc)}") from exc


def load_model(
    spec: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    config: str | Path | None = None,
) -> DiffusionPipeline:
    """Load "small", "tiny", "tiny-sdxl", a local diffusers folder or a local .safetensors/.ckpt file, offline.

    "small" is the shipped reference model trained on procedural shapes
    (``privdiff.models.small``; its training is ``privdiff.reference``);
    "tiny" and "tiny-sdxl" have random weights. A single-file SD1.x/SD2.x/SDXL checkpoint in the original
    layout needs no other file (see ``privdiff.models.single_file``); ``config``, a local diffusers folder,
    overrides the component configs detected from its keys.
    """
    if str(spec) == "small":
        pipe = load_small(dtype)
    elif str(spec) in ("tiny", "tiny-sdxl"):
        pipe = tiny_pipeline("sdxl" if str(spec) == "tiny-sdxl" else "sd1")
        if dtype not in (None, torch.float32):  # built in float32; other models load in ``dtype``
            pipe = pipe.to(dtype=dtype)
    else:
        path = Path(spec)
        if not path.exists():
            raise PrivdiffError(f"model not found: {path} (expected 'small', 'tiny', 'tiny-sdxl', a diffusers "
                                "folder or a .safetensors/.ckpt file)")
        if config is not None and not Path(config).is_dir():
            raise PrivdiffError(f"config folder not found: {config}")
        if path.is_dir():
            pipe = _from_folder(path, dtype)
        elif path.suffix in (".safetensors", ".ckpt"):
            pipe = _from_single_file(path, Path(config) if config else None, dtype)
        else:
            raise PrivdiffError(f"unsupported model file {path} (expected a .safetensors or .ckpt file)")
    return pipe if device is None else pipe.to(device)
