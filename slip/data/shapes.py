"""The catalogue of synthetic object classes: one drawing function per class.

Every drawer paints one object on a transparent square ``RGBA`` PIL canvas of side ``c`` pixels, in
canvas coordinates, using the body colour ``p.body`` and the accent colour ``p.accent``. The alpha
channel is the object's silhouette (detail strokes such as eyes stay inside it; holes are cleared back
to alpha 0), so the ground-truth mask is simply ``alpha >= 128`` after placement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from PIL import ImageDraw, ImageFont

Color = tuple[int, int, int, int]
CLEAR: Color = (0, 0, 0, 0)
WHITE: Color = (245, 245, 245, 255)
BLACK: Color = (15, 15, 15, 255)


@dataclass(frozen=True)
class Palette:
    """The colours one object is drawn with."""

    body: Color  # main fill, RGBA
    accent: Color  # secondary fill (wings, spots, shell), RGBA


Drawer = Callable[[ImageDraw.ImageDraw, int, Palette], None]


def _poly(c: int, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Unit-square points -> canvas pixels."""
    return [(x * c, y * c) for x, y in points]


def _box(c: int, x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0 * c, y0 * c, x1 * c, y1 * c]


def _regular(n: int, radius: float, rotation: float = -math.pi / 2, cx: float = 0.5, cy: float = 0.5):
    return [(cx + radius * math.cos(rotation + 2 * math.pi * k / n), cy + radius * math.sin(rotation + 2 * math.pi * k / n)) for k in range(n)]


def _eye(d: ImageDraw.ImageDraw, c: int, x: float, y: float, r: float) -> None:
    d.ellipse(_box(c, x - r, y - r, x + r, y + r), fill=WHITE)
    d.ellipse(_box(c, x - r / 2, y - r / 2, x + r / 2, y + r / 2), fill=BLACK)


# --- shapes -------------------------------------------------------------------------------------------


def circle(d, c, p):
    d.ellipse(_box(c, 0.05, 0.05, 0.95, 0.95), fill=p.body)


def square(d, c, p):
    d.rectangle(_box(c, 0.12, 0.12, 0.88, 0.88), fill=p.body)


def triangle(d, c, p):
    d.polygon(_poly(c, [(0.5, 0.06), (0.95, 0.88), (0.05, 0.88)]), fill=p.body)


def star(d, c, p):
    outer, inner = _regular(5, 0.47), _regular(5, 0.19, rotation=-math.pi / 2 + math.pi / 5)
    d.polygon(_poly(c, [pt for pair in zip(outer, inner) for pt in pair]), fill=p.body)


def hexagon(d, c, p):
    d.polygon(_poly(c, _regular(6, 0.46, rotation=0.0)), fill=p.body)


def heart(d, c, p):
    d.ellipse(_box(c, 0.06, 0.12, 0.52, 0.56), fill=p.body)
    d.ellipse(_box(c, 0.48, 0.12, 0.94, 0.56), fill=p.body)
    d.polygon(_poly(c, [(0.08, 0.42), (0.92, 0.42), (0.5, 0.92)]), fill=p.body)


def crescent(d, c, p):
    d.ellipse(_box(c, 0.05, 0.05, 0.95, 0.95), fill=p.body)
    d.ellipse(_box(c, 0.32, -0.02, 1.12, 0.78), fill=CLEAR)


def ring(d, c, p):
    d.ellipse(_box(c, 0.05, 0.05, 0.95, 0.95), fill=p.body)
    d.ellipse(_box(c, 0.3, 0.3, 0.7, 0.7), fill=CLEAR)


def cross(d, c, p):
    d.rectangle(_box(c, 0.36, 0.06, 0.64, 0.94), fill=p.body)
    d.rectangle(_box(c, 0.06, 0.36, 0.94, 0.64), fill=p.body)


def arrow(d, c, p):
    d.rectangle(_box(c, 0.05, 0.4, 0.6, 0.6), fill=p.body)
    d.polygon(_poly(c, [(0.55, 0.15), (0.97, 0.5), (0.55, 0.85)]), fill=p.body)


def lightning(d, c, p):
    pts = [(0.58, 0.03), (0.2, 0.55), (0.46, 0.55), (0.34, 0.97), (0.82, 0.4), (0.55, 0.4), (0.72, 0.03)]
    d.polygon(_poly(c, pts), fill=p.body)


# --- glyphs -------------------------------------------------------------------------------------------


def _glyph(char: str) -> Drawer:
    def draw(d, c, p):
        font = ImageFont.load_default(size=max(int(c * 0.95), 8))
        d.text((c / 2, c / 2), char, font=font, fill=p.body, anchor="mm", stroke_width=max(c // 40, 1), stroke_fill=p.body)

    return draw


# --- creatures and things -----------------------------------------------------------------------------


def fish(d, c, p):
    d.polygon(_poly(c, [(0.62, 0.5), (0.97, 0.2), (0.97, 0.8)]), fill=p.accent)
    d.ellipse(_box(c, 0.03, 0.25, 0.75, 0.75), fill=p.body)
    _eye(d, c, 0.2, 0.44, 0.06)


def bird(d, c, p):
    d.ellipse(_box(c, 0.1, 0.35, 0.75, 0.85), fill=p.body)
    d.ellipse(_box(c, 0.55, 0.12, 0.88, 0.45), fill=p.body)
    d.polygon(_poly(c, [(0.85, 0.24), (0.99, 0.31), (0.85, 0.36)]), fill=(240, 170, 20, 255))
    d.polygon(_poly(c, [(0.18, 0.5), (0.55, 0.55), (0.3, 0.75)]), fill=p.accent)
    _eye(d, c, 0.73, 0.26, 0.05)


def cat(d, c, p):
    d.polygon(_poly(c, [(0.1, 0.45), (0.16, 0.04), (0.42, 0.3)]), fill=p.body)
    d.polygon(_poly(c, [(0.9, 0.45), (0.84, 0.04), (0.58, 0.3)]), fill=p.body)
    d.ellipse(_box(c, 0.08, 0.2, 0.92, 0.95), fill=p.body)
    _eye(d, c, 0.35, 0.5, 0.08)
    _eye(d, c, 0.65, 0.5, 0.08)
    d.polygon(_poly(c, [(0.45, 0.66), (0.55, 0.66), (0.5, 0.73)]), fill=(235, 120, 150, 255))


def ghost(d, c, p):
    d.ellipse(_box(c, 0.15, 0.05, 0.85, 0.6), fill=p.body)
    d.rectangle(_box(c, 0.15, 0.33, 0.85, 0.85), fill=p.body)
    for k in range(3):
        x = 0.15 + 0.7 * (k + 0.5) / 3
        d.ellipse(_box(c, x - 0.08, 0.8, x + 0.08, 0.96), fill=p.body)
    for k in range(2):
        x = 0.15 + 0.7 * (k + 1) / 3
        d.ellipse(_box(c, x - 0.05, 0.82, x + 0.05, 0.92), fill=CLEAR)
    d.ellipse(_box(c, 0.32, 0.25, 0.44, 0.4), fill=BLACK)
    d.ellipse(_box(c, 0.56, 0.25, 0.68, 0.4), fill=BLACK)


def mushroom(d, c, p):
    d.rectangle(_box(c, 0.38, 0.45, 0.62, 0.95), fill=(235, 220, 190, 255))
    d.pieslice(_box(c, 0.04, 0.08, 0.96, 0.9), 180, 360, fill=p.body)
    for x, y, r in [(0.3, 0.3, 0.07), (0.55, 0.2, 0.06), (0.72, 0.36, 0.06)]:
        d.ellipse(_box(c, x - r, y - r, x + r, y + r), fill=WHITE)


def snail(d, c, p):
    d.rounded_rectangle(_box(c, 0.05, 0.72, 0.95, 0.9), radius=0.08 * c, fill=p.accent)
    d.line(_poly(c, [(0.85, 0.75), (0.8, 0.45)]), fill=p.accent, width=max(c // 30, 1))
    d.line(_poly(c, [(0.9, 0.75), (0.95, 0.47)]), fill=p.accent, width=max(c // 30, 1))
    d.ellipse(_box(c, 0.12, 0.2, 0.7, 0.78), fill=p.body)
    for r in (0.2, 0.12, 0.05):
        d.arc(_box(c, 0.41 - r, 0.49 - r, 0.41 + r, 0.49 + r), 0, 300, fill=BLACK, width=max(c // 40, 1))


def butterfly(d, c, p):
    d.ellipse(_box(c, 0.03, 0.05, 0.48, 0.5), fill=p.body)
    d.ellipse(_box(c, 0.52, 0.05, 0.97, 0.5), fill=p.body)
    d.ellipse(_box(c, 0.1, 0.45, 0.47, 0.88), fill=p.accent)
    d.ellipse(_box(c, 0.53, 0.45, 0.9, 0.88), fill=p.accent)
    d.rectangle(_box(c, 0.46, 0.12, 0.54, 0.92), fill=BLACK)


def tree(d, c, p):
    d.rectangle(_box(c, 0.42, 0.55, 0.58, 0.97), fill=(110, 70, 35, 255))
    d.ellipse(_box(c, 0.1, 0.03, 0.9, 0.7), fill=p.body)


def flower(d, c, p):
    d.rectangle(_box(c, 0.47, 0.5, 0.53, 0.98), fill=(40, 140, 40, 255))
    for k in range(6):
        a = 2 * math.pi * k / 6
        x, y = 0.5 + 0.22 * math.cos(a), 0.38 + 0.22 * math.sin(a)
        d.ellipse(_box(c, x - 0.14, y - 0.14, x + 0.14, y + 0.14), fill=p.body)
    d.ellipse(_box(c, 0.38, 0.26, 0.62, 0.5), fill=p.accent)


def snowman(d, c, p):
    d.ellipse(_box(c, 0.15, 0.48, 0.85, 0.98), fill=p.body)
    d.ellipse(_box(c, 0.25, 0.22, 0.75, 0.62), fill=p.body)
    d.ellipse(_box(c, 0.34, 0.02, 0.66, 0.32), fill=p.body)
    d.ellipse(_box(c, 0.42, 0.12, 0.47, 0.17), fill=BLACK)
    d.ellipse(_box(c, 0.53, 0.12, 0.58, 0.17), fill=BLACK)
    for y in (0.36, 0.46, 0.62, 0.74):
        d.ellipse(_box(c, 0.475, y, 0.525, y + 0.05), fill=BLACK)


def spider(d, c, p):
    w = max(c // 25, 1)
    for k in range(4):
        y = 0.3 + 0.13 * k
        d.line(_poly(c, [(0.5, 0.55), (0.05, y - 0.2), (0.02, y + 0.05)]), fill=p.body, width=w)
        d.line(_poly(c, [(0.5, 0.55), (0.95, y - 0.2), (0.98, y + 0.05)]), fill=p.body, width=w)
    d.ellipse(_box(c, 0.3, 0.35, 0.7, 0.8), fill=p.body)
    d.ellipse(_box(c, 0.38, 0.18, 0.62, 0.42), fill=p.body)
    _eye(d, c, 0.45, 0.28, 0.035)
    _eye(d, c, 0.55, 0.28, 0.035)


def turtle(d, c, p):
    for x in (0.22, 0.66):
        d.ellipse(_box(c, x, 0.6, x + 0.14, 0.82), fill=p.accent)
    d.ellipse(_box(c, 0.78, 0.42, 0.99, 0.62), fill=p.accent)
    d.pieslice(_box(c, 0.08, 0.2, 0.88, 1.0), 180, 360, fill=p.body)
    d.rectangle(_box(c, 0.08, 0.58, 0.88, 0.66), fill=p.accent)
    d.polygon(_poly(c, _regular(6, 0.12, rotation=0.0, cx=0.48, cy=0.42)), fill=BLACK)


def house(d, c, p):
    d.rectangle(_box(c, 0.15, 0.45, 0.85, 0.95), fill=p.body)
    d.polygon(_poly(c, [(0.05, 0.48), (0.5, 0.05), (0.95, 0.48)]), fill=p.accent)
    d.rectangle(_box(c, 0.42, 0.65, 0.58, 0.95), fill=BLACK)
    d.rectangle(_box(c, 0.22, 0.55, 0.34, 0.67), fill=WHITE)


CATALOGUE: dict[str, Drawer] = {
    "circle": circle,
    "square": square,
    "triangle": triangle,
    "star": star,
    "hexagon": hexagon,
    "heart": heart,
    "crescent": crescent,
    "ring": ring,
    "cross": cross,
    "arrow": arrow,
    "lightning bolt": lightning,
    "letter A": _glyph("A"),
    "letter K": _glyph("K"),
    "number 3": _glyph("3"),
    "fish": fish,
    "bird": bird,
    "cat": cat,
    "ghost": ghost,
    "mushroom": mushroom,
    "snail": snail,
    "butterfly": butterfly,
    "tree": tree,
    "flower": flower,
    "snowman": snowman,
    "spider": spider,
    "turtle": turtle,
    "house": house,
}
"""Class display name -> drawer, in the fixed order ``--classes N`` takes the first N from."""
