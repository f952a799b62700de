"""The style score: a small CNN that reads shape, colour, background and texture off a 32x32 image.

It is trained on the procedural generator's labelled images, private styles included (it is an
evaluation tool, never part of a release), and needs no downloaded network. For a batch of samples
it gives the fraction in a target style and the prompt adherence (shape and colour as asked).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from privdiff.models.small_classifier import HEADS, AttributeClassifier
from privdiff.reference.shapes import Spec


def targets(specs: list[Spec]) -> dict[str, torch.Tensor]:
    """Label indices per head for ``specs``."""
    values = {"shape": [s.shape for s in specs], "colour": [s.colour for s in specs],
              "background": [s.background for s in specs], "texture": [s.texture for s in specs]}
    return {name: torch.tensor([HEADS[name].index(v) for v in vs]) for name, vs in values.items()}


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
