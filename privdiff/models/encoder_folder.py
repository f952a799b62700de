"""A transformers CLIP vision folder, checked for content before transformers reads it.

``config.json`` and ``preprocessor_config.json`` are bounded JSON (``privdiff.io.untrusted``) whose numbers are
typed and in range; the weights the config implies must fit in memory, and so must the weight files. Every
file is refused by kind (a FIFO, a folder) before it is opened. Each refusal is one line naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from privdiff.errors import PrivdiffError
from privdiff.io.untrusted import config_float, config_int, file_kind, read_json, regular_file

CONFIG, PREPROCESSOR = "config.json", "preprocessor_config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# transformers' CLIPVisionConfig defaults, used for the keys a config leaves out
DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
            "image_size": 224, "patch_size": 32, "projection_dim": 512, "num_channels": 3}
RANGES = {"hidden_size": (1, 16384), "intermediate_size": (1, 65536), "num_hidden_layers": (1, 256),
          "num_attention_heads": (1, 1024), "image_size": (1, 4096), "patch_size": (1, 4096),
          "projection_dim": (1, 16384), "num_channels": (3, 3)}


@dataclass(frozen=True)
class EncoderFolder:
    """A checked folder: its image normalisation (None: CLIP's) and the bytes its weights need."""

    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    weight_bytes: int


def check_encoder_folder(path: Path) -> EncoderFolder:
    """Check ``path``'s config, preprocessor config and weight files; raise one line naming the file."""
    config = _object(read_json(_file(path / CONFIG, path), "image encoder config"), path / CONFIG)
    kind = config.get("model_type")
    if kind not in ("clip_vision_model", "clip"):
        raise PrivdiffError(f"image encoder {path} is a {kind!r:.60} model, not a CLIP vision model")
    vision = config if kind == "clip_vision_model" else _object(config.get("vision_config", {}),
                                                                path / CONFIG, "vision_config")
    sizes = {key: config_int(vision.get(key, DEFAULTS[key]), f"{path / CONFIG} {key}", *RANGES[key])
             for key in DEFAULTS}
    if sizes["hidden_size"] % sizes["num_attention_heads"]:
        raise PrivdiffError(f"{path / CONFIG}: hidden_size {sizes['hidden_size']} is not a multiple of "
                            f"num_attention_heads {sizes['num_attention_heads']}")
    if sizes["patch_size"] > sizes["image_size"]:
        raise PrivdiffError(f"{path / CONFIG}: patch_size {sizes['patch_size']} is larger than image_size "
                            f"{sizes['image_size']}")
    mean, std = _normalisation(path)
    return EncoderFolder(mean, std, max(4 * parameter_count(**sizes), _weight_file_bytes(path)))


def parameter_count(hidden_size: int, intermediate_size: int, num_hidden_layers: int, image_size: int,
                    patch_size: int, projection_dim: int, num_channels: int, **_: int) -> int:
    """About how many weights a CLIP vision transformer of these sizes has."""
    h, patches = hidden_size, (image_size // patch_size) ** 2
    layer = 4 * h * h + 2 * h * intermediate_size + intermediate_size + 9 * h
    return num_hidden_layers * layer + (patches + 1) * h + num_channels * patch_size**2 * h + h * projection_dim


def _file(path: Path, folder: Path) -> Path:
    if file_kind(path) == "missing":
        raise PrivdiffError(f"image encoder {folder} is not a transformers CLIP vision folder (no {path.name})")
    return regular_file(path, "image encoder file")


def _object(value: object, path: Path, key: str | None = None) -> dict:
    if not isinstance(value, dict):
        where = f"{path} {key}" if key else str(path)
        raise PrivdiffError(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def _normalisation(path: Path) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """``image_mean`` and ``image_std`` of the preprocessor config (None where absent): three numbers each."""
    file = path / PREPROCESSOR
    if file_kind(file) == "missing":
        return None, None
    data = _object(read_json(regular_file(file, "image encoder file"), "image encoder preprocessor config"), file)
    out = []
    for key, low in (("image_mean", -1e3), ("image_std", 1e-6)):
        value = data.get(key)
        if value is None:
            out.append(None)
            continue
        if not isinstance(value, list) or len(value) != 3:
            raise PrivdiffError(f"{file} {key} must be a list of 3 numbers, got {value!r:.60}")
        out.append(tuple(config_float(v, f"{file} {key}", low, 1e3) for v in value))
    return out[0], out[1]


def _weight_file_bytes(path: Path) -> int:
    """The size of the folder's weight files, each refused unless a regular file."""
    total = 0
    for entry in sorted(path.iterdir()):
        if entry.suffix in WEIGHT_SUFFIXES:
            total += os.stat(regular_file(entry, "image encoder weights")).st_size
    return total
