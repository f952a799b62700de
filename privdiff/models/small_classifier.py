"""The small reference model's attribute network: a CNN reading shape, colour, background and texture at 32x32.

Two trained copies ship with the model (``privdiff/models/small_weights/``): the style classifier
(``classifier.safetensors``, all styles: an evaluation tool used by ``privdiff.reference.score``) and the
public image encoder (``encoder.safetensors``, public styles only: ``--image-encoder small``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from privdiff.errors import PrivdiffError
from privdiff.models.small_spec import BACKGROUNDS, COLOURS, SHAPES, TEXTURES

HEADS = {"shape": SHAPES, "colour": tuple(COLOURS), "background": tuple(BACKGROUNDS), "texture": TEXTURES}
FILE = "classifier.safetensors"
ENCODER_FILE = "encoder.safetensors"
"""The same network trained on public styles only: the small model's public image encoder for guidance."""


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU())


class AttributeClassifier(nn.Module):
    """Four heads over a shared conv trunk; input [B,3,32,32] in 0..1."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(_block(3, 32, 1), _block(32, 32, 1), _block(32, 64, 2), _block(64, 64, 1),
                                   _block(64, 128, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(labels)) for name, labels in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head."""
        features = self.trunk(images * 2 - 1)
        return {name: head(features) for name, head in self.heads.items()}

    def labels(self, images: torch.Tensor, batch: int = 256) -> list[dict[str, str]]:
        """The predicted attributes of each image."""
        out: list[dict[str, str]] = []
        with torch.no_grad():
            for chunk in images.split(batch):
                logits = self(chunk.float())
                picks = {name: v.argmax(1).tolist() for name, v in logits.items()}
                out += [{name: HEADS[name][picks[name][i]] for name in HEADS} for i in range(len(chunk))]
        return out


def save_classifier(model: AttributeClassifier, folder: Path, file: str = FILE) -> Path:
    """Write the classifier into ``folder`` as fp16 safetensors, its label sets in the header."""
    path = folder / file
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"heads": json.dumps(HEADS)})
    return path


def load_classifier(folder: Path, file: str = FILE) -> AttributeClassifier:
    """The classifier saved in ``folder`` (float32, eval mode)."""
    path = folder / file
    if not path.is_file():
        raise PrivdiffError(f"style classifier missing: {path}; rebuild it with `python -m privdiff.reference.train`")
    model = AttributeClassifier()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()
