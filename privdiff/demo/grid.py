"""The labelled image grids the demos write (grid.png, spectral-grid.png)."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

CELL = 96
"""Side of one grid cell in pixels."""


def draw_grid(rows: list[tuple[str, list[Image.Image]]], header: list[str]) -> Image.Image:
    """A labelled grid: one row per method, one column per prompt."""
    label_w, head_h, font = 250, 36, ImageFont.load_default(size=13)
    grid = Image.new("RGB", (label_w + CELL * len(header), head_h + CELL * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, text in enumerate(header):
        draw.text((label_w + CELL * j + 4, 4), text, fill="black", font=font)
    for i, (label, images) in enumerate(rows):
        ascii_label = label.replace("ε", "eps").replace("∞", "inf")  # PIL's default font has no Greek
        draw.multiline_text((6, head_h + CELL * i + 20), ascii_label, fill="black", font=font, spacing=4)
        for j, image in enumerate(images):
            grid.paste(image, (label_w + CELL * j, head_h + CELL * i))
    return grid
