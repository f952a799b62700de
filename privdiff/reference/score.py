"""The style score: a small CNN that reads shape, colour, background and texture off a 32x32 image.

It is trained on the procedural generator's labelled images, private styles included (it is an
evaluation tool, never part of a release), and needs no downloaded network. For a batch of samples
it gives the fraction in a target style and the prompt adherence (shape and colour as asked).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from privdiff.errors import PrivdiffError
from privdiff.reference.shapes import BACKGROUNDS, COLOURS, SHAPES, TEXTURES, Spec

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


def targets(specs: list[Spec]) -> dict[str, torch.Tensor]:
    """Label indices per head for ``specs``."""
    values = {"shape": [s.shape for s in specs], "colour": [s.colour for s in specs],
              "background": [s.background for s in specs], "texture": [s.texture for s in specs]}
    return {name: torch.tensor([HEADS[name].index(v) for v in vs]) for name, vs in values.items()}


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


@dataclass(frozen=True)
class Score:
    """Fractions of a batch of samples: in the target style (background colour and texture both), with the
    target's texture, with its background colour, and with the prompted shape and colour."""

    style: float
    texture: float
    background: float
    adherence: float
    count: int


def score(classifier: AttributeClassifier, images: torch.Tensor, style: str | None,
          prompted: list[tuple[str, str]]) -> Score:
    """Score images [B,3,32,32] in 0..1 sampled for ``prompted`` (shape, colour) pairs, one per image.

    ``style`` is "background texture" (e.g. "teal stripes"); None leaves the style fractions at 0.
    """
    if len(prompted) != len(images):
        raise ValueError("one (shape, colour) pair per image is required")
    labels = classifier.labels(images)
    background, texture = style.split() if style else (None, None)
    n = len(images)
    return Score(
        style=sum(lab["background"] == background and lab["texture"] == texture for lab in labels) / n,
        texture=sum(lab["texture"] == texture for lab in labels) / n,
        background=sum(lab["background"] == background for lab in labels) / n,
        adherence=sum(lab["shape"] == shape and lab["colour"] == colour
                      for lab, (shape, colour) in zip(labels, prompted, strict=True)) / n,
        count=n,
    )
