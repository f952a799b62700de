"""The argument types, limits and option groups every ``privdiff`` command group shares (one-line errors)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from typing import NoReturn

from privdiff.errors import PrivdiffError

MAX_STEPS = 1_000_000
MAX_COMPOSITIONS = 1_000_000_000
MAX_LR = 10.0
MAX_CLIP_NORM = 1e4
MAX_BATCH_SIZE = 4096
MAX_VECTORS = 75  # CLIP's 77-token context minus BOS and EOS; check_config refuses more for the model's templates
MAX_COUNT = 1_000_000_000
MAX_SEED = 2**64 - 1


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors (subcommands' too) are one line, ``privdiff: error: ...``, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"privdiff: error: {one_line(message)}\n")


def one_line(text: object) -> str:
    """``text`` on one line: its non-blank lines joined by spaces."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def real(high: float = math.inf, high_open: bool = False, zero: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number > 0 (>= 0 with ``zero``) and below ``high`` (open or closed), else one line
    naming the value."""
    rule = f"a finite number {'>=' if zero else '>'} 0" + ("" if high == math.inf else
                                                             f" and {'<' if high_open else '<='} {high:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}") from None
        if not (math.isfinite(value) and (value >= 0 if zero else value > 0)
                and (value < high if high_open else value <= high)):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text.strip()}")
        return value

    return parse


def integer(low: int, high: int) -> Callable[[str], int]:
    """argparse type: an integer in ``low..high``, else one line naming the value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}, got {value}")
        return value

    return parse


def resolution(text: str) -> int:
    """argparse type for --resolution: a whole number of pixels that privdiff.io.images.check_resolution accepts."""
    from privdiff.io.images import check_resolution

    try:
        return check_resolution(int(text))
    except ValueError as exc:  # PrivdiffError is a ValueError
        reason = exc if isinstance(exc, PrivdiffError) else f"must be a whole number of pixels, got {text!r}"
        raise argparse.ArgumentTypeError(str(reason)) from None


def model(text: str) -> str:
    """argparse type for --model: 'small', 'tiny', 'tiny-sdxl', or an existing diffusers folder or checkpoint file."""
    from pathlib import Path

    path = Path(text)
    try:
        if text in ("small", "tiny", "tiny-sdxl") or (text.strip() and (path.is_dir() or (
                path.is_file() and path.suffix in (".safetensors", ".ckpt")))):
            return text
    except OSError as exc:  # e.g. a name too long for the filesystem
        raise argparse.ArgumentTypeError(f"model {text[:80]!r}: {exc.strerror or exc}") from None
    raise argparse.ArgumentTypeError(f"model {text!r} not found: expected 'small', 'tiny', 'tiny-sdxl', a diffusers "
                                     "folder or a .safetensors/.ckpt file")


def word(text: str) -> str:
    """argparse type for --init-word: printable text with at least one non-space character."""
    if not text.strip() or not text.isprintable():
        raise argparse.ArgumentTypeError(f"must be a printable word, got {text!r}")
    return text


def device(text: str) -> str:
    """argparse type for --device: a torch device this machine has (privdiff.io.devices.check_device)."""
    from privdiff.io.devices import check_device

    try:
        return check_device(text)
    except PrivdiffError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


POSITIVE = real()


UNIT_OPEN = real(1.0, high_open=True)  # delta


RATE = real(1.0)  # a Poisson sampling rate q in (0, 1]


def print_json(obj: object) -> None:
    """Print a command's result as JSON on stdout."""
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def out_dir(path: str) -> object:
    """An output folder for images, checked but not created (``save_images`` creates it with the first image)."""
    from privdiff.io.image_output import check_image_folder

    return check_image_folder(path, "--out")


def add_accountant(p: argparse.ArgumentParser) -> None:
    """The --accountant option."""
    p.add_argument(
        "--accountant",
        choices=["pld", "prv", "rdp"],
        default=None,
        help="privacy accountant (default: the tightest sound one installed: pld, else prv)",
    )


def add_release_options(p: argparse.ArgumentParser, rate_default: str, epsilon_required: bool = True) -> None:
    """Privacy, output and ledger options shared by the commands that release an embedding."""
    p.add_argument("--out", required=True, help="output embedding file (.safetensors or .pt)")
    p.add_argument("--epsilon", type=POSITIVE, required=epsilon_required, help="target epsilon of this release")
    p.add_argument("--delta", type=UNIT_OPEN, required=True, help="target delta (must be below 1/N)")
    p.add_argument("--sample-rate", type=RATE, default=None, help=f"Poisson sampling rate q (default {rate_default})")
    p.add_argument("--clip-norm", type=real(MAX_CLIP_NORM), default=1.0,
                   help="bound C on each image's contribution (default 1.0)")
    p.add_argument("--bound", choices=["clip", "normalize"], default="clip",
                   help="clip: scale longer vectors down to C; normalize: scale all to exactly C")
    add_accountant(p)
    p.add_argument("--format", choices=["safetensors", "a1111-pt", "diffusers"], default=None,
                   help="file format (default: from the extension; safetensors loads everywhere)")
    p.add_argument("--token", default=None,
                   help="token stored in an a1111-pt or diffusers file (default: output stem); safetensors files "
                        "store none (loaders use the file name)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--dataset-label", default=None, help="your label for the dataset, copied to the report")
    add_ledger_options(p)


def add_ledger_options(p: argparse.ArgumentParser) -> None:
    """Ledger, public size and reproducible seed: every command that releases something takes them."""
    p.add_argument("--ledger", default=None, help="budget ledger JSON file (kept by you, never shipped)")
    p.add_argument("--budget-epsilon", type=POSITIVE, default=None, help="set the dataset's total epsilon budget")
    p.add_argument("--budget-delta", type=UNIT_OPEN, default=None, help="the budget's delta (default: --delta)")
    p.add_argument("--change-budget", action="store_true", help="replace a different budget stored in the ledger")
    p.add_argument("--force-budget", action="store_true", help="release even over the ledger's budget")
    p.add_argument("--public-size", type=integer(1, MAX_COUNT), default=None,
                   help="a dataset size you declare public: the guarantee becomes add-remove (default: the real N "
                        "is used and the guarantee is replace-one)")
    p.add_argument("--reproducible-seed", type=integer(0, MAX_SEED), default=None,
                   help="fixed seed for debugging: the release is marked NOT private")


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """Batch, image size, device and dtype: every command that samples images takes them."""
    p.add_argument("--num-images", type=integer(1, 64), default=1, help="images in the batch (default 1)")
    p.add_argument("--height", type=resolution, default=None, help="pixels (default: the model's)")
    p.add_argument("--width", type=resolution, default=None, help="pixels (default: the model's)")
    p.add_argument("--device", type=device, default=None, help="torch device (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="model weights dtype (default float32)")
