"""The small reference model's public image encoder, for DP style targets and guidance on that model.

It is the style classifier's network trained on the public styles only: its pooled features (128-d)
carry background colour, texture, shape and colour, and it has never seen a private style. It takes
the place CLIP's image encoder has for Stable Diffusion (`--image-encoder small`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from privdiff.guidance.encoders import weight_identity
from privdiff.reference.model import WEIGHTS
from privdiff.reference.score import ENCODER_FILE, AttributeClassifier, load_classifier
from privdiff.reference.shapes import SIZE


class SmallImageEncoder:
    """privdiff's ImageEncoder protocol over the public attribute network."""

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
