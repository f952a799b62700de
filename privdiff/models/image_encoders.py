"""Image encoders for style targets and guidance: a small protocol and its adapters.

An encoder maps images [B,3,H,W] in 0..1 to embeddings [B,D], differentiably (guidance back-propagates
through it). Its ``identity`` names the weights (a digest of the final projection), so a target made
with one encoder is never used with another; the same weights give the same identity whichever
front loaded them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from privdiff.errors import PrivdiffError
from privdiff.io.untrusted import file_kind, regular_file
from privdiff.models.encoder_folder import check_encoder_folder
from privdiff.models.small_classifier import ENCODER_FILE, AttributeClassifier, load_classifier
from privdiff.models.small_spec import SIZE, WEIGHTS

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@runtime_checkable
class ImageEncoder(Protocol):
    """What a style target and guided sampling need from a CLIP-like image encoder."""

    identity: str
    """Names the weights, e.g. "CLIP vision 512-d, projection sha256 1a2b...": recorded in target files."""
    dim: int
    """Embedding width."""
    size: int
    """Input side in pixels the encoder resizes to (load images at this size)."""

    def to(self, device: str | torch.device) -> ImageEncoder:
        """Move the weights to ``device``; returns self."""
        ...

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings [B, dim] (not normalised) of images [B,3,H,W] in 0..1; differentiable in the images."""
        ...


def weight_identity(kind: str, dim: int, projection: torch.Tensor) -> str:
    """Identity of an encoder from its final projection weight (rounded to fp16, so dtype does not matter)."""
    data = projection.detach().to("cpu", torch.float16).contiguous().numpy().tobytes()
    return f"{kind} {dim}-d, projection sha256 {hashlib.sha256(data).hexdigest()[:16]}"


def clip_preprocess(images: torch.Tensor, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """CLIP's input: bicubic resize of the short side to ``size``, centre crop, normalise. Differentiable."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    if (h, w) != (size, size):
        images = F.interpolate(images, size=(max(size, round(h * scale)), max(size, round(w * scale))),
                               mode="bicubic", align_corners=False, antialias=scale < 1)
        top, left = (images.shape[-2] - size) // 2, (images.shape[-1] - size) // 2
        images = images[..., top:top + size, left:left + size]
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - m) / s


class TransformersCLIPVision:
    """transformers' ``CLIPVisionModelWithProjection`` (a local folder, or a model object)."""

    def __init__(self, model: torch.nn.Module, mean=CLIP_MEAN, std=CLIP_STD) -> None:
        self.model = model.eval().requires_grad_(False)
        self.size = int(model.config.image_size)
        self.dim = int(model.config.projection_dim)
        self.mean, self.std = tuple(mean), tuple(std)
        self.identity = weight_identity("CLIP vision", self.dim, model.visual_projection.weight)

    @classmethod
    def from_folder(cls, folder: str | Path) -> TransformersCLIPVision:
        """Load a local transformers folder (config.json + weights; preprocessor_config.json is optional), its
        content checked first (``encoder_folder``): transformers reads only what passed."""
        from transformers import CLIPVisionModelWithProjection
        from transformers.utils import logging as hf_logging

        from privdiff.io import images

        path = Path(folder)
        checked = check_encoder_folder(path)
        half = images.half_memory()
        if half is not None and checked.weight_bytes > half:
            raise PrivdiffError(f"image encoder {path} needs about {checked.weight_bytes / 2**20:,.0f} MiB for its "
                                f"weights, over half of this machine's {2 * half / 2**20:,.0f} MiB")
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a bar on stderr would precede a later one-line error
        try:
            model = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # transformers raises many types for files it cannot use
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise PrivdiffError(f"cannot load image encoder {path}: {first[:200]}") from exc
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        return cls(model, checked.mean or CLIP_MEAN, checked.std or CLIP_STD)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> TransformersCLIPVision:
        self.model.to(device)
        return self

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings [B, dim]."""
        dtype = next(self.model.parameters()).dtype
        pixels = clip_preprocess(images.to(self.device, torch.float32), self.size, self.mean, self.std)
        return self.model(pixel_values=pixels.to(dtype)).image_embeds.float()


def tiny_image_encoder(seed: int = 0) -> TransformersCLIPVision:
    """A random-weight CLIP vision encoder for 32 px images (tests, and the tiny models' demo)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, projection_dim=16, num_hidden_layers=2,
                              num_attention_heads=4, image_size=32, patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TransformersCLIPVision(CLIPVisionModelWithProjection(config))


def open_clip_encoder(path: str | Path, architecture: str = "RN50") -> ImageEncoder:
    """OpenAI CLIP (e.g. RN50, as the reference uses) from a local file through open_clip (optional)."""
    try:
        import open_clip
    except Exception as exc:  # open_clip imports torchvision, which may be missing or broken
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise PrivdiffError(f"cannot load {path}: open_clip cannot be imported ({reason}); install open_clip_torch "
                            "with a working torchvision, or use a transformers CLIP vision folder") from exc
    try:
        model, _, _ = open_clip.create_model_and_transforms(architecture, pretrained=str(path))
    except Exception as exc:  # open_clip raises many types for a wrong architecture or file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PrivdiffError(f"cannot load {path} as open_clip {architecture}: {reason}") from exc
    return _OpenCLIP(model.visual.eval().requires_grad_(False), architecture)


class _OpenCLIP:
    def __init__(self, visual: torch.nn.Module, architecture: str) -> None:
        self.visual = visual
        size = visual.image_size
        self.size = int(size[0] if isinstance(size, tuple | list) else size)
        probe = self.visual(torch.zeros(1, 3, self.size, self.size))
        self.dim = int(probe.shape[-1])
        self.identity = weight_identity(f"open_clip {architecture}", self.dim, list(visual.parameters())[-1])

    def to(self, device: str | torch.device) -> _OpenCLIP:
        self.visual.to(device)
        return self

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.visual.parameters()).device
        return self.visual(clip_preprocess(images.to(device, torch.float32), self.size)).float()


class SmallImageEncoder:
    """The small reference model's public image encoder: the attribute network trained on the public styles only.

    Its pooled features (128-d) carry background colour, texture, shape and colour, and it has never seen a
    private style. It takes the place CLIP's image encoder has for Stable Diffusion (``--image-encoder small``).
    """

    def __init__(self, network: AttributeClassifier) -> None:
        self.network = network.eval().requires_grad_(False)
        last_conv = network.trunk[4][0].weight
        self.dim = int(last_conv.shape[0])
        self.identity = weight_identity("privdiff small encoder", self.dim, last_conv)
        self.size = SIZE

    def to(self, device: str | torch.device) -> SmallImageEncoder:
        self.network.to(device)
        return self

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, 128] of images [B,3,H,W] in 0..1 (resized to 32 px)."""
        x = images.to(next(self.network.parameters()).device, torch.float32)
        if x.shape[-2:] != (SIZE, SIZE):
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
        return self.network.trunk(x * 2 - 1)


def load_small_encoder(folder: Path = WEIGHTS) -> SmallImageEncoder:
    """The shipped public image encoder of the small reference model."""
    return SmallImageEncoder(load_classifier(folder, ENCODER_FILE))


def load_image_encoder(spec: str | Path) -> ImageEncoder:
    """"tiny" (built-in, random), "small" (the small reference model's public encoder), a transformers CLIP
    vision folder, or an open_clip "ARCH:file" pair."""
    text = str(spec)
    if text == "tiny":
        return tiny_image_encoder()
    if text == "small":
        return load_small_encoder()
    kind = file_kind(text) if text.strip() else "missing"
    if ":" in text and kind == "missing":
        architecture, _, file = text.partition(":")
        if not architecture.strip() or not file.strip():
            raise PrivdiffError(f"image encoder {text!r} names no {'architecture' if file.strip() else 'file'}: "
                                "expected ARCH:FILE for open_clip (e.g. RN50:RN50.pt)")
        return open_clip_encoder(regular_file(file, "image encoder file"), architecture)
    if kind == "missing":
        raise PrivdiffError(f"image encoder not found: {text!r} (expected 'tiny', 'small', a transformers CLIP vision "
                            "folder or ARCH:FILE for open_clip)")
    if kind is None:
        raise PrivdiffError(f"image encoder {text} is a file: give its transformers folder, or ARCH:{text} for "
                            "an open_clip checkpoint")
    if kind != "a folder":
        regular_file(text, "image encoder")  # raises, naming what it is
    return TransformersCLIPVision.from_folder(text)
