"""Loading a folder of private images as a float tensor, with one-line errors naming the bad file.

Images load "as a person sees them": the first frame, upright (EXIF orientation applied), every common pixel mode
and bit depth scaled to 0..1 (see :func:`to_float_rgb`), transparency composited on white. Hostile input is refused
before any pixel is decoded: every header of a folder is checked (format, declared size) before the first image is
decoded, and only regular files are ever opened (a FIFO never blocks).

One cohesive thing, kept whole over 400 lines: the single path from an untrusted image file to the pixels a
release trains on (scan, header checks, decode, read-once digests), which must not fork.
"""

from __future__ import annotations

import hashlib
import io
import logging
import numbers
import os
import stat
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from privdiff.errors import PrivdiffError

log = logging.getLogger("privdiff")

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")  # the PIL decoders tried; never EPS, PSD, ...
MIN_RESOLUTION = 8
MAX_RESOLUTION = 4096
MAX_IMAGE_PIXELS = 8192 * 8192  # a larger declared size is refused from the header (PIL's lower limit also applies)

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "PA"})
_DEEP_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_MODES = _ALPHA_MODES | _DEEP_MODES | {"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
_SKIPPED_PLURALS = {"folder": "folders", "broken link": "broken links", "special file": "special files",
                    "unreadable entry": "unreadable entries", "hidden file": "hidden files",
                    "non-image file": "non-image files"}


ORIENTATION = 0x0112
"""The EXIF orientation tag."""


def check_resolution(value: object) -> int:
    """``value`` as an int in MIN_RESOLUTION..MAX_RESOLUTION pixels; anything else raises PrivdiffError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise PrivdiffError(f"resolution {value!r} is not a whole number of pixels")
    value = int(value)
    if value < MIN_RESOLUTION:
        raise PrivdiffError(f"resolution {value} is too small (at least {MIN_RESOLUTION} pixels)")
    if value > MAX_RESOLUTION:
        raise PrivdiffError(f"resolution {value} is too large (at most {MAX_RESOLUTION} pixels)")
    return value


def _entry_kind(entry: Path) -> str | None:
    """None for an image file to load, else what the entry is (a key of _SKIPPED_PLURALS); never opens it."""
    try:
        mode = entry.stat().st_mode  # follows symlinks: a link to an image file is loaded
    except OSError:
        return "broken link" if entry.is_symlink() else "unreadable entry"
    if stat.S_ISDIR(mode):
        return "folder"
    if not stat.S_ISREG(mode):
        return "special file"  # FIFO, socket, device
    if entry.name.startswith("."):
        return "hidden file"
    return None if entry.suffix.lower() in IMAGE_SUFFIXES else "non-image file"


def list_images(folder: str | os.PathLike, *, warn: bool = True) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name.

    Everything else (folders, broken links, FIFOs and other special files, hidden files, other suffixes) is
    skipped, with one warning on the "privdiff" logger that counts them (unless ``warn`` is false).
    """
    files, note = _scan(folder)
    if note and warn:
        log.warning("%s", note)
    return files


def _scan(folder: str | os.PathLike) -> tuple[list[Path], str]:
    """The image files of ``folder`` and a note counting the entries skipped ("" when none was)."""
    root = Path(folder)
    if not root.is_dir():
        raise PrivdiffError(f"image folder {root} does not exist or is not a folder")
    try:
        entries = sorted(root.iterdir())
    except OSError as exc:
        raise PrivdiffError(f"cannot list image folder {root}: {_describe(exc)}") from None
    files, skipped = [], Counter()
    for entry in entries:
        kind = _entry_kind(entry)
        if kind is None:
            files.append(entry)
        else:
            skipped[kind] += 1
    if not files:
        raise PrivdiffError(f"image folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if not skipped:
        return files, ""
    n = sum(skipped.values())
    parts = ", ".join(f"{skipped[k]} {k if skipped[k] == 1 else p}" for k, p in _SKIPPED_PLURALS.items() if skipped[k])
    return files, (f"skipped {n} {'entry' if n == 1 else 'entries'} of {root} that {'is' if n == 1 else 'are'} not "
                   f"image files ({parts})")


def _describe(exc: BaseException) -> str:
    """A one-line description of ``exc`` for a user message."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _pixel_limit() -> int:
    """The most pixels an image may declare: MAX_IMAGE_PIXELS, or PIL's limit where that is lower."""
    pil = Image.MAX_IMAGE_PIXELS
    return MAX_IMAGE_PIXELS if pil is None else min(MAX_IMAGE_PIXELS, pil)


@cache
def _formats() -> tuple[str, ...]:
    """The IMAGE_FORMATS this PIL build can decode (WebP may be missing)."""
    Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


def _unchecked_size(fp: BinaryIO) -> tuple[int, int] | None:
    """The size a file declares, read by PIL's format plugins without the bomb check Image.open runs first."""
    fp.seek(0)
    prefix = fp.read(16)
    for name in _formats():
        factory, accept = Image.OPEN[name]
        verdict = accept(prefix) if accept else True
        if verdict and not isinstance(verdict, str):
            fp.seek(0)
            try:
                return factory(fp, "").size
            except Exception:  # try the next format, as Image.open does
                continue
    return None


def _refuse_size(path: Path, size: tuple[int, int] | None) -> PrivdiffError:
    """The error for an image declaring too many pixels."""
    declared = "too many" if size is None else f"{size[0]}x{size[1]}"
    limit = _pixel_limit()
    return PrivdiffError(f"cannot read image {path}: declares {declared} pixels, over the limit of {limit} pixels")


@contextmanager
def _reading(path: Path) -> Iterator[BinaryIO]:
    """Open ``path`` (a regular, non-empty file only) inside :func:`_decoding`."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise PrivdiffError(f"cannot read image {path}: {_describe(exc)}") from None
    with os.fdopen(fd, "rb") as fp, _decoding(path):
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PrivdiffError(f"cannot read image {path}: not a regular file")
        if info.st_size == 0:
            raise PrivdiffError(f"cannot read image {path}: the file is empty")
        yield fp


@contextmanager
def _decoding(path: Path) -> Iterator[None]:
    """PIL's decompression-bomb warnings raised as errors; any failure inside becomes one PrivdiffError naming
    ``path``."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except PrivdiffError:
            raise
        except UnidentifiedImageError:
            raise PrivdiffError(f"cannot read image {path}: not a {', '.join(_formats())} image") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise PrivdiffError(f"cannot read image {path}: refused as a decompression bomb ({exc})") from None
        except Exception as exc:  # hostile files make PIL raise anything; one line naming the file
            raise PrivdiffError(f"cannot read image {path}: {_describe(exc)}") from None


def _open_checked(path: Path, fp: BinaryIO) -> Image.Image:
    """PIL's lazy view of ``fp`` (header only, no pixels decoded), refused unless its size and mode are loadable."""
    try:
        image = Image.open(fp, formats=_formats())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _refuse_size(path, _unchecked_size(fp)) from None
    width, height = image.size
    if width < 1 or height < 1 or width * height > _pixel_limit():
        raise _refuse_size(path, image.size)
    if image.mode not in _MODES:
        raise PrivdiffError(f"cannot read image {path}: pixel mode {image.mode} is not supported")
    return image


def check_image(path: str | os.PathLike) -> tuple[int, int]:
    """The (width, height) that image file ``path`` declares, read from its header without decoding any pixels.

    Raises PrivdiffError (one line naming the file) for a file that is not a loadable image or that declares more
    than MAX_IMAGE_PIXELS pixels.
    """
    path = Path(path)
    with _reading(path) as fp:
        return _open_checked(path, fp).size


def _tiff_depth(image: Image.Image) -> tuple[int, bool] | None:
    """(bits per sample, signed) that a TIFF declares, or None for other formats."""
    tags = getattr(image, "tag_v2", None)
    if tags is None or 258 not in tags:
        return None
    bits, fmt = tags.get(258), tags.get(339, 1)
    bits, fmt = (bits[0] if isinstance(bits, tuple) else bits), (fmt[0] if isinstance(fmt, tuple) else fmt)
    return int(bits), fmt == 2


def _deep_gray(image: Image.Image, source: str | os.PathLike, depth: tuple[int, bool] | None) -> np.ndarray:
    """A 16-bit, 32-bit integer or float grayscale image as [H, W] float32 in 0..1 (rules in to_float_rgb);
    ``depth`` is what the file declares (see _tiff_depth)."""
    values = np.asarray(image)
    if image.mode == "F":
        values = values.astype(np.float32)
        if not np.isfinite(values).all():
            raise PrivdiffError(f"cannot read image {source}: holds NaN or infinite pixel values")
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 1:
            log.warning("image %s: float pixels range %g..%g, not 0..1; loaded as max(value, 0) / %g",
                        source, low, high, max(high, 1.0))
            values = np.clip(values, 0, None) / max(high, 1.0)
        return values
    if image.mode != "I":  # I;16 modes: unsigned, 16 bits unless a TIFF declares fewer (12-bit data)
        scale = 2 ** min(depth[0], 16) - 1 if depth else 65535
    elif depth and depth[0] < 32:  # e.g. a signed 16-bit TIFF
        scale = 2 ** (depth[0] - depth[1]) - 1
    else:  # 32-bit: by the value range, so 16-bit data stored as 32-bit integers loads as 16-bit
        if depth and not depth[1]:
            values = values.view(np.uint32)  # an unsigned 32-bit TIFF
        top = int(values.max())
        scale = 65535 if top <= 65535 else 2**32 - 1 if values.dtype == np.uint32 else 2**31 - 1
    return np.clip(values.astype(np.float64) / scale, 0, 1).astype(np.float32)


def _has_alpha(image: Image.Image) -> bool:
    """Whether ``image`` carries transparency (an alpha band, a transparent colour or an RGBA palette)."""
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA"


def to_float_rgb(image: Image.Image, source: str | os.PathLike = "image") -> np.ndarray:
    """``image`` as [H, W, 3] float32 RGB in 0..1, as a person sees it; ``source`` names it in messages.

    8-bit modes (1, L, P, RGB, CMYK, YCbCr, LAB, HSV, ...) are converted by PIL and divided by 255; transparency
    (alpha band, transparent colour or palette entry) is composited on white. Deeper grayscale is scaled by its bit
    depth: I;16* by 65535 (or 2**bits - 1 for a TIFF declaring fewer bits); I (32-bit int) by the bits a TIFF
    declares when below 32, else by the value range: 65535 when the maximum is at most 65535 (16-bit data stored as
    I), else by the 32-bit maximum; negative values become 0. F (float): values in 0..1 are taken as is; other
    ranges are clipped at 0 and divided by their maximum, with one warning; NaN or infinity is refused.
    """
    return _float_rgb(image, source, _tiff_depth(image))


def _float_rgb(image: Image.Image, source: str | os.PathLike, depth: tuple[int, bool] | None) -> np.ndarray:
    """to_float_rgb, with the bit depth the file declared (a crop of a TIFF no longer carries its tags)."""
    if image.mode in _DEEP_MODES:
        return np.repeat(_deep_gray(image, source, depth)[..., None], 3, axis=2)
    if _has_alpha(image):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[..., 3:]
        return rgba[..., :3] * alpha + (1.0 - alpha)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _resized(image: Image.Image, resolution: int) -> Image.Image:
    """``image`` resized (bicubic) to resolution x resolution, or as is when it already has that size."""
    if image.size == (resolution, resolution):
        return image
    return image.resize((resolution, resolution), Image.Resampling.BICUBIC)


def to_square_rgb(image: Image.Image, resolution: int, source: str | os.PathLike = "image") -> torch.Tensor:
    """Centre-crop to a square, resize to ``resolution`` and return [3, H, W] floats in 0..1.

    Pixel modes are read as :func:`to_float_rgb` does (alpha composited on white). 8-bit images are resized as 8-bit
    RGB(A), as before; 16-bit, 32-bit and float images are scaled to 0..1 first and resized as floats, so they keep
    their precision.
    """
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    square = image.crop((left, top, left + side, top + side))
    if square.mode in _DEEP_MODES:
        gray = np.asarray(_resized(Image.fromarray(_deep_gray(square, source, _tiff_depth(image))), resolution))
        rgb = np.repeat(gray[..., None], 3, axis=2)
    else:
        rgb = _float_rgb(_resized(square.convert("RGBA" if _has_alpha(square) else "RGB"), resolution), source, None)
    return torch.from_numpy(np.clip(rgb, 0.0, 1.0).astype(np.float32)).permute(2, 0, 1).contiguous()


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """One image file as [3, resolution, resolution] in 0..1 (first frame, upright); bad files raise PrivdiffError."""
    resolution = check_resolution(resolution)
    return _decode(Path(path), _read(Path(path)), resolution)


def image_file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of the bytes of image file ``path``, read as loading reads them (a regular, non-empty file)."""
    return hashlib.sha256(_read(Path(path))).hexdigest()


def _read(path: Path) -> bytes:
    """The bytes of image file ``path`` (a regular, non-empty file), in one read."""
    with _reading(path) as fp:
        return fp.read()


def _header(path: Path, data: bytes) -> tuple[int, int]:
    """The (width, height) that the image bytes ``data`` of ``path`` declare (see :func:`check_image`)."""
    with _decoding(path):
        return _open_checked(path, io.BytesIO(data)).size


def _decode(path: Path, data: bytes, resolution: int) -> torch.Tensor:
    """The image bytes ``data`` (read from ``path``, named in errors) as [3, resolution, resolution] in 0..1."""
    with _decoding(path):
        image = _open_checked(path, io.BytesIO(data))
        image.load()
        if image.getexif().get(ORIENTATION, 1) != 1:  # Pillow 9.5 (A1111's pin) has no in_place= and copies
            image = ImageOps.exif_transpose(image)
        return to_square_rgb(image, resolution, path)


def check_memory(count: int, resolution: int) -> None:
    """Refuse loading ``count`` images at ``resolution`` when their float32 pixels need over half the memory."""
    need, half = count * 3 * resolution * resolution * 4, half_memory()
    if half is not None and need > half:
        raise PrivdiffError(f"{count} images at resolution {resolution} need {need / 2**20:,.0f} MiB of memory, "
                            f"over half of this machine's {2 * half / 2**20:,.0f} MiB; lower the resolution or use "
                            "fewer images")


def half_memory() -> int | None:
    """Half of this machine's memory in bytes, or None where it is not known (no sysconf: Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (AttributeError, ValueError, OSError):
        return None


def load_image_folder(
    folder: str | os.PathLike, resolution: int, *, files: Sequence[Path] | None = None
) -> tuple[list[Path], torch.Tensor]:
    """All images of ``folder`` as ([paths], [N, 3, resolution, resolution] in 0..1), for public images.

    ``files``, when given, is an earlier ``list_images(folder)``: exactly those files are loaded, without listing
    (and warning about) the folder again. The resolution is checked first, then every file's header, and only then
    are pixels decoded. Private images load with :func:`load_private_dataset`, which keeps their digests.
    """
    resolution = check_resolution(resolution)
    files = list_images(folder) if files is None else [Path(p) for p in files]
    if not files:
        raise PrivdiffError(f"image folder {folder} holds no images")
    check_memory(len(files), resolution)
    for path in files:
        check_image(path)
    images = torch.empty((len(files), 3, resolution, resolution), dtype=torch.float32)
    for i, path in enumerate(files):
        images[i] = load_image(path, resolution)
    return files, images


@dataclass(frozen=True)
class PrivateDataset:
    """A folder of private images, loaded: the files and the SHA-256 digests of the very bytes the pixels were
    decoded from (both for the local ledger only), and the pixels."""

    files: list[Path]
    images: torch.Tensor
    digests: list[str]

    def __len__(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class PrivateFiles:
    """A folder of private image files, read once and not yet decoded: each file's bytes, declared (width,
    height) and SHA-256 digest. The ledger charges ``digests``; :meth:`load` decodes these same bytes, so a file
    replaced on disk afterwards changes neither. LOCAL ONLY: a digest tells neighbouring datasets apart."""

    files: list[Path]
    sizes: list[tuple[int, int]]
    digests: list[str]
    _data: list[bytes] = field(repr=False)
    skipped: str = ""
    """The warning about entries of the folder that are not images, when ``read_private_files`` deferred it."""

    def __len__(self) -> int:
        return len(self.files)

    def warn_skipped(self) -> None:
        """Log the deferred skipped-entries warning (call it once every check has passed, before the work)."""
        if self.skipped:
            log.warning("%s", self.skipped)

    def subset(self, rows: range) -> PrivateFiles:
        """The files of ``rows`` with their bytes as read (what rank 0 sends the rank that trains them)."""
        return PrivateFiles(self.files[rows.start:rows.stop], self.sizes[rows.start:rows.stop],
                            self.digests[rows.start:rows.stop], self._data[rows.start:rows.stop])

    def load(self, resolution: int) -> PrivateDataset:
        """The images decoded from the bytes read, as a PrivateDataset at ``resolution``."""
        resolution = check_resolution(resolution)
        check_memory(len(self.files), resolution)
        images = torch.empty((len(self.files), 3, resolution, resolution), dtype=torch.float32)
        for i, (path, data) in enumerate(zip(self.files, self._data, strict=True)):
            images[i] = _decode(path, data, resolution)
        return PrivateDataset(list(self.files), images, list(self.digests))


def read_private_files(folder: str | os.PathLike, *, warn: bool = True) -> PrivateFiles:
    """Read every image file of ``folder`` once: bytes, header (checked, no pixels decoded) and digest.

    Two identical files are refused (that image would count twice in every release), as is a folder whose
    files need over half the machine's memory. With ``warn`` false the skipped-entries warning waits for
    ``PrivateFiles.warn_skipped``, so that a refusal after this call stays one line.
    """
    files, note = _scan(folder)
    if note and warn:
        log.warning("%s", note)
    need, half = sum(_file_size(path) for path in files), half_memory()
    if half is not None and need > half:
        raise PrivdiffError(f"the images of {folder} hold {need / 2**20:,.0f} MiB, over half of this machine's "
                            f"{2 * half / 2**20:,.0f} MiB of memory; use fewer images")
    data, sizes, seen = [], [], {}
    for path in files:
        data.append(_read(path))
        sizes.append(_header(path, data[-1]))
        digest = hashlib.sha256(data[-1]).hexdigest()
        if digest in seen:
            raise PrivdiffError(f"{path} is identical to {seen[digest]}: remove one (a duplicated image counts "
                                "twice in every release)")
        seen[digest] = path
    return PrivateFiles(files, sizes, list(seen), data, "" if warn else note)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise PrivdiffError(f"cannot read image {path}: {_describe(exc)}") from None


def load_private_dataset(folder: str | os.PathLike, resolution: int) -> PrivateDataset:
    """Load ``folder`` as a PrivateDataset of [N, 3, resolution, resolution] images in 0..1, each file read once
    (its pixels and its digest come from the same bytes)."""
    check_resolution(resolution)
    return read_private_files(folder).load(resolution)
